"""The partitions public frameworks would pick, as stage bounds (see :mod:`omnibal_pl.plan.partition`).

None of them looks at time or memory; score them with :func:`~omnibal_pl.plan.partition.evaluate_partition`
(usually with the global ``full`` recompute they are run with).
"""
from __future__ import annotations

from itertools import accumulate

from omnibal_pl.errors import PlanError
from omnibal_pl.plan.costs import CostProfile
from omnibal_pl.plan.plan import even_bounds
from omnibal_pl.plan.stage_costs import bottleneck_bounds, min_bottleneck

_VISION_KINDS = ("vision_embed", "vision_block", "projector")


def uniform_partition(profile: CostProfile, n_stages: int) -> tuple[int, ...]:
    """Equal block counts per stage (DeepSpeed's ``uniform``, Megatron without manual first/last counts)."""
    return tuple(even_bounds(len(profile.blocks), n_stages))


def parameter_partition(profile: CostProfile, n_stages: int) -> tuple[int, ...]:
    """Least maximum parameter bytes per stage (DeepSpeed's default ``partition_method="parameters"``)."""
    if n_stages > len(profile.blocks):
        raise PlanError(f"cannot split {len(profile.blocks)} blocks into {n_stages} non-empty stages")
    params = [0, *accumulate(b.param_bytes for b in profile.blocks)]

    def cost(i: int, j: int, _: int) -> float:
        return params[j] - params[i]

    return bottleneck_bounds(min_bottleneck(len(profile.blocks), n_stages, cost), cost)


def torchtitan_partition(profile: CostProfile, n_stages: int) -> tuple[int, ...]:
    """torchtitan's rule: the LLM's blocks (embedding and head counted as one layer each) split evenly by
    count; the whole vision encoder and projector go to stage 0 on top of its share."""
    n_vision = 0
    while n_vision < len(profile.blocks) and profile.blocks[n_vision].kind in _VISION_KINDS:
        n_vision += 1
    llm = even_bounds(len(profile.blocks) - n_vision, n_stages, offset=n_vision)
    return (0, *llm[1:])
