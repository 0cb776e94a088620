"""Adaptive recompute from measured memory (OmniBal's memory balance, as published): given what each
pipeline rank measured under a plan's recompute, choose the recompute again so every rank uses its budget
and no more.

Per pipeline rank, with its stages' blocks ``b``, in-flight counts ``n_b`` (the schedule's), the
profile's activation bytes ``act_b(mode)`` and the measured static bytes ``S`` and activation peak ``A``:

- the rank's *activation scale* is ``A / sum_b n_b act_b(mode_b)`` under the modes it ran with (1 when
  the plan keeps nothing): how far the runtime's activations are from the profile's;
- the new modes are the least-recompute choice (:func:`~omnibal_pl.plan.recompute.choose_recompute`)
  with ``sum_b n_b * scale * act_b(mode_b) <= budget - S - T``, ``T`` the rank's transient bytes
  (:func:`~omnibal_pl.plan.costs.transient_bytes`: a recompute transient and communication buffers,
  which the CPU measurement does not see).

So a rank that measured headroom turns recompute off where the scaled bytes allow (relax), and a rank
over its budget recomputes more (tighten). The runtime then measures the new choice again
(:func:`omnibal_pl.train.plan_search.adapt_plan`), since the scale is measured under the old modes only.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from omnibal_pl.errors import PlanError
from omnibal_pl.model.config import TRANSFORMER_BLOCK_PREFIXES
from omnibal_pl.plan.costs import CostProfile, ZeroSharding, transient_bytes
from omnibal_pl.plan.plan import Plan
from omnibal_pl.plan.recompute import choose_recompute
from omnibal_pl.plan.schedule import PipelineConfig, stage_multipliers

GIB = 2**30


def _valid_mode(name: str, mode: str) -> str:
    """``attention`` only where a block has an attention core; the same bytes as ``none`` elsewhere."""
    return "none" if mode == "attention" and not name.startswith(TRANSFORMER_BLOCK_PREFIXES) else mode


def rank_transient_bytes(plan: Plan, profile: CostProfile, config: PipelineConfig, rank: int) -> float:
    """The transient bytes (:func:`~omnibal_pl.plan.costs.transient_bytes`) of pipeline rank ``rank``'s
    stages: what the measured static bytes and activation peak do not show on CPU."""
    cost = {b.name: b for b in profile.blocks}
    sharding = ZeroSharding(config.zero, config.dp)
    return sum(transient_bytes([cost[n] for n in plan.stages[s]], sharding, plan.pp > 1)
               for s in plan.stages_of_rank(rank))


def adapted_recompute(plan: Plan, profile: CostProfile, config: PipelineConfig, measured_static: Sequence[float],
                      measured_activations: Sequence[float]) -> Plan:
    """``plan`` with recompute chosen again from measured bytes per pipeline rank (module docstring);
    ``stage_memory_bytes`` become the measured static bytes plus the scaled activations of the new modes
    (per rank, on the rank's first stage's entry; other stages of an interleaved rank get 0).
    Raises :class:`PlanError` naming the rank when no recompute fits its budget."""
    profile.check_blocks([n for s in plan.stages for n in s])
    if len(measured_static) != plan.pp or len(measured_activations) != plan.pp:
        raise PlanError(f"adaptive recompute needs one measurement per pipeline rank ({plan.pp}), got "
                        f"{len(measured_static)} static and {len(measured_activations)} activation figures")
    cost = {b.name: b for b in profile.blocks}
    multipliers = stage_multipliers(config)
    recompute: dict[str, str] = {}
    memory = [0.0] * len(plan.stages)
    scales = []
    for rank in range(plan.pp):
        members = [(multipliers[s], name) for s in plan.stages_of_rank(rank) for name in plan.stages[s]]
        predicted = sum(n * cost[name].activation_bytes(plan.mode(name)) for n, name in members)
        scale = measured_activations[rank] / predicted if predicted > 0 else 1.0
        transient = rank_transient_bytes(plan, profile, config, rank)
        capacity = config.budget(rank) - measured_static[rank] - transient
        choice = choose_recompute([cost[name] for _, name in members], [n * scale for n, _ in members], capacity)
        if choice is None:
            least = sum(n * scale * min(cost[name].activation_bytes(m) for m in ("none", "attention", "full"))
                        for n, name in members)
            raise PlanError(f"pipeline rank {rank} measured {measured_static[rank] / GIB:.3f} GiB static, reserves "
                            f"{transient / GIB:.3f} GiB transient and needs at least {least / GIB:.3f} GiB of "
                            f"activations under full recompute, over its budget of "
                            f"{config.budget(rank) / GIB:.3f} GiB; raise plan.memory_gb / plan.memory_fraction, "
                            "use more pipeline stages or a higher cluster.zero")
        recompute.update({name: _valid_mode(name, m) for (_, name), m in zip(members, choice.modes)})
        memory[plan.stages_of_rank(rank)[0]] = measured_static[rank] + choice.activation_bytes + transient
        scales.append(scale)
    notes = {**plan.notes, "activation_scale": scales}
    return replace(plan, recompute=recompute, stage_memory_bytes=tuple(memory), notes=notes)
