"""Sample exchange between the ranks of a step (``cost=fitted``): hand case, brute force, caps, sampler."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from omnibal_pl.balance import BalanceConfig, BalancedSampler, Grouping, TimeModel, arrange, exchange_samples, form_steps
from omnibal_pl.balance import Steps, balance_metrics, group_samples
from omnibal_pl.balance.cost import sample_features
from omnibal_pl.errors import ConfigError
from omnibal_pl.lengths import LengthTable

TOKENS_ONLY = TimeModel([0.0, 1.0, 0.0, 0.0])  # a sample costs its tokens


def rank_loads(table: LengthTable, grouping: Grouping, steps: Steps, model: TimeModel) -> np.ndarray:
    """[steps, dp] summed modelled cost of each rank's samples."""
    cost = sample_features(table) @ np.asarray(model.coefficients)
    per_group = np.array([cost[grouping.group(g)].sum() for g in range(len(grouping))])
    return per_group[steps.groups].sum(axis=2)


def test_the_exchange_nearest_half_the_gap_is_made():
    # rank 0 holds 42 + 23 + 15 = 80 tokens, rank 1 holds 10: gap 70, half of it 35. Moves shift 42, 23 or 15;
    # swaps against the 10 shift 32, 13 or 5. The nearest to 35 is the swap 42 <-> 10: loads 48 and 42.
    table = LengthTable.from_arrays([1, 1, 1, 1], [42, 23, 15, 10])
    g = Grouping(np.arange(4), np.array([0, 3, 4]), vit_cap=4, token_cap=100, algorithm="balanced")
    steps = Steps(np.array([[[0], [1]]]), np.zeros(0, np.int64))
    out = exchange_samples(table, g, steps, TOKENS_ONLY, sweeps=4)
    assert sorted(out.group(0).tolist()) == [1, 2, 3] and out.group(1).tolist() == [0]


def test_an_exchange_that_passes_a_cap_is_not_made():
    # as above, but the light group may hold at most 40 tokens: the swap (42 in) and the move of 42 are out;
    # left: move 23 (shift 23) or 15, swap 23 <-> 10 (13) or 15 <-> 10 (5): nearest to 35 is the move of 23
    table = LengthTable.from_arrays([1, 1, 1, 1], [42, 23, 15, 10])
    g = Grouping(np.arange(4), np.array([0, 3, 4]), vit_cap=4, token_cap=100, algorithm="balanced")
    g_capped = replace(g, token_cap=40)
    steps = Steps(np.array([[[0], [1]]]), np.zeros(0, np.int64))
    # the heavy group is over 40 already (as a solo oversize group would be); it may only shrink
    out = exchange_samples(table, g_capped, steps, TOKENS_ONLY, sweeps=1)
    assert sorted(out.group(0).tolist()) == [0, 2] and sorted(out.group(1).tolist()) == [1, 3]
    # tiles bind too: with a tile cap of 1 the light group cannot take a second sample, only swap
    out = exchange_samples(table, replace(g, vit_cap=3), steps, TOKENS_ONLY, sweeps=1)
    assert sorted(out.group(0).tolist()) == [1, 2, 3] and out.group(1).tolist() == [0]


def test_a_group_keeps_its_last_sample():
    # two micro-batches per rank: rank 0 holds {18} and {40}, rank 1 {10} and {6, 7}: gap 35. Moving the lone 18
    # would leave the loads 40 and 41, but it would empty a micro-batch; the best allowed is the swap 18 <-> 6
    # (loads 46 and 35), after which only the lone 6 could move again.
    table = LengthTable.from_arrays([1] * 5, [18, 40, 10, 6, 7])
    g = Grouping(np.arange(5), np.array([0, 1, 2, 3, 5]), vit_cap=10, token_cap=100, algorithm="balanced")
    steps = Steps(np.array([[[0, 1], [2, 3]]]), np.zeros(0, np.int64))
    out = exchange_samples(table, g, steps, TOKENS_ONLY, sweeps=4)
    assert [sorted(out.group(k).tolist()) for k in range(4)] == [[3], [1], [2], [0, 4]]


