"""Partition search, exact optimum and per-stage recompute against brute force; bad inputs."""
from __future__ import annotations

import dataclasses
import time
from itertools import combinations, product

import numpy as np
import pytest

from omnibal_pl.errors import PlanError
from omnibal_pl.plan.baselines import parameter_partition, torchtitan_partition, uniform_partition
from omnibal_pl.model.block import RECOMPUTE_MODES
from omnibal_pl.plan.costs import BlockCost, CostProfile
from omnibal_pl.plan.partition import ScoredPartition, evaluate_partition, exact_partition, search_partition
from omnibal_pl.plan.recompute import choose_recompute
from omnibal_pl.plan.schedule import PipelineConfig, stage_multipliers
from omnibal_pl.plan.stage_costs import StageCosts, bottleneck_bounds, min_bottleneck
from omnibal_pl.plan.synthetic import GIB, synthetic_profile


def brute_force(profile: CostProfile, config: PipelineConfig, policy: str = "adaptive"
                ) -> tuple[float, ScoredPartition | None]:
    """Least simulated step over every contiguous partition (inf when none fits), and the worst
    partition that fits: an incumbent that leaves all the work to the exact search."""
    n, best, worst = len(profile.blocks), float("inf"), None
    for cuts in combinations(range(1, n), config.num_stages - 1):
        try:
            scored = evaluate_partition(profile, config, (0, *cuts, n), policy)
        except PlanError:
            continue
        best = min(best, scored.step_s)
        worst = scored if worst is None or scored.step_s > worst.step_s else worst
    return best, worst


def least_need(profile: CostProfile, config: PipelineConfig) -> float:
    """A budget between 'nothing fits' and 'everything fits without recompute': a third of the way up
    from the least to the most the uniform split's worst rank needs."""
    bounds = uniform_partition(profile, config.num_stages)
    mult = stage_multipliers(config)

    def worst_rank(mode: str) -> float:
        need = [0.0] * config.pp
        for s, (i, j) in enumerate(zip(bounds, bounds[1:])):
            need[config.rank_of(s)] += sum(b.static_bytes + mult[s] * b.activation_bytes(mode)
                                           for b in profile.blocks[i:j])
        return max(need)

    low, high = worst_rank("full"), worst_rank("none")
    return low + (high - low) / 3


CASES = [
    # (vision blocks, llm layers, pp, micro-batches, schedule, virtual stages, seed)
    (3, 4, 3, 4, "1f1b", 1, 0),
    (2, 5, 2, 3, "1f1b", 1, 1),
    (4, 3, 4, 8, "1f1b", 1, 2),
    (3, 4, 3, 3, "gpipe", 1, 3),
    (2, 4, 2, 4, "interleaved", 2, 4),
    (4, 4, 3, 2, "1f1b", 1, 5),
    (3, 5, 3, 6, "interleaved", 2, 6),
]


@pytest.mark.parametrize("vision,llm,pp,m,schedule,v,seed", CASES)
@pytest.mark.parametrize("tight", [False, True])
def test_exact_matches_brute_force(vision, llm, pp, m, schedule, v, seed, tight) -> None:
    profile = synthetic_profile(vision, llm, seed=seed, jitter=0.4)
    config = PipelineConfig(pp=pp, micro_batches=m, schedule=schedule, virtual_stages=v, hop_s=1e-4)
    if tight:
        config = PipelineConfig(pp=pp, micro_batches=m, schedule=schedule, virtual_stages=v, hop_s=1e-4,
                                memory_budget_bytes=least_need(profile, config))
    expected, worst = brute_force(profile, config)
    assert expected < float("inf")
    exact = exact_partition(profile, config)
    assert exact.step_s == pytest.approx(expected, rel=1e-12)
    assert exact_partition(profile, config, incumbent=worst).step_s == pytest.approx(expected, rel=1e-12)
    search = search_partition(profile, config)
    assert search.step_s >= expected * (1 - 1e-12)
    if tight:  # the budget really binds: the best plan recomputes something
        assert set(exact.modes) != {"none"}


def test_exact_matches_brute_force_on_random_cases() -> None:
    rng = np.random.default_rng(1)
    for case in range(16):
        pp = int(rng.integers(2, 4))
        schedule = str(rng.choice(["1f1b", "gpipe", "interleaved"]))
        v = 2 if schedule == "interleaved" else 1
        m = pp * int(rng.integers(1, 4)) if v == 2 else int(rng.integers(1, 9))
        profile = synthetic_profile(int(rng.integers(1, 4)), int(rng.integers(2, 5)) + (2 * v), seed=100 + case,
                                    jitter=0.6, vision_cost=float(rng.uniform(0.2, 2.0)))
        hop = float(rng.choice([0.0, 1e-3, 5e-3]))
        config = PipelineConfig(pp=pp, micro_batches=m, schedule=schedule, virtual_stages=v, hop_s=hop)
        config = dataclasses.replace(config, memory_budget_bytes=least_need(profile, config) * float(rng.uniform(1, 2)))
        expected, worst = brute_force(profile, config)
        assert exact_partition(profile, config, incumbent=worst).step_s == pytest.approx(expected, rel=1e-12), case


