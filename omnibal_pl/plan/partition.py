"""Contiguous partition of the block sequence into pipeline stages, scored by simulation.

A partition is given by its stage bounds ``0 = b_0 < b_1 < ... < b_S = n_blocks`` (stage ``s`` holds
``blocks[b_s:b_{s+1}]``, ``S = pp * virtual_stages``). Every partition is scored jointly with its
recompute: each stage gets the policy's choice that fits its rank's budget (for ``adaptive``, the least
recompute time), then one step is simulated; the score is the simulated step time.

- :func:`search_partition` is OmniBal's search: start from the balanced split (least bottleneck stage
  time, found exactly by dynamic programming), rank the candidates made by shifting its boundaries by up
  to ``radius`` blocks with the simulator, then descend by single-boundary shifts from the best.
- :func:`exact_partition` is the optimum for comparison (see its docstring for what is exact).
- :mod:`omnibal_pl.plan.baselines` has the uniform, parameter-balanced and torchtitan splits.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import product
from typing import Sequence

from omnibal_pl.errors import PlanError
from omnibal_pl.plan.costs import CostProfile
from omnibal_pl.plan.infeasible import explain_infeasible
from omnibal_pl.plan.recompute import RecomputeChoice
from omnibal_pl.plan.schedule import PipelineConfig, rank_programs
from omnibal_pl.plan.simulator import SimResult, simulate, step_time
from omnibal_pl.plan.stage_costs import INF, StageCosts, bottleneck_bounds, min_bottleneck


@dataclass
class ScoredPartition:
    """A partition with its recompute choice and simulated step. Per-stage lists have ``S`` entries;
    ``backward_s`` includes recompute; ``activation_bytes`` is kept per micro-batch."""

    bounds: tuple[int, ...]
    policy: str
    modes: tuple[str, ...]
    forward_s: list[float]
    backward_s: list[float]
    recompute_s: list[float]
    activation_bytes: list[float]
    static_bytes: list[float]
    transient_bytes: list[float]
    sim: SimResult

    @property
    def step_s(self) -> float:
        return self.sim.step_s


def check_stage_count(n_blocks: int, config: PipelineConfig) -> None:
    if config.num_stages > n_blocks:
        raise PlanError(f"{config.num_stages} pipeline stages (pp={config.pp} x virtual_stages="
                        f"{config.virtual_stages}) but only {n_blocks} blocks; use at most {n_blocks} stages")


def check_bounds(bounds: Sequence[int], n_blocks: int, config: PipelineConfig) -> None:
    if (len(bounds) != config.num_stages + 1 or bounds[0] != 0 or bounds[-1] != n_blocks
            or any(a >= b for a, b in zip(bounds, bounds[1:]))):
        raise PlanError(f"stage bounds {list(bounds)} must rise strictly from 0 to {n_blocks} "
                        f"with {config.num_stages + 1} entries")


def _stage_times(costs: StageCosts, bounds: Sequence[int], choices: list[RecomputeChoice]
                 ) -> tuple[list[float], list[float]]:
    pairs = list(zip(bounds, bounds[1:]))
    forward = [costs.forward_s(i, j) for i, j in pairs]
    backward = [costs.backward_s(i, j) + c.recompute_s for (i, j), c in zip(pairs, choices)]
    return forward, backward


def _score(costs: StageCosts, bounds: tuple[int, ...]) -> tuple[float, list[float]]:
    """``(step seconds, stage times in descending order)``; the second part breaks ties so a descent
    can leave plateaus where two stages share the bottleneck. ``(inf, [])`` when a stage cannot fit."""
    choices = costs.rank_choices(bounds)
    if isinstance(choices, int):
        return INF, []
    forward, backward = _stage_times(costs, bounds, choices)
    return (step_time(costs.config, forward, backward),
            sorted((f + b for f, b in zip(forward, backward)), reverse=True))


def _scored(costs: StageCosts, bounds: tuple[int, ...]) -> ScoredPartition:
    choices = costs.rank_choices(bounds)
    if isinstance(choices, int):
        s = choices
        i, j = bounds[s], bounds[s + 1]
        need = costs.static_bytes(i, j) + costs.transient_bytes(i, j) + costs.multipliers[s] * min(
            costs.activation_bytes(i, j, mode) for mode in ("none", "attention", "full"))
        raise PlanError(f"stage {s} (blocks {i}..{j - 1}) cannot fit: it needs at least {need / 2**30:.2f} GiB "
                        f"(static + transient + {costs.multipliers[s]} in-flight micro-batches under recompute policy "
                        f"{costs.policy!r}), budget {costs.config.budget(costs.config.rank_of(s)) / 2**30:.2f} "
                        f"GiB; move blocks off this stage or use policy 'adaptive'")
    forward, backward = _stage_times(costs, bounds, choices)
    activation = [c.activation_bytes for c in choices]
    static = [costs.static_bytes(i, j) for i, j in zip(bounds, bounds[1:])]
    return ScoredPartition(
        bounds=bounds, policy=costs.policy, modes=tuple(m for c in choices for m in c.modes),
        forward_s=forward, backward_s=backward, recompute_s=[c.recompute_s for c in choices],
        activation_bytes=activation, static_bytes=static,
        transient_bytes=[costs.transient_bytes(i, j) for i, j in zip(bounds, bounds[1:])],
        sim=simulate(costs.config, forward, backward, activation, static),
    )


def evaluate_partition(profile: CostProfile, config: PipelineConfig, bounds: Sequence[int],
                       policy: str = "adaptive") -> ScoredPartition:
    """Scores the partition ``bounds`` with recompute ``policy``; :class:`PlanError` if a stage cannot fit."""
    check_stage_count(len(profile.blocks), config)
    check_bounds(bounds, len(profile.blocks), config)
    return _scored(StageCosts(profile, config, policy), tuple(bounds))


def _balanced(costs: StageCosts) -> tuple[list[list[float]], tuple[int, ...]]:
    """The bottleneck suffix table and a least-bottleneck partition; :class:`PlanError` if none fits."""
    table = min_bottleneck(costs.n_blocks, costs.config.num_stages, costs.time)
    if table[0][0] == INF:
        raise explain_infeasible(costs)
    return table, bottleneck_bounds(table, costs.time)


def _shifted(bounds: tuple[int, ...], shifts: Sequence[int]) -> tuple[int, ...] | None:
    new = (bounds[0], *(b + d for b, d in zip(bounds[1:-1], shifts)), bounds[-1])
    return new if all(a < b for a, b in zip(new, new[1:])) else None


def search_partition(profile: CostProfile, config: PipelineConfig, policy: str = "adaptive",
                     radius: int = 2, max_candidates: int = 2048) -> ScoredPartition:
    """OmniBal's search: the balanced split, the candidates around it (every boundary shifted by up to
    ``r <= radius`` blocks, ``r`` the largest with at most ``max_candidates`` combinations) ranked by
    simulation, then steepest descent over single-boundary shifts of up to ``radius`` blocks."""
    return ranked_partitions(profile, config, 1, policy, radius, max_candidates)[0]


def ranked_partitions(profile: CostProfile, config: PipelineConfig, k: int, policy: str = "adaptive",
                      radius: int = 2, max_candidates: int = 2048) -> list[ScoredPartition]:
    """The ``k`` partitions with the least simulated step time among those :func:`search_partition`
    scores (fewer when fewer fit), best first: the first is the search's result. Measured refinement
    (``plan.refine``) runs them on the real ranks."""
    check_stage_count(len(profile.blocks), config)
    costs = StageCosts(profile, config, policy)
    _, balanced = _balanced(costs)
    cuts = len(balanced) - 2
    r = radius
    while r > 0 and (2 * r + 1) ** cuts > max_candidates:
        r -= 1
    scores: dict[tuple[int, ...], tuple[float, list[float]]] = {}

    def score(bounds: tuple[int, ...]) -> tuple[float, list[float]]:
        if bounds not in scores:
            scores[bounds] = _score(costs, bounds)
        return scores[bounds]

    candidates = {_shifted(balanced, s) for s in product(range(-r, r + 1), repeat=cuts)} - {None}
    best = min(candidates, key=score)
    moves = [tuple(d if c == k else 0 for c in range(cuts))
             for k in range(cuts) for d in range(-radius, radius + 1) if d]
    while True:
        neighbours = {_shifted(best, move) for move in moves} - {None}
        candidate = min(neighbours, key=score, default=best)
        if score(candidate) >= score(best):
            break
        best = candidate
    runners_up = sorted((b for b, sc in scores.items() if b != best and sc[0] < INF), key=score)
    return [_scored(costs, b) for b in [best, *runners_up][:k]]


@lru_cache(maxsize=64)
def _path_counts(schedule: str, pp: int, micro_batches: int) -> tuple[tuple[int, ...], ...]:
    """For each stage ``k`` with one chunk per rank, (forward, backward) op counts of three stretches of
    rank ``k``'s program: from the first backward to the end, from the start through the last forward,
    from the first backward through the last forward (zeros when the last forward comes first)."""
    out = []
    for program in rank_programs(schedule, pp, 1, micro_batches):
        first_b = next(i for i, op in enumerate(program) if op.backward)
        last_f = max(i for i, op in enumerate(program) if not op.backward)

        def count(ops: Sequence) -> tuple[int, int]:
            nb = sum(op.backward for op in ops)
            return len(ops) - nb, nb

        middle = count(program[first_b:last_f + 1]) if first_b < last_f else (0, 0)
        out.append((*count(program[first_b:]), *count(program[:last_f + 1]), *middle, int(first_b < last_f)))
    return tuple(out)


def exact_partition(profile: CostProfile, config: PipelineConfig, policy: str = "adaptive",
                    incumbent: ScoredPartition | None = None) -> ScoredPartition:
    """The partition with the least simulated step time, by branch and bound.

    What is exact: the result minimises the simulated step time (:mod:`omnibal_pl.plan.simulator`) over
    *all* contiguous partitions into ``pp * virtual_stages`` non-empty stages, each scored with the recompute
    of ``policy``. With one chunk per rank and ``adaptive``, every stage takes its least-recompute choice
    that fits, which is also optimal for the step: the simulated step time is a max of sums of op
    durations, non-decreasing in each stage's backward time, and stages do not share memory. With
    interleaving, each rank's chunks share one knapsack that minimises the rank's total recompute; the
    result is exact over partitions under that rule.

    How: a depth-first walk over the stage bounds in order; a prefix is cut off when a lower bound on the
    step time of every completion reaches the best step time found so far (``incumbent``, by default the
    searched one). Each bound is the length of a path in the step's dependency graph, which the step time
    (the longest path) cannot undercut: for a fixed stage ``k`` with time ``T_k``, micro-batch 0 reaches it
    through the earlier stages, then rank ``k`` runs all its ``m`` forwards and backwards, then the last
    gradient flows back (``sum_{s<k} T_s + m T_k`` plus hops); with one chunk per rank, also the paths
    that wait for micro-batch 0 and/or ``m - 1`` to go through the later stages and back, whose time is at
    least the later blocks' forward + backward seconds; for the stages not yet fixed, the least possible
    bottleneck of the remaining blocks (the dynamic-programming suffix table).
    """
    check_stage_count(len(profile.blocks), config)
    costs = StageCosts(profile, config, policy)
    table, _ = _balanced(costs)
    best = incumbent if incumbent is not None else search_partition(profile, config, policy)
    best_step = best.step_s
    best_bounds = best.bounds
    n, S, m = costs.n_blocks, config.num_stages, config.micro_batches
    hop = config.hop_s if config.pp > 1 else 0.0
    paths = _path_counts(config.schedule, config.pp, m) if config.virtual_stages == 1 else None
    suffix_work = [costs.forward_s(i, n) + costs.backward_s(i, n) for i in range(n + 1)]

    def lower_bound(k: int, j: int, times: tuple[float, ...], f: float, b: float) -> float:
        t = f + b
        before = sum(times)
        base = before + 2 * k * hop
        lb = base + m * t
        # rank r runs every op of its fixed chunks, after micro-batch 0 reaches its first chunk and
        # before the last gradient leaves it; and some rank works at least the average
        r = k % config.pp
        lb = max(lb, sum(times[:r]) + 2 * r * hop + m * (sum(times[r::config.pp]) + t),
                 m * (before + t + suffix_work[j]) / config.pp)
        if k + 1 < S:
            lb = max(lb, before + t + 2 * (k + 1) * hop + m * table[k + 1][j])
        if paths is not None and k + 1 < S:
            wf, wb, cf, cb, mf, mb, has_middle = paths[k]
            d = suffix_work[j] + 2 * (S - 1 - k) * hop
            lb = max(lb, base + f + d + wf * f + wb * b, base + cf * f + cb * b + d + b)
            if has_middle:
                lb = max(lb, base + f + 2 * d + mf * f + mb * b + b)
        return lb

    stack: list[tuple[int, int, tuple[float, ...], tuple[int, ...]]] = [(0, 0, (), (0,))]
    while stack:
        k, i, times, bounds = stack.pop()
        before = sum(times)
        last = n if k == S - 1 else n - (S - 1 - k)
        for j in range(n if k == S - 1 else i + 1, last + 1):
            t = costs.time(i, j, k)
            if t == INF or before + 2 * k * hop + m * t >= best_step:
                break  # both only grow with j
            f = costs.forward_s(i, j)
            if lower_bound(k, j, times, f, t - f) >= best_step:
                continue
            if k + 1 < S:
                stack.append((k + 1, j, times + (t,), bounds + (j,)))
                continue
            full = bounds + (j,)
            step, _ = _score(costs, full)
            if step < best_step:
                best_step, best_bounds = step, full
    return best if best_bounds == best.bounds else _scored(costs, best_bounds)
