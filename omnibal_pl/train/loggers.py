"""The run's Lightning loggers, from the ``logger`` config group (``conf/logger/*.yaml``).

The group's node maps a logger's name to its ``_target_`` spec (``logger=[csv,tensorboard]`` merges two
options into ``{csv: ..., tensorboard: ...}``). Every logger receives everything the run logs (the step's
loss, throughput, MFU and balance from :class:`~omnibal_pl.train.step_metrics.StepMeter`, the learning rate
of Lightning's ``LearningRateMonitor``), because Lightning hands each ``log`` call to all of them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, MLFlowLogger

from omnibal_pl.errors import ConfigError

OPTIONAL_EXTRA = "loggers"  # pyproject.toml's extra with tensorboard, wandb, mlflow-skinny (+ its SQLite store)


class LocalMLFlowLogger(MLFlowLogger):
    """Lightning's MLflow logger whose store, without a ``tracking_uri``, is the SQLite file
    ``<save_dir>/mlflow.db`` (MLflow 3 refuses its old file store; ``mlflow ui --backend-store-uri
    sqlite:///<save_dir>/mlflow.db`` reads it). A ``tracking_uri`` (a server) is used as given."""

    def __init__(self, save_dir: str, tracking_uri: str | None = None, **kwargs: Any) -> None:
        if tracking_uri is None:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            tracking_uri = f"sqlite:///{Path(save_dir).resolve() / 'mlflow.db'}"
        super().__init__(tracking_uri=tracking_uri, save_dir=save_dir, **kwargs)


def build_loggers(specs: Mapping[str, Mapping[str, Any]], run_dir: Path) -> list[Logger]:
    """One logger per entry of ``specs`` (in order), built from its ``_target_`` with ``save_dir`` taken relative to
    ``run_dir`` (``.`` when absent). Raises :class:`ConfigError` naming ``logger.<name>`` when an entry has no
    target or cannot be built (a package not installed: the extra to install is named)."""
    loggers = []
    for name, spec in specs.items():
        if not isinstance(spec, Mapping) or "_target_" not in spec:
            raise ConfigError(f"logger.{name}: needs a _target_ (a Lightning logger class, e.g. "
                              "lightning.pytorch.loggers.CSVLogger); the options are the files of conf/logger/")
        save_dir = run_dir / str(spec.get("save_dir") or ".")
        try:
            loggers.append(instantiate({**spec, "save_dir": str(save_dir)}))
        except InstantiationException as e:
            cause = e.__cause__ or e
            hint = (f"; install it with pip install 'omnibal_pl[{OPTIONAL_EXTRA}]'"
                    if isinstance(cause, ImportError) else "")
            raise ConfigError(f"logger.{name}: {spec['_target_']} cannot be built: "
                              f"{str(cause).splitlines()[0] if str(cause) else type(cause).__name__}{hint}") from None
    return loggers