def test_search_within_one_percent_of_exact_on_random_cases() -> None:
    rng = np.random.default_rng(0)
    worst = 0.0
    for case in range(12):
        vision, llm = int(rng.integers(4, 25)), int(rng.integers(6, 33))
        pp = int(rng.choice([2, 3, 4]))
        m = int(rng.choice([pp, 2 * pp, 8]))
        profile = synthetic_profile(vision, llm, seed=case, jitter=0.5, vision_cost=float(rng.uniform(0.2, 1.5)))
        config = PipelineConfig(pp=pp, micro_batches=m, hop_s=1e-4)
        config = PipelineConfig(pp=pp, micro_batches=m, hop_s=1e-4,
                                memory_budget_bytes=least_need(profile, config) * float(rng.uniform(1.0, 1.5)))
        search = search_partition(profile, config)
        exact = exact_partition(profile, config, incumbent=search)
        assert exact.step_s <= search.step_s + 1e-12
        worst = max(worst, search.step_s / exact.step_s - 1)
    assert worst < 0.01


def test_search_time_100_blocks_8_stages() -> None:
    profile = synthetic_profile(30, 66, seed=7)  # 100 blocks
    assert len(profile.blocks) == 100
    config = PipelineConfig(pp=8, micro_batches=16, hop_s=1e-4, memory_budget_bytes=40 * GIB)
    start = time.perf_counter()
    search_partition(profile, config)
    assert time.perf_counter() - start < 10.0


