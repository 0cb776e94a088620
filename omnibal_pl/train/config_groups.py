"""Objects of the config groups whose options are ``_target_`` entries (``conf/logger/``, ``conf/callbacks/``).

Every option file holds one entry under its own name, so choosing several (``logger=[csv,tensorboard]``,
``callbacks=[checkpoint,early_stopping]``) merges them into one mapping ``{name: spec}``; the group's node is
that mapping and :func:`build_entries` builds it in order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor

from omnibal_pl.errors import ConfigError


def build_entries(group: str, specs: Mapping[Any, Mapping[str, Any]], run_dir: Path, dir_key: str,
                  default_dir: Optional[str] = None, extra: Optional[str] = None) -> list[Any]:
    """One object per entry of ``specs`` (in order), built from its ``_target_``. The folder argument ``dir_key``
    (``save_dir``, ``dirpath``) is taken relative to ``run_dir`` (an absolute one stays as it is); when an entry has
    none, ``default_dir`` is passed (None: nothing is). Raises :class:`ConfigError` naming ``<group>.<name>`` when
    an entry has no target or cannot be built; a missing package then names the pyproject extra ``extra``."""
    built = []
    for name, spec in specs.items():
        if not isinstance(spec, Mapping) or "_target_" not in spec:
            raise ConfigError(f"{group}.{name}: needs a _target_ (the class to build); the options are the files of "
                              f"conf/{group}/")
        folder = spec.get(dir_key) or default_dir
        args = {**spec, dir_key: str(run_dir / str(folder))} if folder is not None else dict(spec)
        try:
            built.append(instantiate(args))
        except InstantiationException as e:
            cause = e.__cause__ or e
            hint = f"; install it with pip install 'omnibal_pl[{extra}]'" if extra and isinstance(cause, ImportError) else ""
            message = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
            raise ConfigError(f"{group}.{name}: {spec['_target_']} cannot be built: {message}{hint}") from None
    return built


def build_callbacks(group: str, specs: Mapping[Any, Mapping[str, Any]], run_dir: Path, has_loggers: bool,
                    has_validation: bool) -> list[Callback]:
    """The callbacks of ``specs`` (:func:`build_entries`, ``dirpath`` relative to ``run_dir``), refused with a
    :class:`ConfigError` naming ``<group>.<name>`` when they cannot work in this run: a ``LearningRateMonitor``
    without a logger, a callback monitoring ``val/...`` without held-out data."""
    callbacks = build_entries(group, specs, run_dir, "dirpath")
    for name, callback in zip(specs, callbacks):
        if isinstance(callback, LearningRateMonitor) and not has_loggers:
            raise ConfigError(f"{group}.{name}: LearningRateMonitor logs to the run's loggers and there are none; "
                              "choose a logger (logger=csv) or leave it out (callbacks=[checkpoint])")
        monitor = getattr(callback, "monitor", None)
        if isinstance(monitor, str) and monitor.startswith("val/") and not has_validation:
            raise ConfigError(f"{group}.{name}: monitors {monitor}, which needs held-out data: set "
                              "dataset.val_fraction > 0 (or dataset.val_* files)")
    return callbacks
