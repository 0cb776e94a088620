"""The Hydra config tree, shipped inside the package (Hydra reads it as ``pkg://omnibal_pl.conf``).

This folder is the one copy; the repository's top-level ``conf`` is a link to it. :func:`preset`
reads one option of a group (``preset("model", "tiny")``) for code and tests outside Hydra.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from omnibal_pl.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent
HYDRA_PATH = "pkg://omnibal_pl.conf"


def preset(group: str, name: str) -> dict[str, Any]:
    """The mapping of ``<group>/<name>.yaml`` (e.g. ``model/tiny``), without Hydra's composition."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ConfigError(f"no config {group}/{name}; {group} options are {options}")
    return yaml.safe_load(path.read_text())
