"""The baselines beside balanced: LLaMA-Factory's greedy knapsack, ms-swift's bin packing, DistTrain's LPT deal."""
from __future__ import annotations

import bisect

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omnibal_pl.balance import BalanceConfig, balance_metrics, form_steps, group_samples, resolve_caps
from omnibal_pl.balance.steps import arrange_steps
from omnibal_pl.errors import BalanceError
from omnibal_pl.lengths import LengthTable


def llamafactory_knapsacks(lengths: list[int], capacity: int) -> list[list[int]]:
    """LLaMA-Factory's packing as its docs describe it (sorted list, bisect for the largest fit, pop)."""
    numbers = sorted(lengths)
    knapsacks = []
    while numbers:
        sack, room = [], capacity
        while True:
            k = bisect.bisect_right(numbers, room) - 1
            if k < 0:
                break
            room -= numbers[k]
            sack.append(numbers.pop(k))
        knapsacks.append(sack)
    return knapsacks


def token_multisets(table: LengthTable, g) -> list[tuple[int, ...]]:
    return sorted(tuple(sorted(table.tokens[g.group(k)].tolist())) for k in range(len(g)))


@st.composite
def tables(draw, max_n=400):
    n = draw(st.integers(1, max_n))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    vit = rng.integers(1, 13, n)
    return LengthTable.from_arrays(vit, vit * rng.integers(100, 300, n) + rng.integers(1, 400, n))


@settings(max_examples=40, deadline=None)
@given(table=tables(), seed=st.integers(0, 2**31), cap=st.integers(3000, 9000))
def test_llamafactory_packs_exactly_like_the_published_knapsack(table, seed, cap):
    g = group_samples(table, BalanceConfig(algorithm="llamafactory", token_cap=cap, seed=seed))
    np.testing.assert_array_equal(np.sort(g.indices), np.arange(len(table)))
    over = table.tokens > cap
    expected = [tuple(sorted(s)) for s in llamafactory_knapsacks(table.tokens[~over].tolist(), cap)]
    expected += [(int(t),) for t in table.tokens[over]]
    assert token_multisets(table, g) == sorted(expected)
    assert g.oversize == int(over.sum()) and g.token_cap == cap
    assert g.vit_cap == int(g.sums(table)[0].max())  # tiles uncapped: the shape is the largest group's


def test_packers_shuffle_their_groups_per_seed():
    table = LengthTable.from_arrays(np.ones(2000, int), np.random.default_rng(0).integers(100, 2000, 2000))
    for algorithm in ("llamafactory", "swift"):
        a, b = (group_samples(table, BalanceConfig(algorithm=algorithm, token_cap=4000), seed=s) for s in (0, 1))
        assert a.sizes().tolist() != b.sizes().tolist()  # not the packing order: the trainer shuffles


@settings(max_examples=15, deadline=None)
@given(table=tables(max_n=300), seed=st.integers(0, 2**31))
def test_swift_one_chunk_equals_binpacking_itself(table, seed):
    binpacking = pytest.importorskip("binpacking")
    cap = 6000
    g = group_samples(table, BalanceConfig(algorithm="swift", token_cap=cap, seed=seed))
    np.testing.assert_array_equal(np.sort(g.indices), np.arange(len(table)))
    fits = [(i, int(t)) for i, t in enumerate(table.tokens) if t <= cap]
    bins = [b for b in binpacking.to_constant_volume(fits, cap, weight_pos=1) if b] if fits else []
    expected = sorted(tuple(sorted(t for _, t in b)) for b in bins)
    expected = sorted(expected + [(int(t),) for t in table.tokens[table.tokens > cap]])
    assert token_multisets(table, g) == expected


