"""Costs of one pipeline stage (a contiguous run of blocks) under a config and a recompute policy.

Everything here is per micro-batch: seconds for times, bytes for memory. A stage's recompute is chosen
for the stage alone with the whole memory budget of its rank, which is exact for one chunk per rank and
a relaxation (never more time, never infeasible where a real choice fits) with interleaving, where the
chunks of a rank share one budget: :meth:`StageCosts.rank_choices` handles that case.
"""
from __future__ import annotations

from itertools import accumulate
from typing import Callable, Sequence

from omnibal_pl.model.block import RECOMPUTE_MODES
from omnibal_pl.plan.costs import CostProfile, ZeroSharding, transient_bytes
from omnibal_pl.plan.recompute import (RecomputeChoice, RecomputeFrontier, apply_policy, check_policy,
                                       choose_recompute, knapsack_choice)
from omnibal_pl.plan.schedule import PipelineConfig, stage_multipliers

INF = float("inf")


def _prefix(values: Sequence[float]) -> list[float]:
    return [0.0, *accumulate(values)]


class StageCosts:
    """Cached per-stage costs of ``profile`` under ``config`` and recompute ``policy``."""

    def __init__(self, profile: CostProfile, config: PipelineConfig, policy: str = "adaptive") -> None:
        check_policy(policy)
        self.profile, self.config, self.policy = profile, config, policy
        blocks = profile.blocks
        self.n_blocks = len(blocks)
        self.multipliers = stage_multipliers(config)
        self._fwd = _prefix([b.forward_s for b in blocks])
        self._bwd = _prefix([b.backward_s for b in blocks])
        self._static = _prefix([b.static_bytes for b in blocks])
        self._act = {m: _prefix([b.activation_bytes(m) for b in blocks]) for m in RECOMPUTE_MODES}
        self._rec = {m: _prefix([b.recompute_s(m) for b in blocks]) for m in RECOMPUTE_MODES}
        # no stage keeps more than a whole budget per micro-batch: prune front points beyond it
        self._max_kept = max(config.budget(r) for r in range(config.pp))
        self._sharding = ZeroSharding(config.zero, config.dp)
        self._transient: dict[tuple[int, int], float] = {}
        self._fronts: dict[tuple[int, int], RecomputeFrontier] = {}
        self._choices: dict[tuple[int, int, int, float], RecomputeChoice | None] = {}

    def forward_s(self, i: int, j: int) -> float:
        return self._fwd[j] - self._fwd[i]

    def backward_s(self, i: int, j: int) -> float:
        """Backward seconds of ``blocks[i:j]`` without recomputation."""
        return self._bwd[j] - self._bwd[i]

    def static_bytes(self, i: int, j: int) -> float:
        return self._static[j] - self._static[i]

    def activation_bytes(self, i: int, j: int, mode: str) -> float:
        return self._act[mode][j] - self._act[mode][i]

    def transient_bytes(self, i: int, j: int) -> float:
        """What ``blocks[i:j]`` hold for a moment besides static and kept bytes (:func:`transient_bytes`)."""
        if (i, j) not in self._transient:
            self._transient[(i, j)] = transient_bytes(self.profile.blocks[i:j], self._sharding, self.config.pp > 1)
        return self._transient[(i, j)]

    def _front(self, i: int, j: int) -> RecomputeFrontier:
        start = j
        while start > i and (i, start) not in self._fronts:
            start -= 1
        front = self._fronts.get((i, start), RecomputeFrontier(max_bytes=self._max_kept))
        for end in range(start + 1, j + 1):
            front = self._fronts[(i, end)] = front.extend(self.profile.blocks[end - 1])
        return front

    def choice(self, i: int, j: int, stage: int) -> RecomputeChoice | None:
        """Recompute of ``blocks[i:j]`` as ``stage`` alone on its rank; ``activation_bytes`` is per
        micro-batch. None when the policy cannot fit the budget."""
        n = self.multipliers[stage]
        budget = self.config.budget(self.config.rank_of(stage))
        key = (i, j, n, budget)
        if key not in self._choices:
            capacity = (budget - self.static_bytes(i, j) - self.transient_bytes(i, j)) / n

            def uniform(mode: str) -> RecomputeChoice:
                return RecomputeChoice((mode,) * (j - i), self._rec[mode][j] - self._rec[mode][i],
                                       self.activation_bytes(i, j, mode))

            self._choices[key] = apply_policy(self.policy, capacity, uniform,
                                              lambda: knapsack_choice(self._front(i, j), capacity))
        return self._choices[key]

    def time(self, i: int, j: int, stage: int) -> float:
        """Forward + backward + recompute seconds of ``blocks[i:j]`` as ``stage``; ``inf`` if it cannot fit.
        Non-decreasing in ``j`` and non-increasing in ``i``."""
        choice = self.choice(i, j, stage)
        if choice is None:
            return INF
        return self.forward_s(i, j) + self.backward_s(i, j) + choice.recompute_s

    def rank_choices(self, bounds: Sequence[int]) -> list[RecomputeChoice] | int:
        """Per-stage recompute for the partition ``bounds`` (stage ``s`` is ``blocks[bounds[s]:bounds[s+1]]``),
        each rank's chunks chosen together within its budget; with interleaving the rank's activations are
        counted as the sum of its chunks' peaks (an upper bound of the true peak). Returns the first stage
        that cannot fit instead when there is one."""
        cfg = self.config
        if cfg.virtual_stages == 1:
            choices = []
            for s in range(cfg.num_stages):
                choice = self.choice(bounds[s], bounds[s + 1], s)
                if choice is None:
                    return s
                choices.append(choice)
            return choices
        blocks = self.profile.blocks
        out: list[RecomputeChoice | None] = [None] * cfg.num_stages
        for rank in range(cfg.pp):
            stages = list(range(rank, cfg.num_stages, cfg.pp))
            members = [(s, b) for s in stages for b in range(bounds[s], bounds[s + 1])]
            capacity = cfg.budget(rank) - sum(self.static_bytes(bounds[s], bounds[s + 1])
                                              + self.transient_bytes(bounds[s], bounds[s + 1]) for s in stages)
            choice = choose_recompute([blocks[b] for _, b in members],
                                      [self.multipliers[s] for s, _ in members], capacity, self.policy)
            if choice is None:
                return stages[0]
            for s in stages:
                modes = tuple(mode for (t, _), mode in zip(members, choice.modes) if t == s)
                idx = range(bounds[s], bounds[s + 1])
                out[s] = RecomputeChoice(modes, sum(blocks[b].recompute_s(m) for b, m in zip(idx, modes)),
                                         sum(blocks[b].activation_bytes(m) for b, m in zip(idx, modes)))
        return out  # type: ignore[return-value]


