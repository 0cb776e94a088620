"""Activation recomputation per pipeline stage: which blocks recompute (none | attention | full).

A stage (or, with interleaving, all chunks of one rank) holds, at its peak, ``n_b`` micro-batches of the
activations of each block ``b`` (the in-flight count of the block's stage under the schedule), on top of
its static bytes. The adaptive choice picks one mode per block so that

    sum_b n_b * act_b(mode_b) <= budget - static

at the least total recompute seconds ``sum_b recompute_b(mode_b)``. That is a multiple-choice knapsack;
:class:`RecomputeFrontier` solves it exactly by keeping the Pareto front of (kept bytes, recompute
seconds) over the blocks added so far: any optimal choice restricted to a prefix of the blocks is on that
prefix's front, so the best point under the capacity is optimal. The front of ``k`` identical blocks has
O(k^2) points; heterogeneous blocks rarely give more in practice. Fronts are numpy arrays, so one
extension is a handful of vectorised passes.

Policies compared (all take the same inputs): ``adaptive`` (the knapsack), ``none_where_fits`` (per stage:
nothing if it fits, else every block fully), and the global modes ``none``, ``attention``, ``full``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from omnibal_pl.errors import ConfigError
from omnibal_pl.model.block import RECOMPUTE_MODES
from omnibal_pl.plan.costs import BlockCost

POLICIES = ("adaptive", "none_where_fits", "none", "attention", "full")


class RecomputeFrontier:
    """Pareto front of (kept activation bytes, recompute seconds) over the blocks added so far.

    Immutable: :meth:`extend` returns a new front that links back to this one. Points are held as numpy
    arrays (``kept`` ascending, ``secs`` strictly descending) with, per point, the mode of the last block
    and the index of the point it extends in the previous front; ``max_bytes`` drops points that can
    never fit.
    """

    def __init__(self, max_bytes: float = float("inf")) -> None:
        self.kept = np.zeros(1)
        self.secs = np.zeros(1)
        self.modes = np.full(1, -1)
        self.parents = np.full(1, -1)
        self.previous: RecomputeFrontier | None = None
        self.max_bytes = max_bytes

    def extend(self, block: BlockCost, multiplier: float = 1.0) -> "RecomputeFrontier":
        """The front after adding ``block``, whose activations count ``multiplier`` times."""
        n = len(self.kept)
        kept = np.concatenate([self.kept + multiplier * block.activation_bytes(m) for m in RECOMPUTE_MODES])
        secs = np.concatenate([self.secs + block.recompute_s(m) for m in RECOMPUTE_MODES])
        modes = np.repeat(np.arange(len(RECOMPUTE_MODES)), n)
        parents = np.tile(np.arange(n), len(RECOMPUTE_MODES))
        fits = kept <= self.max_bytes
        kept, secs, modes, parents = kept[fits], secs[fits], modes[fits], parents[fits]
        order = np.lexsort((secs, kept))  # by bytes, then seconds; stable, so "none" wins exact ties
        kept, secs = kept[order], secs[order]
        # a point is on the front iff it needs strictly less time than every point keeping no more bytes
        on_front = np.ones(len(kept), dtype=bool)
        on_front[1:] = secs[1:] < np.minimum.accumulate(secs)[:-1]
        front = RecomputeFrontier(self.max_bytes)
        front.kept, front.secs = kept[on_front], secs[on_front]
        front.modes, front.parents = modes[order][on_front], parents[order][on_front]
        front.previous = self
        return front

    def best(self, capacity_bytes: float) -> tuple[float, float, tuple[str, ...]] | None:
        """``(recompute_s, kept_bytes, modes)`` of the cheapest choice keeping at most
        ``capacity_bytes``, modes in the order blocks were added; None when nothing fits."""
        i = int(np.searchsorted(self.kept, capacity_bytes, side="right")) - 1
        if i < 0:
            return None
        modes = []
        front, j = self, i
        while front.previous is not None:
            modes.append(RECOMPUTE_MODES[front.modes[j]])
            front, j = front.previous, front.parents[j]
        return float(self.secs[i]), float(self.kept[i]), tuple(reversed(modes))


@dataclass(frozen=True)
class RecomputeChoice:
    """Modes for a run of blocks, their total added recompute seconds (per micro-batch) and the peak
    activation bytes they hold: ``sum_b n_b * act_b(mode_b)``."""

    modes: tuple[str, ...]
    recompute_s: float
    activation_bytes: float


def _uniform(blocks: Sequence[BlockCost], multipliers: Sequence[float], mode: str) -> RecomputeChoice:
    return RecomputeChoice(
        modes=(mode,) * len(blocks),
        recompute_s=sum(b.recompute_s(mode) for b in blocks),
        activation_bytes=sum(n * b.activation_bytes(mode) for b, n in zip(blocks, multipliers)),
    )


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ConfigError(f"recompute policy {policy!r} is not one of {POLICIES}")


def apply_policy(policy: str, capacity_bytes: float, uniform: Callable[[str], RecomputeChoice],
                 knapsack: Callable[[], RecomputeChoice | None]) -> RecomputeChoice | None:
    """The choice of ``policy`` that keeps at most ``capacity_bytes``, or None. ``uniform(mode)`` gives
    every block ``mode``; ``knapsack()`` gives the least-recompute choice that fits."""
    check_policy(policy)
    if policy in RECOMPUTE_MODES:
        choice = uniform(policy)
        return choice if choice.activation_bytes <= capacity_bytes else None
    nothing = uniform("none")
    if nothing.activation_bytes <= capacity_bytes:
        return nothing
    if policy == "none_where_fits":
        choice = uniform("full")
        return choice if choice.activation_bytes <= capacity_bytes else None
    return knapsack()


def knapsack_choice(front: RecomputeFrontier, capacity_bytes: float) -> RecomputeChoice | None:
    found = front.best(capacity_bytes)
    if found is None:
        return None
    secs, kept, modes = found
    return RecomputeChoice(modes=modes, recompute_s=secs, activation_bytes=kept)


def choose_recompute(blocks: Sequence[BlockCost], multipliers: Sequence[float], capacity_bytes: float,
                     policy: str = "adaptive") -> RecomputeChoice | None:
    """Recompute modes for ``blocks`` whose activations count ``multipliers[b]`` times, keeping at most
    ``capacity_bytes`` (the budget minus static bytes); None when no choice of ``policy`` fits."""

    def knapsack() -> RecomputeChoice | None:
        front = RecomputeFrontier(max_bytes=capacity_bytes)
        for block, n in zip(blocks, multipliers):
            front = front.extend(block, n)
        return knapsack_choice(front, capacity_bytes)

    return apply_policy(policy, capacity_bytes, lambda mode: _uniform(blocks, multipliers, mode), knapsack)


def least_activation_bytes(block: BlockCost) -> int:
    """The fewest activation bytes ``block`` can keep per micro-batch, over all modes."""
    return min(block.activation_bytes(mode) for mode in RECOMPUTE_MODES)
