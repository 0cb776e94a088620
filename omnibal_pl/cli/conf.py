"""Where the Hydra apps find ``conf/``: the repository's top-level config tree."""
from __future__ import annotations

from pathlib import Path

from omnibal_pl.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def conf_dir() -> str:
    """Absolute path of ``conf/``; the package must be installed from a checkout (``pip install -e .``)."""
    if not CONF_DIR.is_dir():
        raise ConfigError(f"config tree not found at {CONF_DIR}; install omnibal_pl from a checkout "
                          "(bash scripts/setup.sh) so conf/ sits next to the package")
    return str(CONF_DIR)
