"""omnibal_pl: balanced vision-language model training on PyTorch Lightning."""
from omnibal_pl.errors import (
    BalanceError,
    ConfigError,
    DataError,
    LengthDataError,
    OmniBalError,
    PlanError,
)
from omnibal_pl.lengths import LengthTable

__all__ = [
    "BalanceError",
    "ConfigError",
    "DataError",
    "LengthDataError",
    "LengthTable",
    "OmniBalError",
    "PlanError",
]
__version__ = "0.1.0"
