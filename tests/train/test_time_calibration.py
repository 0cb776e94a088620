"""trainer.time_model_steps: a run times its own micro-batches and fits the balance time model on the length
table's features of the samples each one held (omnibal_pl/train/time_calibration.py); the model records the
setting it was measured in, and a run with balance.cost=fitted refuses one measured in another."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from omnibal_pl.balance.cost import TERMS, TimeModel, sample_features
from omnibal_pl.cli.train import train
from omnibal_pl.errors import BalanceError, ConfigError
from omnibal_pl.lengths import LengthTable
from omnibal_pl.train.assemble import build_run, resolve_run, run_setting
from omnibal_pl.train.schemas import parse_run_config
from omnibal_pl.train.time_calibration import TimeModelCalibration

from tests.helpers import FAST, cfg_of

TRUTH = np.array([3e-3, 2e-5, 1e-8, 5e-3])  # seconds per tile, token, squared length, sample
FIXED_S, STEP_S = 0.04, 0.3  # per micro-batch; the optimizer step, timed with a step's last micro-batch
SETTING = {"model": "tiny", "model_config": "0123abcd", "device": "cpu", "precision": "32-true", "attention": "sdpa",
           "pad_to": "multiple"}


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
    callback = TimeModelCalibration(tmp_path / "time_model.json", table, steps=8, made_for=SETTING, skip_steps=1,
                                    clock=clock)
    run_steps(callback, table, clock, steps=12, per_step=3)
    assert len(callback.rows) == 8 * 3  # steps 1..8 timed: not the first (warm-up), not after the window
    np.testing.assert_allclose(callback.model.coefficients, TRUTH, rtol=1e-6)  # fixed and step costs apart
    assert callback.model.fixed_s == pytest.approx(FIXED_S)
    saved = TimeModel.load(tmp_path / "time_model.json")
    assert saved == callback.model and saved.fitted_on == 24 and saved.made_for == SETTING


def test_too_few_micro_batches_write_nothing(tmp_path, caplog):
    table, clock = table_of(), FakeClock()
    callback = TimeModelCalibration(tmp_path / "time_model.json", table, steps=2, made_for=SETTING, skip_steps=0,
                                    clock=clock)
    run_steps(callback, table, clock, steps=3, per_step=2)
    assert callback.model is None and not (tmp_path / "time_model.json").exists()
    assert "no time model written: a time model of 4 terms needs at least 12 measured micro-batches, got 4" in caplog.text


def test_a_run_times_its_micro_batches_and_writes_or_explains(tmp_path, caplog):
    cfg = cfg_of(*FAST, "balance.micro_batches=2", "trainer.max_steps=8", "trainer.time_model_steps=6",
                 f"run_dir={tmp_path}")
    train(cfg)
    path = tmp_path / "time_model.json"
    if path.exists():
        raw = json.loads(path.read_text())
        assert raw["terms"] == list(TERMS) and raw["fitted_on"] == 12 and min(raw["coefficients"]) >= 0
        assert raw["made_for"] == run_setting(parse_run_config(cfg))
        assert "time model fitted on 12 micro-batches" in caplog.text
    else:  # the times of a tiny model on this shared machine may be refused: then the log says why
        assert "no time model written: the best non-negative time model" in caplog.text


def fitted_run(tmp_path, made_for: dict[str, str], *overrides: str):
    """A run config with balance.cost=fitted on a model measured in ``made_for`` (None: the run's own setting)."""
    base = [*FAST, "balance.cost=fitted", f"balance.time_model={tmp_path / 'tm.json'}", *overrides]
    own = run_setting(parse_run_config(cfg_of(*base)))
    TimeModel([0.2, 3e-3, 5e-6, 0.1], 0.01, 24, 0.03, own if made_for is None else made_for).save(tmp_path / "tm.json")
    return parse_run_config(cfg_of(*base)), own


def test_a_fitted_run_takes_a_model_measured_in_its_own_setting(tmp_path):
    cfg, own = fitted_run(tmp_path, None)
    assert set(own) == {"model", "model_config", "device", "precision", "attention", "pad_to"}
    assert own["device"] == "cpu" and own["precision"] == "32-true" and own["model"] == cfg.model.name
    run = resolve_run(cfg, tmp_path / "run")
    assert run.data.balance.cost == "fitted"


@pytest.mark.parametrize("override, key", [("cluster.precision=bf16-mixed", "precision"),
                                           ("model.llm.layers=3", "model_config"),
                                           ("packing.pad_to=multiple", "pad_to")])
def test_a_fitted_run_refuses_a_model_measured_in_another_setting(tmp_path, override, key):
    _, own = fitted_run(tmp_path, None)  # measured in the default setting; the run then changes one thing
    cfg, _ = fitted_run(tmp_path, own, override)
    with pytest.raises(BalanceError, match=rf"measured in another setting than this run's \({key}: model "):
        resolve_run(cfg, tmp_path / "run")


def test_a_fitted_run_refuses_a_model_that_records_no_setting(tmp_path):
    cfg, _ = fitted_run(tmp_path, {})
    with pytest.raises(BalanceError, match="model: not recorded, run 'tiny'.*trainer.time_model_steps=N"):
        resolve_run(cfg, tmp_path / "run")


def test_a_counts_run_only_reports_under_a_model_of_another_setting(tmp_path):
    cfg, _ = fitted_run(tmp_path, {"device": "NVIDIA-H200"})
    counts = parse_run_config(cfg_of(*FAST, f"balance.time_model={tmp_path / 'tm.json'}"))
    assert resolve_run(counts, tmp_path / "run").data.balance.cost == "counts"


def test_the_pipeline_strategy_refuses_it(tmp_path):
    with pytest.raises(ConfigError, match="trainer.time_model_steps times micro-batches one by one"):
        train(cfg_of(*FAST, "cluster.strategy=omnibal", "plan.use=uniform", "trainer.max_steps=2",
                     "trainer.time_model_steps=2", f"run_dir={tmp_path}"))


@pytest.mark.parametrize("strategy", ["ddp_fork", "ddp_notebook_find_unused_parameters_true"])
def test_a_gpu_run_that_forks_refuses_to_read_the_setting_before_cuda_is_touched(tmp_path, strategy):
    # reading the GPU's name initialises CUDA, after which Lightning cannot fork the run's processes
    TimeModel([0.2, 3e-3, 5e-6, 0.1], 0.01, 24, 0.03, {**SETTING, "device": "NVIDIA-H200"}).save(tmp_path / "tm.json")
    cfg = parse_run_config(cfg_of(*FAST, "cluster.accelerator=gpu", f"cluster.strategy={strategy}",
                                  "balance.cost=fitted", f"balance.time_model={tmp_path / 'tm.json'}"))
    with pytest.raises(ConfigError, match=rf"cluster.strategy={strategy} forks its processes.*cluster.strategy=ddp"):
        resolve_run(cfg, tmp_path / "run")
    assert not torch.cuda.is_initialized()


def test_a_gpu_run_that_starts_processes_anew_reads_the_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr("omnibal_pl.train.time_calibration.resolve_backend", lambda *args: "flash")
    cfg = parse_run_config(cfg_of(*FAST, "cluster.accelerator=gpu", "cluster.strategy=ddp"))
    assert run_setting(cfg)["device"] == "NVIDIA-H200" and run_setting(cfg)["attention"] == "flash"


@pytest.mark.parametrize("scale, expect_spread", [((1.5, 1.5, 1.5, 1.5), False), ((3.0, 1.0, 1.0, 1.0), True)])
def test_the_log_holds_the_balances_model_against_the_runs_own_fit(tmp_path, caplog, scale, expect_spread):
    # a multiple of the truth balances exactly as the truth does (spread 0); weighing tiles 3x does not
    balance = TimeModel(list(TRUTH * np.array(scale)), fixed_s=FIXED_S * scale[1])
    table, clock = table_of(), FakeClock()
    callback = TimeModelCalibration(tmp_path / "time_model.json", table, steps=8, made_for=SETTING, skip_steps=1,
                                    clock=clock, balance_model=balance)
    run_steps(callback, table, clock, steps=12, per_step=3)
    features = np.asarray(callback.rows)[:, : len(TERMS)]
    ratio = (features @ (TRUTH * np.array(scale)) + FIXED_S * scale[1]) / (features @ TRUTH + FIXED_S)
    assert (ratio.std() / ratio.mean() > 0.02) == expect_spread
    assert (f"predicts this run's timed micro-batches at {np.median(ratio):.2f}x its own fit" in caplog.text
            and f"varies by {100 * ratio.std() / ratio.mean():.1f}% between them" in caplog.text)
    if not expect_spread:
        assert "at 1.50x its own fit" in caplog.text and "varies by 0.0%" in caplog.text


def test_a_run_balancing_by_a_model_hands_it_to_its_calibration(tmp_path):
    cfg, _ = fitted_run(tmp_path, None, "trainer.time_model_steps=2", f"run_dir={tmp_path / 'run'}")
    trainer, _, _ = build_run(resolve_run(cfg, tmp_path / "run"))
    (calibration,) = [c for c in trainer.callbacks if isinstance(c, TimeModelCalibration)]
    assert calibration.balance_model == TimeModel.load(tmp_path / "tm.json")
