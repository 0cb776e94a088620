"""Forming steps: which groups meet in one optimizer step, on which DP rank and micro-batch slot.

A step holds ``dp x micro_batches`` groups. Three orders:

- ``matched`` (ours): groups sorted by (tiles, tokens) and cut into consecutive runs, so the groups of a
  step are near-equal; steps are then shuffled, and inside a step groups are dealt to ranks in snake
  order (rank totals equal when ``micro_batches > 1``) under a random rank permutation;
- ``megatron``: the published ISF sampler: rank r owns a contiguous bucket of groups, and every rank
  walks its bucket in the same random order, so groups of one step are not matched;
- ``sequential``: groups in the order the algorithm produced them (the usual DataLoader).

Groups that cannot fill a whole step are returned as ``leftover`` (the sampler carries them over).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from omnibal_pl.errors import ConfigError


@dataclass
class Steps:
    """``groups[s, r, j]`` is the group that DP rank ``r`` runs as micro-batch ``j`` of step ``s``."""

    groups: np.ndarray  # [steps, dp, micro_batches] int64
    leftover: np.ndarray  # group ids in no full step

    @property
    def num_steps(self) -> int:
        return int(self.groups.shape[0])


def form_steps(vit_sums: np.ndarray, token_sums: np.ndarray, dp: int, micro_batches: int, order: str,
               seed: int) -> Steps:
    """Arranges groups (given by their tile and token sums) into steps; see the module docstring."""
    n = len(vit_sums)
    per_step = dp * micro_batches
    rng = np.random.default_rng(seed)
    if order == "matched":
        ranked = np.lexsort((-token_sums, -vit_sums))  # heaviest first
        full = (n // per_step) * per_step
        steps = ranked[:full].reshape(-1, per_step)
        steps = steps[rng.permutation(len(steps))]
        # Snake deal: slot j takes ranks in forward order for even j, backward for odd j.
        snake = np.arange(per_step).reshape(micro_batches, dp)
        snake[1::2] = snake[1::2, ::-1]
        grid = steps[:, snake.T]  # [steps, dp, micro_batches]
        grid = grid[:, rng.permutation(dp)]
        return Steps(grid, ranked[full:])
    if order == "megatron":
        bucket = (n // per_step) * micro_batches  # groups per rank
        walk = rng.permutation(bucket)
        grid = np.arange(dp)[None, :, None] * bucket + walk.reshape(-1, 1, micro_batches)
        return Steps(grid.astype(np.int64), np.arange(dp * bucket, n, dtype=np.int64))
    if order == "sequential":
        full = (n // per_step) * per_step
        grid = np.arange(full, dtype=np.int64).reshape(-1, dp, micro_batches)
        return Steps(grid, np.arange(full, n, dtype=np.int64))
    raise ConfigError(f"step order {order!r}: choose matched, megatron or sequential")
