"""Micro-batch time model: features, least-squares fit, bad fits refused, fitted cost evens modelled rank time."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from omnibal_pl.balance import BalanceConfig, TimeModel, balance_metrics, fit_time_model, group_features, group_samples
from omnibal_pl.balance.cost import nonnegative_lstsq
from omnibal_pl.balance.grouping import Grouping
from omnibal_pl.balance.sampler import BalancedSampler
from omnibal_pl.balance.steps import arrange_steps
from omnibal_pl.errors import BalanceError, ConfigError
from omnibal_pl.lengths import LengthTable


def test_group_features_hand_case():
    table = LengthTable.from_arrays([1, 3, 2], [10, 20, 30])
    g = Grouping(np.array([0, 1, 2]), np.array([0, 2, 3]), 4, 30, "test")
    # tiles, tokens, sum of squared lengths (not the square of the sum), samples
    np.testing.assert_array_equal(group_features(table, g), [[4, 30, 500, 2], [2, 30, 900, 1]])


def test_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    n = 60
    samples = rng.integers(1, 8, n)
    tiles = samples * rng.integers(1, 6, n)
    tokens = tiles * 256 + rng.integers(10, 900, n)
    features = np.stack([tiles, tokens, tokens**2 / samples, samples], axis=1).astype(float)
    truth = np.array([2e-3, 1e-5, 3e-10, 4e-3])
    seconds = features @ truth * (1 + rng.normal(0, 0.002, n))
    model = fit_time_model(features, seconds)
    np.testing.assert_allclose(model.coefficients, truth, rtol=0.15)
    assert model.fitted_on == n and model.rms_error < 0.005 * seconds.mean()
    np.testing.assert_allclose(model.predict(features), seconds, rtol=0.01)


def test_fit_refuses_too_few_micro_batches():
    features = np.ones((11, 4))
    with pytest.raises(BalanceError, match="at least 12 measured micro-batches, got 11"):
        fit_time_model(features, np.ones(11))


def test_fit_separates_nearly_collinear_terms_without_a_negative_coefficient():
    # tokens are mostly 64 image tokens per tile: unconstrained least squares trades tiles against tokens and
    # gives one of them a negative coefficient; the non-negative fit keeps both >= 0 and still fits the times
    rng = np.random.default_rng(1)
    n = 40
    samples = rng.integers(1, 6, n)
    tiles = samples * rng.integers(1, 8, n)
    tokens = 64 * tiles + rng.integers(0, 3, n)
    features = np.stack([tiles, tokens, tokens**2 / samples, samples], axis=1).astype(float)
    seconds = features @ np.array([0.0, 1e-4, 0.0, 2e-3]) * (1 + rng.normal(0, 0.01, n))
    unconstrained, *_ = np.linalg.lstsq(features, seconds, rcond=None)
    assert unconstrained.min() < 0  # the case this test is about
    model = fit_time_model(features, seconds)
    assert min(model.coefficients) >= 0
    assert model.rms_error < 0.02 * seconds.mean()  # dropping the negative terms of the plain fit misses by far more


def test_fit_refuses_times_its_terms_do_not_explain():
    rng = np.random.default_rng(3)
    features = rng.uniform(1, 10, (40, 4))
    with pytest.raises(BalanceError, match=r"misses the measured times by .* \(more than 25%\)"):
        fit_time_model(features, rng.uniform(0.1, 10, 40))  # times unrelated to the work


def test_a_stored_model_with_a_negative_coefficient_is_refused():
    with pytest.raises(BalanceError, match=r"negative coefficients \(tokens=-1\)"):
        TimeModel([1.0, -1.0, 0.0, 0.0])


def test_nonnegative_lstsq_is_the_constrained_optimum():
    rng = np.random.default_rng(4)
    for _ in range(20):
        a, b = rng.normal(size=(12, 4)), rng.normal(size=12)
        x = nonnegative_lstsq(a, b)
        assert x.min() >= 0
        # no non-negative point nearby does better (first-order optimality, checked by sampling)
        residual = np.sum((a @ x - b) ** 2)
        trials = np.maximum(x + rng.normal(0, 0.05, (200, 4)), 0)
        assert np.all(np.sum((trials @ a.T - b) ** 2, axis=1) >= residual - 1e-12)


def test_save_load_round_trip_and_wrong_terms(tmp_path):
    model = TimeModel([1e-3, 2e-6, 3e-11, 4e-4], 0.01, 40)
    assert TimeModel.load(model.save(tmp_path / "m.json")) == model
    (tmp_path / "bad.json").write_text('{"terms": ["tiles"], "coefficients": [1]}')
    with pytest.raises(BalanceError, match="refit"):
        TimeModel.load(tmp_path / "bad.json")


def test_fitted_cost_needs_a_model_path():
    with pytest.raises(ConfigError, match="balance.time_model"):
        BalanceConfig(cost="fitted")


def test_fitted_cost_evens_modelled_rank_time(real_lengths, tmp_path):
    # attention-heavy model: sum of squared lengths is what the caps do not even out
    model = TimeModel([1e-3, 2e-6, 1e-9, 5e-3])
    cfg = BalanceConfig(dp=32, vit_cap=18, token_cap=5280)
    g = group_samples(real_lengths, cfg)
    counts = balance_metrics(real_lengths, g, arrange_steps(real_lengths, g, cfg), model)
    fitted = balance_metrics(real_lengths, g, arrange_steps(real_lengths, g, cfg, time_model=model), model)
    assert fitted["max_mean_time"] <= 1.002 < counts["max_mean_time"]
    assert fitted["time_dist_ratio"] < 0.5 * counts["time_dist_ratio"]
    # groups still fill the caps, so the tiles stay even; tokens give way where attention costs more
    assert fitted["vit_dist_ratio"] <= 0.005 and fitted["llm_dist_ratio"] <= 0.02
    # the sampler takes the stored model through the config
    stored = replace(cfg, cost="fitted", time_model=str(model.save(tmp_path / "m.json")))
    report = BalancedSampler(real_lengths, stored, 0).report(0)
    assert report["max_mean_time"] <= 1.002


def test_metrics_report_time_only_with_a_model():
    table = LengthTable.from_arrays([1, 1, 1, 1], [10, 10, 10, 40])
    cfg = BalanceConfig(algorithm="random", dp=2, samples_per_group=1)
    g = Grouping(np.arange(4), np.arange(5), 1, 40, "random")
    steps = arrange_steps(table, g, cfg)
    assert "time_dist_ratio" not in balance_metrics(table, g, steps)
    m = balance_metrics(table, g, steps, TimeModel([0.0, 1.0, 0.0, 0.0]))
    # steps (10, 10) and (10, 40): max/mean 1 and 1.6
    assert m["max_mean_time"] == pytest.approx(1.3)
    assert m["time_dist_ratio"] == pytest.approx((0 + 30 / 80) / 2)


def test_a_term_absent_from_the_times_fits_to_exactly_zero():
    rng = np.random.default_rng(2)
    features = np.stack([rng.integers(1, 20, 50), rng.integers(100, 5000, 50), rng.integers(10**4, 10**7, 50),
                         rng.integers(1, 8, 50)], axis=1).astype(float)
    seconds = features[:, :3] @ np.array([3e-3, 2e-5, 4e-10])  # no per-sample cost: rounding may come out below 0
    model = fit_time_model(features, seconds)
    assert model.coefficients[3] == 0.0 and model.coefficients[0] == pytest.approx(3e-3)


def test_fixed_and_step_costs_are_fitted_apart_from_the_terms():
    # every micro-batch pays 50 ms of overhead and the one ending a step 200 ms of optimizer step: without the
    # step's indicator no non-negative model explains the times
    rng = np.random.default_rng(5)
    n = 48
    samples = rng.integers(1, 7, n)
    tiles = samples * rng.integers(1, 6, n)
    tokens = tiles * 256 + rng.integers(10, 900, n) * samples
    features = np.stack([tiles, tokens, tokens**2 / samples, samples], axis=1).astype(float)
    truth = np.array([2e-3, 1e-5, 3e-10, 4e-3])
    ends_step = (np.arange(n) % 2 == 1).astype(float)
    seconds = features @ truth + 0.05 + 0.2 * ends_step
    model = fit_time_model(features, seconds, step_ends=ends_step)
    np.testing.assert_allclose(model.coefficients, truth, rtol=1e-6)
    assert model.fixed_s == pytest.approx(0.05) and model.rms_error < 1e-9
    np.testing.assert_allclose(model.predict(features), seconds - 0.2 * ends_step)  # the step's own cost left out
    with pytest.raises(BalanceError, match="misses the measured times"):
        fit_time_model(features, seconds)
