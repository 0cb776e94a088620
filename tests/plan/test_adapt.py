"""Adaptive recompute from measured memory (plan/adapt.py) and the ranked partitions refinement runs."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from omnibal_pl.errors import PlanError
from omnibal_pl.plan.adapt import adapted_recompute, rank_transient_bytes
from omnibal_pl.plan.make import PlanInputs, plan_from_partition
from omnibal_pl.plan.partition import evaluate_partition, ranked_partitions, search_partition
from omnibal_pl.plan.schedule import PipelineConfig, stage_multipliers
from omnibal_pl.plan.synthetic import synthetic_profile
from omnibal_pl.batch import MicroBatchShape

GIB = 2**30
PROFILE = synthetic_profile(4, 8, seed=1, jitter=0.0)
BOUNDS = (0, 7, len(PROFILE.blocks))  # vision + projector + embed + 1 layer | 7 layers + head


def inputs(budget_gib: float) -> PlanInputs:
    config = PipelineConfig(pp=2, micro_batches=4, schedule="1f1b", memory_budget_bytes=budget_gib * GIB)
    return PlanInputs(profile=PROFILE, config=config, shape=MicroBatchShape(8, 4096), device="synthetic")


def plan_for(budget_gib: float, policy: str = "adaptive"):
    i = inputs(budget_gib)
    model = SimpleNamespace(name=PROFILE.model)  # all plan_from_partition reads of a model config
    return plan_from_partition(model, i, evaluate_partition(PROFILE, i.config, BOUNDS, policy)), i


def kept(plan, config, rank: int, scale: float = 1.0) -> float:
    """Modelled activation bytes of pipeline rank ``rank`` under the plan's modes (x ``scale``)."""
    n = stage_multipliers(config)
    cost = {b.name: b for b in PROFILE.blocks}
    return sum(scale * n[s] * cost[b].activation_bytes(plan.mode(b)) for s in plan.stages_of_rank(rank)
               for b in plan.stages[s])


def test_measured_headroom_turns_recompute_off() -> None:
    plan, i = plan_for(60.0, "full")  # everything recomputed, far below the budget
    static = [float(sum(PROFILE.blocks[j].static_bytes for j in range(a, b))) for a, b in zip(BOUNDS, BOUNDS[1:])]
    measured = [kept(plan, i.config, r) for r in range(2)]  # the runtime keeps what the profile says
    adapted = adapted_recompute(plan, PROFILE, i.config, static, measured)
    assert adapted.recompute == {}  # no recompute: it all fits
    assert adapted.notes["activation_scale"] == pytest.approx([1.0, 1.0])
    transient = rank_transient_bytes(adapted, PROFILE, i.config, 1)
    rank1 = PROFILE.blocks[BOUNDS[1]:]  # dp = 1: the recompute transient and the two receive buffers
    assert transient == max(b.act_none_bytes - b.act_full_bytes for b in rank1) + 2 * rank1[0].act_full_bytes
    assert adapted.stage_memory_bytes[1] == pytest.approx(static[1] + kept(adapted, i.config, 1) + transient)


def test_a_rank_that_measures_more_than_modelled_recomputes_more() -> None:
    budget = 30.0
    plan, i = plan_for(budget)
    static = [float(sum(PROFILE.blocks[j].static_bytes for j in range(a, b))) for a, b in zip(BOUNDS, BOUNDS[1:])]
    # rank 1 measures twice its modelled activations, rank 0 exactly the model
    measured = [kept(plan, i.config, 0), 2 * kept(plan, i.config, 1)]
    adapted = adapted_recompute(plan, PROFILE, i.config, static, measured)
    assert adapted.notes["activation_scale"] == pytest.approx([1.0, 2.0])
    # rank 1 now fits with its doubled activations, where the modelled choice would not
    assert static[1] + kept(plan, i.config, 1, 2.0) > budget * GIB
    assert static[1] + kept(adapted, i.config, 1, 2.0) <= budget * GIB
    assert kept(adapted, i.config, 1) < kept(plan, i.config, 1)
    # rank 0 measured what was modelled: same choice
    assert {b: adapted.mode(b) for b in plan.stages[0]} == {b: plan.mode(b) for b in plan.stages[0]}
    # and a rank measuring less than modelled relaxes: halve rank 1 instead
    relaxed = adapted_recompute(plan, PROFILE, i.config, static, [measured[0], kept(plan, i.config, 1) / 2])
    assert kept(relaxed, i.config, 1) > kept(plan, i.config, 1)


def test_a_budget_no_recompute_fits_names_the_rank() -> None:
    plan, i = plan_for(30.0)
    with pytest.raises(PlanError, match="pipeline rank 1 .* over its budget"):
        adapted_recompute(plan, PROFILE, i.config, [0.0, 29.9 * GIB], [kept(plan, i.config, 0), 1e12])


def test_ranked_partitions_are_the_search_result_then_its_runners_up() -> None:
    config = inputs(60.0).config
    ranked = ranked_partitions(PROFILE, config, 4)
    assert len(ranked) == 4
    assert ranked[0].bounds == search_partition(PROFILE, config).bounds
    steps = [r.step_s for r in ranked]
    assert steps == sorted(steps) and len({r.bounds for r in ranked}) == 4
