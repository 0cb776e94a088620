"""Forming steps: which groups meet in one optimizer step, on which DP rank and micro-batch slot.

A step holds ``dp x micro_batches`` groups. Four orders:

- ``matched`` (ours): groups sorted by (tiles, tokens), or by modelled cost when one is given
  (``balance.cost=fitted``), and cut into consecutive runs, so the groups of a step are near-equal (tiles
  compared in bands of the vision quantum: merge-block sums of Qwen groups differ by a few blocks, and
  tokens must still decide inside such a band); the groups left over (fewer than a step) are the ones
  whose removal gives the least summed spread over steps (:func:`matched_runs`), not simply the lightest; steps
  are then shuffled, and inside a step groups are dealt to ranks in snake order (rank totals equal when
  ``micro_batches > 1``) under a random rank permutation;
- ``megatron``: the published ISF sampler: rank r owns a contiguous bucket of groups, and every rank
  walks its bucket in the same random order, so groups of one step are not matched;
- ``lpt`` (DistTrain's reordering): consecutive groups form a step; its groups, heaviest modelled cost
  first, each go to the least-loaded rank that still has a free micro-batch slot (longest processing time
  first); each rank then orders its micro-batches so the smallest sit at both ends (ascending costs placed
  alternately at the front and the back), where a pipeline's warm-up and cool-down run them;
- ``sequential``: groups in the order the algorithm produced them (the usual DataLoader).

Groups that cannot fill a whole step are returned as ``leftover`` (the sampler carries them over).

Under ``cost=fitted``, ``matched`` steps are then evened sample by sample (:func:`exchange_samples`): groups of a
step cut from the same stretch of the ranked order are near-equal, but the caps leave each one a few modelled
tenths of a percent apart, and moving or swapping single samples between the ranks closes most of that.
:func:`arrange` does both.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from omnibal_pl.balance import _core
from omnibal_pl.balance.config import BalanceConfig
from omnibal_pl.balance.cost import TimeModel, group_costs, sample_features
from omnibal_pl.balance.grouping import Grouping, auto_vit_quantum
from omnibal_pl.errors import ConfigError
from omnibal_pl.lengths import LengthTable


@dataclass
class Steps:
    """``groups[s, r, j]`` is the group that DP rank ``r`` runs as micro-batch ``j`` of step ``s``."""

    groups: np.ndarray  # [steps, dp, micro_batches] int64
    leftover: np.ndarray  # group ids in no full step

    @property
    def num_steps(self) -> int:
        return int(self.groups.shape[0])


def arrange_steps(table: LengthTable, grouping: Grouping, cfg: BalanceConfig, seed: int | None = None,
                  time_model: TimeModel | None = None) -> Steps:
    """Steps of ``grouping`` in ``cfg``'s step order, weighing groups by ``time_model`` (``cost=fitted``) or by
    their counts; ``seed`` overrides ``cfg.seed``."""
    order = cfg.resolved_step_order
    vit_sums, token_sums = grouping.sums(table)
    cost = group_costs(table, grouping, time_model) if order == "lpt" or time_model is not None else None
    band = auto_vit_quantum(table) if cfg.vit_quantum is None else cfg.vit_quantum
    return form_steps(vit_sums, token_sums, cfg.dp, cfg.micro_batches, order, cfg.seed if seed is None else seed, cost,
                      band)


def arrange(table: LengthTable, grouping: Grouping, cfg: BalanceConfig, seed: int | None = None,
            time_model: TimeModel | None = None) -> tuple[Grouping, Steps]:
    """:func:`arrange_steps`, then, when ``time_model`` weighs the groups (``cost=fitted``) of ``matched`` steps and
    ``cfg.exchange_sweeps > 0``, :func:`exchange_samples`. Returns the grouping the steps index (the same groups
    and ids; their samples exchanged) and the steps."""
    steps = arrange_steps(table, grouping, cfg, seed, time_model)
    if time_model is None or cfg.resolved_step_order != "matched" or cfg.exchange_sweeps == 0:
        return grouping, steps
    return exchange_samples(table, grouping, steps, time_model, cfg.exchange_sweeps), steps


def exchange_samples(table: LengthTable, grouping: Grouping, steps: Steps, model: TimeModel, sweeps: int) -> Grouping:
    """``grouping`` with samples exchanged between the groups of each step so its DP ranks' modelled times even out.

    A rank's modelled time is the sum over its samples of ``model``'s terms (the fixed cost per micro-batch is the
    same on every rank). Each sweep pairs the heavier half of the ranks with the lighter, heaviest with lightest,
    and makes for each pair the one move (a sample into the light rank's group) or swap (against a lighter sample)
    that leaves the pair nearest even; a group never passes ``grouping``'s caps nor loses its last sample, and no
    rank ends heavier than the pair's heavier one was. At most ``sweeps`` sweeps per step; a step ends sooner when a
    sweep finds nothing to exchange. Leftover groups are kept as they are. (C++: ``csrc/exchange.cpp``.)
    """
    cost = sample_features(table) @ np.asarray(model.coefficients, np.float64)
    indices, offsets, _ = _core.exchange_samples(table.vit, table.tokens, cost, grouping.indices, grouping.offsets,
                                                 steps.groups, grouping.vit_cap, grouping.token_cap, sweeps)
    return replace(grouping, indices=indices, offsets=offsets)


def form_steps(vit_sums: np.ndarray, token_sums: np.ndarray, dp: int, micro_batches: int, order: str,
               seed: int, cost: np.ndarray | None = None, vit_band: int = 1) -> Steps:
    """Arranges groups (given by their tile and token sums, and ``cost``: modelled cost per group) into steps;
    see the module docstring. ``lpt`` needs ``cost``; ``matched`` sorts by it when given, else by tile sums in
    bands of ``vit_band`` (the vision quantum), then tokens."""
    n = len(vit_sums)
    per_step = dp * micro_batches
    rng = np.random.default_rng(seed)
    if order == "matched":
        # heaviest first; key: descending along ranked, the tile band outweighing any token difference
        if cost is None:
            band = np.asarray(vit_sums) // vit_band
            ranked = np.lexsort((-token_sums, -band))
            key = (band * (int(np.max(token_sums, initial=0)) + 1) + token_sums)[ranked].astype(np.float64)
        else:
            ranked = np.argsort(-cost, kind="stable")
            key = np.asarray(cost, np.float64)[ranked]
        starts = matched_runs(key, per_step)
        in_step = np.zeros(n, bool)
        positions = (starts[:, None] + np.arange(per_step)).reshape(-1)
        in_step[positions] = True
        steps = ranked[positions].reshape(-1, per_step)
        steps = steps[rng.permutation(len(steps))]
        # Snake deal: slot j takes ranks in forward order for even j, backward for odd j.
        snake = np.arange(per_step).reshape(micro_batches, dp)
        snake[1::2] = snake[1::2, ::-1]
        grid = steps[:, snake.T]  # [steps, dp, micro_batches]
        grid = grid[:, rng.permutation(dp)]
        return Steps(grid, ranked[~in_step])
    if order == "megatron":
        bucket = (n // per_step) * micro_batches  # groups per rank
        walk = rng.permutation(bucket)
        grid = np.arange(dp)[None, :, None] * bucket + walk.reshape(-1, 1, micro_batches)
        return Steps(grid.astype(np.int64), np.arange(dp * bucket, n, dtype=np.int64))
    if order == "lpt":
        if cost is None:
            raise ConfigError("step order lpt needs a modelled cost per group")
        full = (n // per_step) * per_step
        return Steps(_lpt(cost[:full].reshape(-1, per_step), dp, micro_batches), np.arange(full, n, dtype=np.int64))
    if order == "sequential":
        full = (n // per_step) * per_step
        grid = np.arange(full, dtype=np.int64).reshape(-1, dp, micro_batches)
        return Steps(grid, np.arange(full, n, dtype=np.int64))
    raise ConfigError(f"step order {order!r}: choose matched, megatron, lpt or sequential")


def matched_runs(key: np.ndarray, per_step: int) -> np.ndarray:
    """Where the steps of ``matched`` start along the ranked groups: ``len(key) // per_step`` runs of ``per_step``
    consecutive positions, ascending, the ``len(key) % per_step`` positions in no run (the leftover) placed so
    that the runs' summed spread, ``key[start] - key[start + per_step - 1]``, is least (``key`` descending).

    Cutting runs from the top and leaving the last positions over (the lightest groups) makes a step straddle
    a jump in the key wherever one falls inside a run, e.g. four groups of 11 tiles and four of 10 in one
    step: its 11-tile ranks set the time and the others wait. Leaving over a group or two before the jump
    keeps both steps even. Exact, by a dynamic programme over (run k, positions left over before it d):
    ``h_d[k]``, the least spread of runs 0..k with run k at ``k * per_step + d``, is
    ``min over j <= k`` of (least spread of runs 0..j-1 at fewer than d left over) + spreads of runs j..k at d,
    a running minimum along k: one vectorised pass per d, ``O(len(key))`` work in all.
    """
    n = len(key)
    runs, spare = divmod(n, per_step)
    if runs == 0 or spare == 0:
        return np.arange(runs, dtype=np.int64) * per_step
    spread = key[: n - per_step + 1] - key[per_step - 1 :]  # of the run starting at each position
    k = np.arange(runs)
    best = np.full(runs, np.inf)  # least h over the d passed so far, per k
    best_d = np.zeros(runs, np.int64)
    first_run = np.empty((spare + 1, runs), np.int64)  # j of h_d[k]'s minimum
    before = np.empty((spare + 1, runs), np.int64)  # best_d as pass d began: the d of runs 0..j-1
    for d in range(spare + 1):
        at_d = spread[k * per_step + d]
        through = np.cumsum(at_d)  # spreads of runs 0..k at d
        entry = np.concatenate([[0.0], best[:-1]])  # runs 0..j-1 at fewer left over (none before run 0)
        offset = entry - (through - at_d)
        low = np.minimum.accumulate(offset)
        first_run[d] = np.maximum.accumulate(np.where(offset == low, k, 0))
        before[d] = best_d
        h = through + low
        better = h < best
        best, best_d = np.where(better, h, best), np.where(better, d, best_d)
    starts = np.empty(runs, np.int64)
    last, d = runs - 1, int(best_d[-1])
    while last >= 0:
        j = int(first_run[d, last])
        starts[j : last + 1] = np.arange(j, last + 1) * per_step + d
        if j > 0:
            d = int(before[d, j - 1])
        last = j - 1
    return starts


def _lpt(cost: np.ndarray, dp: int, micro_batches: int) -> np.ndarray:
    """LPT deal of every step at once: ``cost`` is [steps, dp * micro_batches] for groups ``s * per_step + k``;
    returns the [steps, dp, micro_batches] grid, each rank's micro-batches in DistTrain's order."""
    steps, per_step = cost.shape
    rows = np.arange(steps)
    load = np.zeros((steps, dp))
    slots = np.zeros((steps, dp), np.int64)
    picked = np.zeros((steps, dp, micro_batches), np.int64)
    for k in np.argsort(-cost, axis=1, kind="stable").T:  # k[s]: the step's next heaviest group
        open_load = np.where(slots < micro_batches, load, np.inf)
        rank = open_load.argmin(axis=1)
        picked[rows, rank, slots[rows, rank]] = k
        load[rows, rank] += cost[rows, k]
        slots[rows, rank] += 1
    # Picks came heaviest first; ascending costs go alternately to the front and the back.
    ascending = picked[:, :, ::-1]
    small_ends = np.concatenate([np.arange(0, micro_batches, 2),
                                 np.arange(micro_batches - 1 - micro_batches % 2, 0, -2)])
    return rows[:, None, None] * per_step + ascending[:, :, small_ends]
