"""Calibration design for the time model: D-optimal picks, valid micro-batches, and fits that predict better."""
from __future__ import annotations

import numpy as np
import pytest

from omnibal_pl.balance import fit_time_model
from omnibal_pl.balance.calibration import candidate_groups, d_optimal_rows, design_calibration
from omnibal_pl.balance.cost import sample_features
from omnibal_pl.data.synthetic_lengths import synthetic_lengths
from omnibal_pl.errors import BalanceError
from omnibal_pl.lengths import LengthTable


def test_d_optimal_rows_takes_the_largest_row_then_the_new_direction():
    rows = np.array([[3.0, 0.0], [2.9, 0.1], [0.0, 1.0]])
    # first the largest row; then [0, 1], orthogonal to it, not the larger [2.9, 0.1] that adds almost nothing
    assert d_optimal_rows(rows, 2) == [0, 2]
    assert d_optimal_rows(rows, 3) == [0, 2, 1]  # every row once, none twice
    with pytest.raises(BalanceError, match="cannot pick 4 calibration micro-batches from 3 candidates"):
        d_optimal_rows(rows, 4)


def table_with_tokens_following_tiles() -> LengthTable:
    """Real-statistics lengths, text scaled down so that a sample's tokens are mostly its image tokens (64 per tile,
    internvl_100m's), as in bench_train: tiles and tokens nearly collinear."""
    raw = synthetic_lengths(400, seed=0)
    text = np.maximum((raw.tokens - 256 * raw.image_flag) // 4, 1)
    return LengthTable.from_arrays(raw.vit, 64 * raw.image_flag + text, raw.image_flag)


@pytest.mark.parametrize("design", ["d_optimal", "random"])
def test_design_calibration_gives_distinct_samples_within_the_size_limit(design):
    table = table_with_tokens_following_tiles()
    groups = design_calibration(table, 20, 6, design, seed=3)
    assert len(groups) == 20
    for ids in groups:
        assert 1 <= len(ids) <= 6 and len(set(ids.tolist())) == len(ids)
        assert ids.min() >= 0 and ids.max() < len(table)
    assert len({tuple(sorted(ids.tolist())) for ids in groups}) == 20  # no micro-batch timed twice
    assert [ids.tolist() for ids in design_calibration(table, 20, 6, design, seed=3)] == [ids.tolist() for ids in groups]


def test_candidates_include_micro_batches_from_each_end_of_the_data():
    table = table_with_tokens_following_tiles()
    groups = candidate_groups(table, 400, 4, np.random.default_rng(0))
    shortest, longest = np.quantile(table.tokens, [1 / 8, 7 / 8])
    assert any(table.tokens[ids].max() <= shortest for ids in groups if len(ids) == 4)  # all short
    assert any(table.tokens[ids].min() >= longest for ids in groups if len(ids) == 4)  # all long


def test_d_optimal_calibration_predicts_micro_batch_differences_better_than_random():
    """The point of the design: with the same measurement noise, fits on D-optimal micro-batches predict how
    balanced micro-batches (2-3 samples) differ in time closer to the truth than fits on random ones timing as
    many samples, over 12 noise draws."""
    table = table_with_tokens_following_tiles()
    per_sample = sample_features(table)
    truth, fixed = np.array([0.3, 4e-3, 1e-6, 0.1]), 0.2  # s per tile, token, squared length, sample; s per micro-batch
    rng = np.random.default_rng(5)
    probe = np.array([per_sample[rng.choice(len(table), int(rng.integers(2, 4)), replace=False)].sum(axis=0)
                      for _ in range(300)])
    true_t = probe @ truth + fixed

    def median_error(design: str, count: int) -> tuple[float, float]:
        errors, timed = [], 0
        for seed in range(12):
            groups = design_calibration(table, count, 6, design, seed=seed)
            timed += sum(len(g) for g in groups)
            features = np.array([per_sample[g].sum(axis=0) for g in groups])
            noise = 1 + np.random.default_rng(100 + seed).normal(0, 0.04, len(groups))
            predicted = fit_time_model(features, (features @ truth + fixed) * noise).predict(probe)
            # balance needs the differences between micro-batches, not the common part
            errors.append(np.sqrt(np.mean((predicted - predicted.mean() - (true_t - true_t.mean())) ** 2)) / true_t.std())
        return float(np.median(errors)), timed / 12

    optimal, optimal_timed = median_error("d_optimal", 18)
    random, random_timed = median_error("random", 24)
    assert optimal_timed <= random_timed * 1.05  # no more samples to time
    assert optimal < 0.6 * random, (optimal, random)


def test_design_calibration_refuses_bad_arguments():
    table = table_with_tokens_following_tiles()
    with pytest.raises(BalanceError, match="unknown calibration design 'sobol'"):
        design_calibration(table, 4, 2, "sobol")
    with pytest.raises(BalanceError, match="count >= 1 and max_samples >= 1"):
        design_calibration(table, 0, 2)
