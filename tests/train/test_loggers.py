"""The logger group: several loggers at once each get every project metric and the LR monitor's rate; wandb runs
offline, mlflow into a local store; a bad entry fails naming it."""
from __future__ import annotations

import csv
import subprocess
import sys
import warnings

import pytest
from hydra.errors import MissingConfigException

from omnibal_pl.cli.group_options import check_group_options
from omnibal_pl.cli.train import train
from omnibal_pl.errors import ConfigError
from omnibal_pl.train.loggers import build_loggers
from omnibal_pl.train.schemas import parse_run_config

from tests.helpers import FAST, cfg_of, losses_in

STEPS = ["trainer.max_steps=3", "trainer.checkpoint_every_n_steps=100"]


def test_csv_and_tensorboard_both_get_the_project_metrics(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    train(cfg_of(*FAST, *STEPS, "logger=[csv,tensorboard]", f"run_dir={tmp_path}"))
    losses = losses_in(tmp_path)
    assert sorted(losses) == [0, 1, 2]
    with open(tmp_path / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert "lr-AdamW/llm" in header and "train/tokens_per_s" in header  # LearningRateMonitor and the meter's metrics
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = event_accumulator.EventAccumulator(str(events[0]))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"train/loss", "train/tokens_per_s", "balance/llm_dist", "lr-AdamW/llm"} <= set(scalars)
    assert {e.step: e.value for e in acc.Scalars("train/loss")} == pytest.approx(losses)


def test_wandb_runs_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(cfg_of(*FAST, *STEPS, "logger=wandb", f"run_dir={tmp_path}"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert not (tmp_path / "metrics.csv").exists()  # only the chosen logger


@pytest.mark.slow  # MLflow creates its SQLite schema: ~15 s
def test_mlflow_writes_a_local_store(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    train(cfg_of(*FAST, *STEPS, "logger=[csv,mlflow]", f"run_dir={tmp_path}"))
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("omnibal")
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert {m.step: m.value for m in history} == pytest.approx(losses_in(tmp_path))


def test_a_fresh_run_does_not_warn_and_a_resumed_one_continues_its_metrics(tmp_path):
    common = [*FAST, "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2", f"run_dir={tmp_path}"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg_of(*common))
    assert not [w for w in caught if "not empty" in str(w.message)]
    first = losses_in(tmp_path)
    # resumed from step 2 in the same directory: rows 0-1 kept, rows 2-3 replaced by the resumed run's
    train(cfg_of(*common, f"ckpt_path={tmp_path / 'checkpoints' / 'step000002.ckpt'}"))
    with open(tmp_path / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == [0, 1, 2, 3]
    assert losses_in(tmp_path) == pytest.approx(first, rel=1e-5)


def test_bad_logger_entries_are_named(tmp_path):
    with pytest.raises(MissingConfigException, match="logger/nosuch"):
        cfg_of("logger=nosuch")
    with pytest.raises(ConfigError, match=r"logger\.mine: needs a _target_"):
        build_loggers({"mine": {"save_dir": "."}}, tmp_path)
    with pytest.raises(ConfigError, match=r"logger\.broken: .*cannot be built"):
        build_loggers({"broken": {"_target_": "lightning.pytorch.loggers.CSVLogger", "nosuch": 1}}, tmp_path)
    assert parse_run_config(cfg_of("logger=[csv,tensorboard]")).logger.keys() == {"csv", "tensorboard"}


def test_an_unknown_logger_or_callback_name_is_one_line_naming_the_key_and_the_options(tmp_path):
    out = subprocess.run([sys.executable, "-m", "omnibal_pl.cli.train", "logger=[csv,nosuch]"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "omnibal-train: error: logger=nosuch: no such option; the options are csv, mlflow, tensorboard, wandb"]
    assert not list(tmp_path.iterdir())  # refused before Hydra made a run directory
    out = subprocess.run([sys.executable, "-m", "omnibal_pl.cli.stats", "dataset=lava", "output=x"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)  # every console script: the check is in hydra_app
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith("omnibal-stats: error: dataset=lava: no such option; the options are chat, chat_qwen, ")
    with pytest.raises(ConfigError, match=r"^callbacks=xyz: no such option; the options are best_checkpoint, checkpoint, "
                                          r"early_stopping, lr_monitor$"):
        check_group_options(["-m", "callbacks=[checkpoint,lr_monitor],[checkpoint,xyz]"])  # a sweep over lists
    with pytest.raises(ConfigError, match=r"^model/sparsify=of: no such option"):
        check_group_options(["model/sparsify=of"])
    check_group_options(["-m", "logger=csv,tensorboard", "callbacks=[checkpoint,early_stopping]", "~logger",
                         "model=auto", "model.name=x", "+callbacks.mine.a=1", "hydra/sweeper=optuna", "--cfg", "job"])
