"""The callbacks group (conf/callbacks/): the defaults build today's callbacks, options compose, an added one acts
(early stopping ends a run), the run's own callbacks cannot be removed, and an entry that cannot work is named."""
from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

from omnibal_pl.cli.train import train
from omnibal_pl.errors import ConfigError
from omnibal_pl.train.assemble import build_run, resolve_run
from omnibal_pl.train.checkpoints import CrashSafeCheckpoint
from omnibal_pl.train.faults import FaultWatch
from omnibal_pl.train.memory_report import MemoryReport
from omnibal_pl.train.progress import StepProgressBar
from omnibal_pl.train.schemas import parse_run_config
from omnibal_pl.train.validation import ValidateAfterLastStep

from tests.helpers import FAST, cfg_of

VAL = ["dataset.val_fraction=0.1", "trainer.val_check_interval=2"]


def trainer_of(run_dir: Path, *overrides: str):
    return build_run(resolve_run(parse_run_config(cfg_of(*FAST, *overrides)), run_dir))[0]


def kinds(trainer) -> list[type]:
    return [type(c) for c in trainer.callbacks]


def test_the_defaults_are_the_resume_checkpoint_and_the_lr_monitor_beside_the_runs_own(tmp_path):
    run = parse_run_config(cfg_of("trainer.checkpoint_every_n_steps=7"))
    assert list(run.callbacks) == ["checkpoint", "lr_monitor"]
    trainer = trainer_of(tmp_path, "trainer.checkpoint_every_n_steps=7", "trainer.enable_progress_bar=true")
    (checkpoint,) = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert type(checkpoint) is CrashSafeCheckpoint and checkpoint.dirpath == str(tmp_path / "checkpoints")
    assert checkpoint._every_n_train_steps == 7 and checkpoint.save_top_k == -1 and checkpoint.save_last == "link"
    (monitor,) = [c for c in trainer.callbacks if isinstance(c, LearningRateMonitor)]
    assert monitor.logging_interval == "step"
    assert {MemoryReport, FaultWatch, StepProgressBar} <= set(kinds(trainer))
    assert ValidateAfterLastStep not in kinds(trainer)  # nothing held out: no validation to add


def test_options_compose_and_leaving_all_out_keeps_the_runs_own(tmp_path):
    trainer = trainer_of(tmp_path, *VAL, "callbacks=[checkpoint,lr_monitor,best_checkpoint,early_stopping]")
    assert {CrashSafeCheckpoint, LearningRateMonitor, ModelCheckpoint, EarlyStopping} <= set(kinds(trainer))
    best = next(c for c in trainer.callbacks if type(c) is ModelCheckpoint)
    assert best.monitor == "val/loss" and best.dirpath == str(tmp_path / "checkpoints" / "best")
    bare = kinds(trainer_of(tmp_path, *VAL, "callbacks=[]"))
    assert {MemoryReport, FaultWatch, ValidateAfterLastStep} <= set(bare)
    assert not {CrashSafeCheckpoint, LearningRateMonitor} & set(bare)


def test_early_stopping_ends_a_run_without_improvement(tmp_path):
    """min_delta=100: the first validation (step 2) sets the best, the second (step 4) does not beat it by 100, and
    patience 1 stops the run there instead of at max_steps=20."""
    summary = train(cfg_of(*FAST, *VAL, "trainer.max_steps=20", "callbacks=[checkpoint,lr_monitor,early_stopping]",
                           "callbacks.early_stopping.patience=1", "callbacks.early_stopping.min_delta=100",
                           f"run_dir={tmp_path / 'stopped'}"))
    assert summary["steps"] == 4
    full = train(cfg_of(*FAST, *VAL, "trainer.max_steps=6", f"run_dir={tmp_path / 'full'}"))
    assert full["steps"] == 6  # the same run without it goes on


def test_a_run_without_the_checkpoint_option_writes_none(tmp_path):
    train(cfg_of(*FAST, "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=1", "callbacks=[lr_monitor]",
                 f"run_dir={tmp_path}"))
    assert (tmp_path / "metrics.csv").is_file() and not (tmp_path / "checkpoints").exists()


def test_entries_that_cannot_work_in_the_run_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"callbacks\.best_checkpoint: monitors val/loss, .*dataset\.val_fraction"):
        trainer_of(tmp_path, "callbacks=[checkpoint,best_checkpoint]")
    with pytest.raises(ConfigError, match=r"callbacks\.lr_monitor: LearningRateMonitor .*no(ne| logger)"):
        trainer_of(tmp_path, "~logger")
    with pytest.raises(ConfigError, match=r"callbacks\.mine: needs a _target_"):
        trainer_of(tmp_path, "+callbacks.mine.patience=1")
    with pytest.raises(ConfigError, match=r"trainer\.callbacks\.0: .*EarlyStopping cannot be built"):
        trainer_of(tmp_path, "trainer.callbacks=[{_target_:lightning.pytorch.callbacks.EarlyStopping,nosuch:1}]")