def min_bottleneck(n_blocks: int, n_stages: int, cost: Callable[[int, int, int], float]
                   ) -> list[list[float]]:
    """Suffix table of the min-bottleneck contiguous partition (dynamic programming over prefixes, from
    the end): ``table[k][i]`` is the least possible ``max`` of ``cost(a, b, s)`` over stages ``s = k..``
    covering ``blocks[i:]``, each stage non-empty; ``inf`` when impossible. ``cost(i, j, s)`` of
    ``blocks[i:j]`` as stage ``s`` must be non-decreasing in ``j`` (used to stop scanning early)."""
    table = [[INF] * (n_blocks + 1) for _ in range(n_stages + 1)]
    table[n_stages][n_blocks] = 0.0
    for k in range(n_stages - 1, -1, -1):
        for i in range(k, n_blocks - (n_stages - 1 - k)):
            best = INF
            for j in range(i + 1, n_blocks - (n_stages - 1 - k) + 1):
                c = cost(i, j, k)
                if c >= best:
                    break
                best = min(best, max(c, table[k + 1][j]))
            table[k][i] = best
    return table


def bottleneck_bounds(table: list[list[float]], cost: Callable[[int, int, int], float]) -> tuple[int, ...]:
    """A partition achieving ``table[0][0]`` (stage bounds ``0 = b_0 < ... < b_S = n_blocks``)."""
    n_stages, n_blocks = len(table) - 1, len(table[0]) - 1
    bounds, i = [0], 0
    for k in range(n_stages):
        target = table[k][i]
        j = next(j for j in range(i + 1, n_blocks - (n_stages - 1 - k) + 1)
                 if max(cost(i, j, k), table[k + 1][j]) <= target)
        bounds.append(j)
        i = j
    return tuple(bounds)