def brute_recompute(blocks: list[BlockCost], mult: list[int], capacity: float) -> float:
    best = float("inf")
    for modes in product(RECOMPUTE_MODES, repeat=len(blocks)):
        kept = sum(n * b.activation_bytes(mo) for b, n, mo in zip(blocks, mult, modes))
        if kept <= capacity:
            best = min(best, sum(b.recompute_s(mo) for b, mo in zip(blocks, modes)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_adaptive_recompute_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    blocks = synthetic_profile(3, 3, seed=seed, jitter=0.6).blocks[:7]
    mult = [int(x) for x in rng.integers(1, 5, size=len(blocks))]
    everything = sum(n * b.act_none_bytes for b, n in zip(blocks, mult))
    least = sum(n * b.act_full_bytes for b, n in zip(blocks, mult))
    for fraction in (0.0, 0.1, 0.3, 0.5, 0.8, 1.0):
        capacity = least + fraction * (everything - least)
        choice = choose_recompute(blocks, mult, capacity)
        expected = brute_recompute(blocks, mult, capacity)
        assert choice is not None
        assert choice.recompute_s == pytest.approx(expected, abs=1e-15)
        kept = sum(n * b.activation_bytes(mo) for b, n, mo in zip(blocks, mult, choice.modes))
        assert choice.activation_bytes == pytest.approx(kept) and kept <= capacity
    assert choose_recompute(blocks, mult, least * 0.99) is None


def test_policies_order_time_and_memory() -> None:
    """adaptive never recomputes more than none_where_fits or global full; all fit the budget."""
    profile = synthetic_profile(12, 16, seed=3)
    config = PipelineConfig(pp=4, micro_batches=8)
    config = PipelineConfig(pp=4, micro_batches=8, memory_budget_bytes=least_need(profile, config))
    bounds = search_partition(profile, config).bounds
    scored = {p: evaluate_partition(profile, config, bounds, p) for p in ("adaptive", "none_where_fits", "full")}
    assert scored["adaptive"].step_s <= scored["none_where_fits"].step_s <= scored["full"].step_s
    for s in scored.values():
        assert max(s.sim.peak_memory_bytes) <= config.budget(0)
    # the 1F1B early stages hold more micro-batches, so they recompute at least as much as the last
    recompute = scored["adaptive"].recompute_s
    assert recompute[0] > 0 and recompute[-1] <= max(recompute)


def test_baselines_are_valid_partitions() -> None:
    profile = synthetic_profile(6, 10, seed=0)
    n = len(profile.blocks)
    assert n == 20 and uniform_partition(profile, 4) == (0, 5, 10, 15, 20)
    for bounds in (uniform_partition(profile, 4), parameter_partition(profile, 4), torchtitan_partition(profile, 4)):
        assert bounds[0] == 0 and bounds[-1] == n and all(a < b for a, b in zip(bounds, bounds[1:]))
    # torchtitan: the vision encoder and projector all on stage 0
    assert torchtitan_partition(profile, 4)[1] > 7
    params = [b.param_bytes for b in profile.blocks]
    worst = lambda bounds: max(sum(params[i:j]) for i, j in zip(bounds, bounds[1:]))  # noqa: E731
    assert worst(parameter_partition(profile, 4)) <= worst(uniform_partition(profile, 4))


def test_no_partition_fits_names_stage_need_budget_and_fix() -> None:
    profile = synthetic_profile(4, 8, seed=0)
    config = PipelineConfig(pp=2, micro_batches=4, memory_budget_bytes=8 * GIB)
    with pytest.raises(PlanError) as err:
        search_partition(profile, config)
    message = str(err.value)
    assert "stage" in message and "needs" in message and "budget 8.00 GiB" in message
    assert "pp=" in message  # the smallest fix: more stages
    with pytest.raises(PlanError, match="recompute policy 'adaptive'"):
        search_partition(profile, PipelineConfig(pp=4, micro_batches=4, memory_budget_bytes=10 * GIB), policy="none")


def test_more_stages_than_blocks() -> None:
    profile = synthetic_profile(1, 1)  # 6 blocks
    with pytest.raises(PlanError, match="7 pipeline stages .* only 6 blocks"):
        search_partition(profile, PipelineConfig(pp=7, micro_batches=7))
    with pytest.raises(PlanError, match="only 6 blocks"):
        exact_partition(profile, PipelineConfig(pp=4, micro_batches=4, schedule="interleaved", virtual_stages=2))


def test_profile_missing_a_block() -> None:
    profile = synthetic_profile(2, 2)
    names = profile.names
    with pytest.raises(PlanError, match="missing blocks \\['llm.layers.2'\\]"):
        profile.check_blocks([*names[:-1], "llm.layers.2", names[-1]])
    with pytest.raises(PlanError, match="different order"):
        profile.check_blocks(list(reversed(names)))


@pytest.mark.parametrize("vision,llm,pp,m,schedule,v,seed", [c for c in CASES if c[5] == 1])
def test_bottleneck_table_counts_recompute(vision, llm, pp, m, schedule, v, seed) -> None:
    """Under a budget that forces recompute, the least bottleneck of the dynamic program equals brute
    force over every partition on recompute-inclusive stage times (forward + backward + recompute)."""
    profile = synthetic_profile(vision, llm, seed=seed, jitter=0.4)
    config = PipelineConfig(pp=pp, micro_batches=m, schedule=schedule)
    config = dataclasses.replace(config, memory_budget_bytes=least_need(profile, config))
    costs = StageCosts(profile, config)
    n = len(profile.blocks)
    best, recomputes = float("inf"), False
    for cuts in combinations(range(1, n), pp - 1):
        try:
            scored = evaluate_partition(profile, config, (0, *cuts, n))
        except PlanError:
            continue
        best = min(best, max(f + b for f, b in zip(scored.forward_s, scored.backward_s)))
        recomputes |= any(r > 0 for r in scored.recompute_s)
    assert recomputes
    assert min_bottleneck(n, pp, costs.time)[0][0] == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("vision,llm,pp,m,seed", [(6, 9, 4, 8, 4), (6, 5, 3, 3, 22), (6, 3, 4, 8, 53)])
def test_search_is_no_worse_than_its_best_starting_candidate(vision, llm, pp, m, seed) -> None:
    """The descent starts from the best of the candidates around the balanced split (every boundary
    shifted by up to 2 blocks), so it ends at or below that candidate's step time."""
    profile = synthetic_profile(vision, llm, seed=seed, jitter=0.5)
    config = PipelineConfig(pp=pp, micro_batches=m, hop_s=1e-4)
    costs = StageCosts(profile, config)
    n = len(profile.blocks)
    balanced = bottleneck_bounds(min_bottleneck(n, pp, costs.time), costs.time)
    best = float("inf")
    for shifts in product(range(-2, 3), repeat=pp - 1):
        bounds = (0, *(b + d for b, d in zip(balanced[1:-1], shifts)), n)
        if all(a < b for a, b in zip(bounds, bounds[1:])):
            best = min(best, evaluate_partition(profile, config, bounds).step_s)
    assert search_partition(profile, config).step_s <= best * (1 + 1e-12)


def test_a_stage_reserves_its_transient_bytes_in_the_budget() -> None:
    """A stage fits when static + in-flight activations + transient bytes (the largest recompute transient,
    here at dp = 1) are within the budget, not before; the plan's stage memory counts all three."""
    profile = synthetic_profile(2, 4, jitter=0.0)
    n_blocks = len(profile.blocks)
    static = sum(b.static_bytes for b in profile.blocks)
    kept = sum(b.act_none_bytes for b in profile.blocks)
    transient = max(b.act_none_bytes - b.act_full_bytes for b in profile.blocks)
    n = stage_multipliers(PipelineConfig(pp=1, micro_batches=2))[0]
    need = static + n * kept + transient
    with pytest.raises(PlanError):
        evaluate_partition(profile, PipelineConfig(pp=1, micro_batches=2, memory_budget_bytes=need - transient / 2),
                           (0, n_blocks), "none")
    scored = evaluate_partition(profile, PipelineConfig(pp=1, micro_batches=2, memory_budget_bytes=need),
                                (0, n_blocks), "none")
    assert scored.transient_bytes == [transient]