def test_swift_chunks_carry_their_last_bin_and_lose_nothing():
    pytest.importorskip("binpacking")
    rng = np.random.default_rng(3)
    table = LengthTable.from_arrays(rng.integers(1, 13, 2600), rng.integers(50, 3000, 2600))
    g = group_samples(table, BalanceConfig(algorithm="swift", token_cap=4096))
    np.testing.assert_array_equal(np.sort(g.indices), np.arange(len(table)))
    tokens = g.sums(table)[1]
    assert tokens.max() <= 4096
    assert tokens.mean() / 4096 > 0.95  # chunked packing still fills the volume


def test_packer_oversize_error_names_the_sample():
    table = LengthTable.from_arrays([1, 2, 3], [100, 9000, 200])
    for algorithm in ("llamafactory", "swift"):
        with pytest.raises(BalanceError, match="sample 1"):
            group_samples(table, BalanceConfig(algorithm=algorithm, token_cap=4096, oversize="error"))
        with pytest.raises(BalanceError, match="token cap"):
            group_samples(table, BalanceConfig(algorithm=algorithm))


def test_packers_take_the_token_cap_balanced_searches(real_lengths):
    cfg = BalanceConfig(dp=8)
    ours = resolve_caps(real_lengths, cfg)
    packer = resolve_caps(real_lengths, BalanceConfig(algorithm="llamafactory", dp=8))
    assert (packer.vit_cap, packer.token_cap) == (0, ours.token_cap)


def test_lpt_hand_case():
    cost = np.array([10.0, 9.0, 2.0, 1.0])
    steps = form_steps(np.ones(4), np.ones(4), dp=2, micro_batches=2, order="lpt", seed=0, cost=cost)
    # 10 -> rank 0, 9 -> rank 1, 2 -> rank 1 (9 < 10), 1 -> rank 0; each rank runs its smaller one first
    np.testing.assert_array_equal(steps.groups, [[[3, 0], [2, 1]]])


def test_lpt_puts_the_smallest_micro_batches_at_both_ends():
    cost = np.array([5.0, 1.0, 4.0, 2.0, 3.0])
    steps = form_steps(np.ones(5), np.ones(5), dp=1, micro_batches=5, order="lpt", seed=0, cost=cost)
    assert cost[steps.groups[0, 0]].tolist() == [1.0, 3.0, 5.0, 4.0, 2.0]


@pytest.mark.parametrize("dp, micro", [(8, 1), (4, 3), (16, 4)])
def test_lpt_fills_every_slot_once_and_beats_sequential(dp, micro):
    rng = np.random.default_rng(dp * micro)
    cost = rng.lognormal(0, 0.6, 40 * dp * micro + 3)
    lpt = form_steps(cost, cost, dp, micro, "lpt", 0, cost)
    seq = form_steps(cost, cost, dp, micro, "sequential", 0)
    np.testing.assert_array_equal(np.sort(lpt.groups.reshape(-1)), np.arange(lpt.groups.size))
    assert lpt.leftover.tolist() == list(range(lpt.groups.size, len(cost)))
    # every step keeps its own groups (LPT deals inside a step, it does not reorder steps)
    per_step = np.sort(lpt.groups.reshape(len(lpt.groups), -1), axis=1)
    np.testing.assert_array_equal(per_step, np.sort(seq.groups.reshape(len(seq.groups), -1), axis=1))
    peak = lambda s: cost[s.groups].sum(axis=2).max(axis=1).mean()  # noqa: E731
    if micro > 1:
        assert peak(lpt) < 0.97 * peak(seq)
    else:
        assert peak(lpt) == pytest.approx(peak(seq))


def test_disttrain_balances_tokens_better_than_random_with_micro_batches(real_lengths):
    results = {}
    for algorithm in ("disttrain", "random"):
        cfg = BalanceConfig(algorithm=algorithm, dp=8, micro_batches=4)
        g = group_samples(real_lengths, cfg)
        results[algorithm] = balance_metrics(real_lengths, g, arrange_steps(real_lengths, g, cfg))
    assert results["disttrain"]["groups"] == results["random"]["groups"]  # same fixed-count micro-batches
    assert results["disttrain"]["llm_dist_ratio"] < 0.5 * results["random"]["llm_dist_ratio"]
