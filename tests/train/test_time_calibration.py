"""trainer.time_model_steps: a run times its own micro-batches and fits the balance time model on the length
table's features of the samples each one held (omnibal_pl/train/time_calibration.py)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from omnibal_pl.balance.cost import TERMS, TimeModel, sample_features
from omnibal_pl.cli.train import train
from omnibal_pl.errors import ConfigError
from omnibal_pl.lengths import LengthTable
from omnibal_pl.train.time_calibration import TimeModelCalibration

from tests.helpers import FAST, cfg_of

TRUTH = np.array([3e-3, 2e-5, 1e-8, 5e-3])  # seconds per tile, token, squared length, sample
FIXED_S, STEP_S = 0.04, 0.3  # per micro-batch; the optimizer step, timed with a step's last micro-batch


class FakeClock:
    """Advances, between a batch's start and end, by what TRUTH says its samples cost (plus the fixed costs)."""

    def __init__(self) -> None:
        self.now, self.pending = 0.0, 0.0

    def __call__(self) -> float:
        self.now += self.pending
        self.pending = 0.0
        return self.now


def run_steps(callback: TimeModelCalibration, table: LengthTable, clock: FakeClock, steps: int, per_step: int) -> None:
    """``steps`` optimizer steps of ``per_step`` micro-batches of random samples, as Lightning calls the hooks."""
    rng = np.random.default_rng(0)
    trainer = SimpleNamespace(global_step=0, is_global_zero=True)
    module = SimpleNamespace(device=torch.device("cpu"))
    features = sample_features(table)
    for _ in range(steps):
        for k in range(per_step):
            ids = rng.choice(len(table), size=int(rng.integers(1, 6)), replace=False)
            batch = SimpleNamespace(sample_ids=torch.as_tensor(ids))
            callback.on_train_batch_start(trainer, module, batch, 0)
            ends_step = k == per_step - 1
            clock.pending = float(features[ids].sum(axis=0) @ TRUTH) + FIXED_S + STEP_S * ends_step
            trainer.global_step += ends_step  # Lightning steps the optimizer before the last micro-batch's end hook
            callback.on_train_batch_end(trainer, module, None, batch, 0)


def table_of(n: int = 400) -> LengthTable:
    rng = np.random.default_rng(1)
    vit = rng.integers(1, 13, n)
    return LengthTable.from_arrays(vit, vit * 256 + rng.integers(20, 1500, n))


def test_the_fit_recovers_the_cost_of_the_samples_each_micro_batch_held(tmp_path):
    table, clock = table_of(), FakeClock()
    callback = TimeModelCalibration(tmp_path / "time_model.json", table, steps=8, skip_steps=1, clock=clock)
    run_steps(callback, table, clock, steps=12, per_step=3)
    assert len(callback.rows) == 8 * 3  # steps 1..8 timed: not the first (warm-up), not after the window
    np.testing.assert_allclose(callback.model.coefficients, TRUTH, rtol=1e-6)  # fixed and step costs apart
    assert callback.model.fixed_s == pytest.approx(FIXED_S)
    saved = TimeModel.load(tmp_path / "time_model.json")
    assert saved == callback.model and saved.fitted_on == 24


def test_too_few_micro_batches_write_nothing(tmp_path, caplog):
    table, clock = table_of(), FakeClock()
    callback = TimeModelCalibration(tmp_path / "time_model.json", table, steps=2, skip_steps=0, clock=clock)
    run_steps(callback, table, clock, steps=3, per_step=2)
    assert callback.model is None and not (tmp_path / "time_model.json").exists()
    assert "no time model written: a time model of 4 terms needs at least 12 measured micro-batches, got 4" in caplog.text


def test_a_run_times_its_micro_batches_and_writes_or_explains(tmp_path, caplog):
    train(cfg_of(*FAST, "balance.micro_batches=2", "trainer.max_steps=8", "trainer.time_model_steps=6",
                 f"run_dir={tmp_path}"))
    path = tmp_path / "time_model.json"
    if path.exists():
        raw = json.loads(path.read_text())
        assert raw["terms"] == list(TERMS) and raw["fitted_on"] == 12 and min(raw["coefficients"]) >= 0
        assert "time model fitted on 12 micro-batches" in caplog.text
    else:  # the times of a tiny model on this shared machine may be refused: then the log says why
        assert "no time model written: the best non-negative time model" in caplog.text


def test_the_pipeline_strategy_refuses_it(tmp_path):
    with pytest.raises(ConfigError, match="trainer.time_model_steps times micro-batches one by one"):
        train(cfg_of(*FAST, "cluster.strategy=omnibal", "plan.use=uniform", "trainer.max_steps=2",
                     "trainer.time_model_steps=2", f"run_dir={tmp_path}"))