def best_single_exchange(table: LengthTable, heavy: list[int], light: list[int], caps: tuple[int, int]) -> float:
    """Brute force: the least |gap - 2 d| over every allowed move and swap from ``heavy`` to ``light`` (inf: none)."""
    tok, vit = table.tokens.astype(float), table.vit
    gap = tok[heavy].sum() - tok[light].sum()

    def fits(group: list[int]) -> bool:
        return vit[group].sum() <= caps[0] and tok[group].sum() <= caps[1]

    best = np.inf
    for i in heavy:
        rest = [x for x in heavy if x != i]
        if rest and fits(light + [i]) and 0 < tok[i] < gap:
            best = min(best, abs(gap - 2 * tok[i]))
        for k in light:
            d = tok[i] - tok[k]
            if 0 < d < gap and fits(rest + [k]) and fits([x for x in light if x != k] + [i]):
                best = min(best, abs(gap - 2 * d))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_one_sweep_of_two_ranks_makes_the_best_single_exchange(seed):
    rng = np.random.default_rng(seed)
    n_heavy, n_light = rng.integers(1, 5, size=2)
    n = n_heavy + n_light
    table = LengthTable.from_arrays(rng.integers(1, 4, n), rng.integers(1, 200, n))
    caps = (int(rng.integers(6, 12)), int(rng.integers(300, 700)))
    heavy, light = list(range(n_heavy)), list(range(n_heavy, n))
    if table.tokens[heavy].sum() < table.tokens[light].sum():
        heavy, light = light, heavy
    g = Grouping(np.array(heavy + light), np.array([0, len(heavy), n]), caps[0], caps[1], "balanced")
    steps = Steps(np.array([[[0], [1]]]), np.zeros(0, np.int64))
    out = exchange_samples(table, g, steps, TOKENS_ONLY, sweeps=1)
    gap = float(table.tokens[heavy].sum() - table.tokens[light].sum())
    after = abs(float(table.tokens[out.group(0)].sum() - table.tokens[out.group(1)].sum()))
    want = best_single_exchange(table, heavy, light, caps)
    assert after == (gap if np.isinf(want) else want)


def random_case(seed: int, dp: int, micro_batches: int):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(200, 400))
    table = LengthTable.from_arrays(rng.integers(1, 7, n), rng.integers(10, 600, n))
    cfg = BalanceConfig(dp=dp, micro_batches=micro_batches, vit_cap=int(rng.integers(6, 14)), token_cap=1200)
    g = group_samples(table, cfg)
    model = TimeModel([float(rng.uniform(0, 1)), 1e-3, 1e-6, float(rng.uniform(0, 0.5))])
    steps = form_steps(*g.sums(table), dp, micro_batches, "matched", seed, cost=None)
    return table, g, steps, model


@pytest.mark.parametrize("dp,micro_batches", [(2, 1), (4, 2), (8, 1), (3, 3)])
def test_exchanges_keep_caps_and_samples_and_lower_every_step(dp, micro_batches):
    total_before = total_after = 0.0
    for seed in range(15):
        table, g, steps, model = random_case(seed, dp, micro_batches)
        out = exchange_samples(table, g, steps, model, sweeps=8)
        assert len(out) == len(g) and np.all(out.sizes() >= 1)
        vit, tok = out.sums(table)
        changed = np.flatnonzero(np.array([not np.array_equal(np.sort(out.group(k)), np.sort(g.group(k)))
                                          for k in range(len(g))]))
        assert np.all(vit[changed] <= g.vit_cap) and np.all(tok[changed] <= g.token_cap)
        for k in steps.leftover:  # groups in no step are not touched
            assert np.array_equal(out.group(k), g.group(k))
        for grid in steps.groups:  # samples move only between the groups of one step
            assert np.array_equal(np.sort(np.concatenate([out.group(k) for k in grid.ravel()])),
                                  np.sort(np.concatenate([g.group(k) for k in grid.ravel()])))
        before, after = rank_loads(table, g, steps, model), rank_loads(table, out, steps, model)
        assert np.all(after.max(axis=1) <= before.max(axis=1) + 1e-9)
        total_before += float((before.max(axis=1) - before.mean(axis=1)).sum())
        total_after += float((after.max(axis=1) - after.mean(axis=1)).sum())
    # the slowest rank's lead over the mean shrinks (how far, the caps decide: groups full in tiles only swap)
    assert total_after < 0.95 * total_before


