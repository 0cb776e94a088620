"""The run's Lightning loggers, from the ``logger`` config group (``conf/logger/*.yaml``).

The group's node maps a logger's name to its ``_target_`` spec (``logger=[csv,tensorboard]`` merges two
options into ``{csv: ..., tensorboard: ...}``). Every logger receives everything the run logs (the step's
loss, throughput, MFU and balance from :class:`~omnibal_pl.train.step_metrics.StepMeter`, the learning rate
of Lightning's ``LearningRateMonitor``), because Lightning hands each ``log`` call to all of them.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from omnibal_pl.train.config_groups import build_entries

OPTIONAL_EXTRA = "loggers"  # pyproject.toml's extra with tensorboard, wandb, mlflow-skinny (+ its SQLite store)


class _ContinuedMetrics(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` (the run resumed in its own directory) is
    continued, not deleted: its columns are kept, and its rows from the first step this process logs onward
    (logged after the checkpoint the run resumed from) are replaced by the new ones. Lightning's writer
    warns whenever the folder holds any file and deletes the metrics, which in a run directory is every run."""

    def _check_log_dir_exists(self) -> None:
        self._resumed = self._fs.isfile(self.metrics_file_path)
        if self._resumed:
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])

    def save(self) -> None:
        if self._resumed and self.metrics:
            first_step = min(m["step"] for m in self.metrics)
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                kept = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) < first_step]
            with self._fs.open(self.metrics_file_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
            self._resumed = False
        super().save()


class RunCSVLogger(CSVLogger):
    """``metrics.csv`` in the run directory, continued across resumes (:class:`_ContinuedMetrics`)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedMetrics(log_dir=self.log_dir)
        return self._experiment


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
    return build_entries("logger", specs, run_dir, "save_dir", default_dir=".", extra=OPTIONAL_EXTRA)
