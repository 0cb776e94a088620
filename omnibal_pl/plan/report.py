"""The searched plan beside the baselines, as printed by ``omnibal-plan`` and ``scripts/bench_plan.py``.

Baselines (each scored by the same simulator and memory model): the uniform, parameter-balanced and
torchtitan partitions, each with global full recomputation (how those frameworks are run when memory is
tight), and the searched partition with global full recompute and with none-where-fits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from omnibal_pl.errors import PlanError
from omnibal_pl.plan.baselines import parameter_partition, torchtitan_partition, uniform_partition
from omnibal_pl.plan.partition import ScoredPartition, evaluate_partition, search_partition
from omnibal_pl.plan.costs import ZERO_LEVELS
from omnibal_pl.plan.make import PlanInputs

GIB = 2**30


@dataclass
class Row:
    """One compared plan: its scored partition, or why it does not fit."""

    name: str
    scored: ScoredPartition | None
    error: str = ""


def _row(name: str, inputs: PlanInputs, bounds: tuple[int, ...], policy: str) -> Row:
    try:
        return Row(name, evaluate_partition(inputs.profile, inputs.config, bounds, policy))
    except PlanError as err:
        return Row(name, None, str(err).splitlines()[0])


def compare(inputs: PlanInputs, searched: ScoredPartition, exact: ScoredPartition | None = None) -> list[Row]:
    """Rows: the searched plan, the exact optimum (when given), then the baselines."""
    n = inputs.config.num_stages
    rows = [Row("searched (adaptive recompute)", searched)]
    if exact is not None:
        rows.append(Row("exact optimum (adaptive recompute)", exact))
    rows += [
        _row("searched + recompute everything", inputs, searched.bounds, "full"),
        _row("searched + none where it fits", inputs, searched.bounds, "none_where_fits"),
        _row("uniform + full recompute", inputs, uniform_partition(inputs.profile, n), "full"),
        _row("parameters + full recompute", inputs, parameter_partition(inputs.profile, n), "full"),
        _row("torchtitan + full recompute", inputs, torchtitan_partition(inputs.profile, n), "full"),
    ]
    return rows


def format_comparison(rows: list[Row]) -> str:
    """A table of step time, the first row's speedup over each, bubble, peak memory and blocks per stage."""
    reference = rows[0].scored.step_s if rows[0].scored is not None else None
    lines = [f"{'plan':36s} {'step s':>9s} {'speedup':>8s} {'bubble':>7s} {'max GiB':>8s}  blocks per stage"]
    for row in rows:
        if row.scored is None:
            lines.append(f"{row.name:36s} {'-':>9s} {'-':>8s} {'-':>7s} {'-':>8s}  does not fit: {row.error}")
            continue
        s = row.scored
        speedup = f"{s.step_s / reference:.3f}x" if reference else "-"
        sizes = [b - a for a, b in zip(s.bounds, s.bounds[1:])]
        lines.append(f"{row.name:36s} {s.step_s:9.4f} {speedup:>8s} {s.sim.bubble_fraction:7.1%} "
                     f"{max(s.sim.peak_memory_bytes) / GIB:8.2f}  {sizes}")
    lines.append(f"speedup: a row's simulated step time over the {rows[0].name}'s")
    return "\n".join(lines)


def format_stages(inputs: PlanInputs, scored: ScoredPartition) -> str:
    """One line per stage: rank, blocks, forward and backward (with recompute) ms per micro-batch, the
    recompute chosen, micro-batches in flight and memory."""
    names = inputs.profile.names
    cfg = inputs.config
    lines = [f"{'stage':>5s} {'rank':>4s} {'blocks':40s} {'fwd ms':>8s} {'bwd ms':>8s} {'rec ms':>7s} "
             f"{'recompute':>18s} {'n':>3s} {'act GiB':>8s} {'static':>7s} {'peak GiB':>8s} {'budget':>7s}"]
    modes = iter(scored.modes)
    for s, (i, j) in enumerate(zip(scored.bounds, scored.bounds[1:])):
        stage_modes = [next(modes) for _ in range(i, j)]
        n = scored.sim.peak_in_flight[s]
        chosen = f"{stage_modes.count('attention')} attn {stage_modes.count('full')} full"
        peak = scored.static_bytes[s] + n * scored.activation_bytes[s]
        lines.append(
            f"{s:5d} {cfg.rank_of(s):4d} {f'{names[i]} .. {names[j - 1]} ({j - i})':40s} "
            f"{scored.forward_s[s] * 1e3:8.2f} {scored.backward_s[s] * 1e3:8.2f} {scored.recompute_s[s] * 1e3:7.2f} "
            f"{chosen:>18s} {n:3d} {scored.activation_bytes[s] / GIB:8.3f} {scored.static_bytes[s] / GIB:7.2f} "
            f"{peak / GIB:8.2f} {cfg.budget(cfg.rank_of(s)) / GIB:7.1f}")
    return "\n".join(lines)



def zero_fit(plan_level: Callable[[int], PlanInputs]) -> list[tuple[int, ScoredPartition | None, str]]:
    """For every ZeRO level: the searched partition with the static bytes split as that level splits them
    (``plan_level(zero)`` makes the inputs), or why no partition fits."""
    rows = []
    for zero in ZERO_LEVELS:
        inputs = plan_level(zero)
        try:
            rows.append((zero, search_partition(inputs.profile, inputs.config), ""))
        except PlanError as err:
            rows.append((zero, None, str(err).splitlines()[0]))
    return rows


def format_zero_fit(rows: list[tuple[int, ScoredPartition | None, str]], budget_bytes: float) -> str:
    """The :func:`zero_fit` rows as a table: fits, predicted step, largest stage memory vs the budget."""
    lines = [f"{'zero':>4s} {'fits':>4s} {'step s':>9s} {'max stage GiB':>13s}   (budget {budget_bytes / GIB:.1f} GiB per rank;"
             " 1 optimizer state sharded, 2 gradients too, 3 parameters too)"]
    for zero, scored, error in rows:
        if scored is None:
            lines.append(f"{zero:>4d} {'no':>4s} {'-':>9s} {'-':>13s}   {error[:90]}")
            continue
        peak = max(s + n * a for s, n, a in zip(scored.static_bytes, scored.sim.peak_in_flight, scored.activation_bytes))
        lines.append(f"{zero:>4d} {'yes':>4s} {scored.step_s:>9.4g} {peak / GIB:>13.1f}")
    return "\n".join(lines)