def test_more_sweeps_never_leave_a_step_less_even():
    table, g, steps, model = random_case(3, 8, 1)
    spread = [np.ptp(rank_loads(table, exchange_samples(table, g, steps, model, sweeps=s), steps, model), axis=1).sum()
              for s in (0, 1, 2, 8)]
    assert spread[0] > spread[1] >= spread[2] >= spread[3]


def test_bad_step_groups_are_refused():
    table = LengthTable.from_arrays([1, 1, 1, 1], [5, 5, 5, 5])
    g = Grouping(np.arange(4), np.array([0, 2, 4]), 4, 100, "balanced")
    with pytest.raises(ValueError, match="two steps"):
        exchange_samples(table, g, Steps(np.array([[[0], [0]]]), np.zeros(0, np.int64)), TOKENS_ONLY, 1)
    with pytest.raises(ValueError, match="out of range"):
        exchange_samples(table, g, Steps(np.array([[[0], [2]]]), np.zeros(0, np.int64)), TOKENS_ONLY, 1)


def test_arrange_exchanges_only_under_a_fitted_cost_with_matched_steps(tmp_path):
    table, _, _, model = random_case(5, 4, 1)
    cfg = BalanceConfig(dp=4, vit_cap=10, token_cap=1200, cost="fitted", time_model=str(model.save(tmp_path / "m.json")))
    g = group_samples(table, cfg)
    exchanged, steps = arrange(table, g, cfg, time_model=model)
    assert not np.array_equal(exchanged.indices, g.indices)
    assert balance_metrics(table, exchanged, steps, model)["max_mean_time"] < \
        balance_metrics(table, g, steps, model)["max_mean_time"]
    for same in (replace(cfg, exchange_sweeps=0), replace(cfg, step_order="sequential")):
        assert arrange(table, g, same, time_model=model)[0] is g
    assert arrange(table, g, cfg, time_model=None)[0] is g  # counts: steps_weight gives no model


def test_exchange_sweeps_must_not_be_negative():
    with pytest.raises(ConfigError, match="exchange_sweeps"):
        BalanceConfig(exchange_sweeps=-1)


def test_sampler_under_a_fitted_cost_yields_every_sample_once_and_evens_modelled_time(real_lengths, tmp_path):
    model = TimeModel([0.24, 2.9e-3, 5.6e-6, 0.165])  # the shape of bench_train's internvl_100m fit (seconds)
    path = str(model.save(tmp_path / "m.json"))
    table = real_lengths.subset(np.arange(4000))
    cfg = BalanceConfig(dp=8, vit_cap=12, token_cap=3000, cost="fitted", time_model=path)
    reports = {}
    for sweeps in (0, 8):
        ranks = [BalancedSampler(table, replace(cfg, exchange_sweeps=sweeps), r) for r in range(8)]
        assert len({s.arrangement(0).digest for s in ranks}) == 1  # every rank builds the same epoch
        seen = np.concatenate([np.fromiter(iter(s), np.int64) for s in ranks] + [ranks[0].leftover(0)])
        assert np.array_equal(np.sort(seen), np.arange(len(table)))
        reports[sweeps] = ranks[0].report(0)
    assert reports[8]["max_mean_time"] - 1 < 0.5 * (reports[0]["max_mean_time"] - 1)
