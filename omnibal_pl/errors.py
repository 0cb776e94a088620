"""The package's exceptions: everything omnibal_pl raises on purpose derives from :class:`OmniBalError`.

Each message says what was wrong (file, row, field where there is one) and what to do about it.
"""


class OmniBalError(Exception):
    """Base class of every error raised on purpose by omnibal_pl."""


class LengthDataError(OmniBalError, ValueError):
    """Per-sample length statistics are missing, malformed or out of range."""


class DataError(OmniBalError, ValueError):
    """A dataset file, sample or image is missing, malformed or does not fit the caps."""


class ConfigError(OmniBalError, ValueError):
    """A configuration value is missing, mistyped or inconsistent with another."""


class BalanceError(OmniBalError):
    """Grouping cannot honour its caps or policy (e.g. an oversize sample under ``oversize=error``)."""


class PlanError(OmniBalError):
    """A pipeline plan cannot be built, loaded or applied (memory, block names, stage counts)."""
