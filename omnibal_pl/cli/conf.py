"""Hydra app plumbing shared by the console scripts: where ``conf/`` is, and one entry-point wrapper."""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig

from omnibal_pl.errors import ConfigError, OmniBalError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def conf_dir() -> str:
    """Absolute path of ``conf/``; the package must be installed from a checkout (``pip install -e .``)."""
    if not CONF_DIR.is_dir():
        raise ConfigError(f"config tree not found at {CONF_DIR}; install omnibal_pl from a checkout "
                          "(bash scripts/setup.sh) so conf/ sits next to the package")
    return str(CONF_DIR)


def hydra_app(config_name: str, prog: str, task: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """A console-script entry that runs ``task`` as a Hydra app over ``conf/<config_name>.yaml``.

    A package error (:class:`OmniBalError`) prints ``<prog>: error: <message>`` and exits with status 2
    instead of a traceback. Hydra names the job after ``task``'s module (it unwraps ``functools.wraps``).
    """

    @functools.wraps(task)
    def guarded(cfg: DictConfig) -> None:
        try:
            task(cfg)
        except OmniBalError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            sys.exit(2)

    def main() -> None:
        hydra.main(version_base="1.3", config_path=conf_dir(), config_name=config_name)(guarded)()

    return main
