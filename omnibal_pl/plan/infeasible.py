"""The error raised when no partition fits in memory: which stage, its need, its budget, and the smallest
changes that would fit (more stages, smaller micro-batch caps, another recompute policy or schedule)."""
from __future__ import annotations

from dataclasses import replace
from itertools import accumulate
from typing import Callable

from omnibal_pl.errors import ConfigError, PlanError
from omnibal_pl.model.block import RECOMPUTE_MODES
from omnibal_pl.plan.costs import CostProfile, ZeroSharding, transient_bytes
from omnibal_pl.plan.schedule import PipelineConfig, stage_multipliers
from omnibal_pl.plan.stage_costs import INF, StageCosts, bottleneck_bounds, min_bottleneck

GIB = 2**30
# the recompute modes each policy may use on a block
_POLICY_MODES = {"adaptive": RECOMPUTE_MODES, "none_where_fits": ("none", "full"), "none": ("none",),
                 "attention": ("attention",), "full": ("full",)}


def _held(profile: CostProfile, config: PipelineConfig) -> Callable[[int, int], float]:
    """Bytes ``blocks[i:j]`` hold besides kept activations: static bytes plus their transient bytes."""
    static = [0.0, *accumulate(b.static_bytes for b in profile.blocks)]
    sharding = ZeroSharding(config.zero, config.dp)

    def held(i: int, j: int) -> float:
        return static[j] - static[i] + transient_bytes(profile.blocks[i:j], sharding, config.pp > 1)

    return held


def _memory_table(profile: CostProfile, config: PipelineConfig, modes: tuple[str, ...], act_scale: float = 1.0):
    """Per-stage need/budget with every block at its smallest activations among ``modes``: the
    min-bottleneck table and the cost function. A bottleneck <= 1 means some partition fits."""
    least = [0.0, *accumulate(min(b.activation_bytes(m) for m in modes) for b in profile.blocks)]
    held = _held(profile, config)
    mult = stage_multipliers(config)

    def ratio(i: int, j: int, k: int) -> float:
        need = held(i, j) + mult[k] * act_scale * (least[j] - least[i])
        return need / config.budget(config.rank_of(k))

    return min_bottleneck(len(profile.blocks), config.num_stages, ratio), ratio, least, held


def _fits(profile: CostProfile, config: PipelineConfig, modes: tuple[str, ...], act_scale: float = 1.0) -> bool:
    return _memory_table(profile, config, modes, act_scale)[0][0][0] <= 1.0


def _cap_factor(profile: CostProfile, config: PipelineConfig, modes: tuple[str, ...]) -> float:
    """The largest factor on every block's activation bytes (~ on the micro-batch caps) that fits: 0 when
    static memory alone is too much somewhere for every partition."""
    least = [0.0, *accumulate(min(b.activation_bytes(m) for m in modes) for b in profile.blocks)]
    held = _held(profile, config)
    mult = stage_multipliers(config)

    def needed(i: int, j: int, k: int) -> float:  # activation factor of stage k over what it may hold
        room = config.budget(config.rank_of(k)) - held(i, j)
        act = mult[k] * (least[j] - least[i])
        return INF if room < 0 else (act / room if room > 0 else (0.0 if act == 0 else INF))

    worst = min_bottleneck(len(profile.blocks), config.num_stages, needed)[0][0]
    return 0.0 if worst == INF else (INF if worst == 0 else 1.0 / worst)


def explain_infeasible(costs: StageCosts) -> PlanError:
    """Builds the error for ``costs`` (a profile, config and policy under which no partition fits)."""
    profile, config, policy = costs.profile, costs.config, costs.policy
    modes = _POLICY_MODES[policy]
    table, ratio, least, held = _memory_table(profile, config, modes)
    if table[0][0] == INF:
        return PlanError("no partition fits and the budgets are not finite; check memory_budget_bytes")
    bounds = bottleneck_bounds(table, ratio)
    worst = max(range(config.num_stages), key=lambda k: ratio(bounds[k], bounds[k + 1], k))
    i, j = bounds[worst], bounds[worst + 1]
    n = stage_multipliers(config)[worst]
    names = profile.names
    lines = [
        f"no partition of {len(names)} blocks into {config.num_stages} stages fits in memory under recompute "
        f"policy {policy!r}: in the partition that needs the least, stage {worst} (blocks {names[i]}..{names[j - 1]}) "
        f"needs {(held(i, j) + n * (least[j] - least[i])) / GIB:.2f} GiB "
        f"({held(i, j) / GIB:.2f} GiB static and transient + {n} in-flight micro-batches x "
        f"{(least[j] - least[i]) / GIB:.2f} GiB activations), budget "
        f"{config.budget(config.rank_of(worst)) / GIB:.2f} GiB. Smallest changes that fit:"
    ]
    if policy != "adaptive" and _fits(profile, config, RECOMPUTE_MODES):
        lines.append("- recompute policy 'adaptive' (or 'full')")
    if config.schedule == "gpipe" and _fits(profile, replace(config, schedule="1f1b"), modes):
        lines.append("- schedule '1f1b' (fewer micro-batches in flight)")
    budget = min(config.budget(r) for r in range(config.pp))
    for pp in range(config.pp + 1, len(names) // config.virtual_stages + 1):
        try:
            more = replace(config, pp=pp, memory_budget_bytes=budget)
        except ConfigError:  # e.g. interleaving needs micro_batches divisible by pp
            continue
        if _fits(profile, more, modes):
            lines.append(f"- pp={pp} pipeline stages")
            break
    factor = _cap_factor(profile, config, modes)
    if factor == 0.0:
        lines.append("- no micro-batch cap fits: static memory (parameters, gradients, optimizer state) alone "
                     "exceeds the budget; shard the optimizer state or add stages")
    else:
        lines.append(f"- micro-batch caps (tokens, tiles) at about {factor:.2f}x, if activations scale with them")
    return PlanError("\n".join(lines))
