"""The memory model against the runtime, and plans refined and adapted from trial steps on real ranks.

Trials spawn pp x dp gloo processes (train/trial.py); every test here keeps to the tiny model, pp = 2,
dp = 1 and one or two measured steps, and puts several plans in one spawn where it can.
"""
from __future__ import annotations

from dataclasses import replace

import pytest

from omnibal_pl.batch import MicroBatchShape
from omnibal_pl.errors import ConfigError
from omnibal_pl.model.block import RECOMPUTE_MODES
from omnibal_pl.plan.costs import transient_bytes
from omnibal_pl.plan.make import plan_from_partition, planning_inputs
from omnibal_pl.plan.partition import evaluate_partition
from omnibal_pl.plan.profiler import profile_batch
from omnibal_pl.train.plan_search import adapt_plan, refine_plan
from omnibal_pl.train.trial import run_trials

from tests.helpers import model_config

pytestmark = pytest.mark.distributed

CFG = model_config("tiny")
SHAPE = MicroBatchShape(vit_cap=2, token_cap=256, samples=2)
M = 4  # micro-batches per step: 1F1B keeps 2 in flight on stage 0, 1 on stage 1


def tiny_inputs(tmp_path, memory_gb: float | None = None):
    return planning_inputs(CFG, 2, M, SHAPE.vit_cap, SHAPE.token_cap, device="local", source="profile",
                           profile_cache=str(tmp_path / "profiles"), samples=SHAPE.samples, precision="32-true",
                           memory_gb=memory_gb)


def batches():
    return [[profile_batch(CFG, SHAPE, seed=k) for k in range(M)]]


def test_predicted_stage_memory_matches_the_runtime_for_every_recompute_mode(tmp_path) -> None:
    """Static bytes exactly, activation peaks within 10%, per pipeline rank and recompute mode. Catches an
    in-flight count off by one (1F1B's stage 0 holds 2 micro-batches here), a recompute mode the stage does
    not apply, or a profile that counts what the runtime frees."""
    inputs = tiny_inputs(tmp_path)
    bounds = (0, 6, len(CFG.block_names()))
    plans = [plan_from_partition(CFG, inputs, evaluate_partition(inputs.profile, inputs.config, bounds, mode))
             for mode in RECOMPUTE_MODES]
    assert plans[2].recompute and all(m == "full" for m in plans[2].recompute.values())
    trials = run_trials(CFG, plans, batches(), steps=1)
    for mode, trial in zip(RECOMPUTE_MODES, trials):
        for rank in range(2):
            predicted = trial.plan.notes["stage_activation_bytes"][rank]
            measured = trial.pp_rank_activations(rank)
            assert measured == pytest.approx(predicted, rel=0.10), (mode, rank)
            assert trial.pp_rank_static(rank) == trial.plan.notes["stage_static_bytes"][rank], (mode, rank)
    none, attention, full = (t.pp_rank_activations(0) for t in trials)
    assert none > attention > full  # each mode frees what it says on the stage holding the vision blocks
    assert trials[0].ranks[0].loss == pytest.approx(trials[2].ranks[0].loss, rel=1e-5)  # recompute is exact


def test_adapt_tightens_to_a_measured_fit_and_refine_keeps_the_fastest(tmp_path) -> None:
    """A budget between full recompute and none: the adapted plan's measured peak fits on every rank and
    is recorded per round; refinement measures every candidate and returns the fastest one."""
    loose = tiny_inputs(tmp_path)
    bounds = (0, 6, len(CFG.block_names()))
    static0 = sum(b.static_bytes for b in loose.profile.blocks[:6]) + transient_bytes(loose.profile.blocks[:6])
    none = evaluate_partition(loose.profile, loose.config, bounds, "none")
    full = evaluate_partition(loose.profile, loose.config, bounds, "full")
    low, high = (static0 + 2 * s.activation_bytes[0] for s in (full, none))
    budget_gb = (low + 0.4 * (high - low)) / 2**30
    inputs = tiny_inputs(tmp_path, memory_gb=budget_gb)
    start = plan_from_partition(CFG, loose, none)  # planned for a larger budget: over the tight one
    adapted = adapt_plan(CFG, replace(start, memory_budget_bytes=budget_gb * 2**30), inputs, batches(), steps=1)
    rounds = adapted.notes["adapt"]
    assert rounds[0]["recompute"] == {} and rounds[0]["peak_bytes"][0] > budget_gb * 2**30  # none: over budget
    assert rounds[-1]["recompute"] == adapted.recompute and adapted.recompute
    assert all(p <= budget_gb * 2**30 for p in rounds[-1]["peak_bytes"])

    refined = refine_plan(CFG, tiny_inputs(tmp_path), 2, batches(), 0, steps=1)
    report = refined.notes["refine"]
    assert len(report["candidates"]) == 2
    fastest = min(range(2), key=lambda i: report["candidates"][i]["measured_step_s"])
    assert report["chosen"] == fastest
    assert [len(s) for s in refined.stages] == report["candidates"][fastest]["stage_blocks"]


def test_trials_refuse_plans_of_different_shapes(tmp_path) -> None:
    inputs = tiny_inputs(tmp_path)
    plan = plan_from_partition(CFG, inputs, evaluate_partition(inputs.profile, inputs.config, (0, 6, 8), "none"))
    with pytest.raises(Exception, match="token_cap"):
        run_trials(CFG, [plan, replace(plan, token_cap=128)], batches())
    with pytest.raises(ConfigError, match="micro-batches for each of dp=1"):
        run_trials(CFG, [plan], [batches()[0][:2]])


def test_zero_3_shards_the_state_not_the_activations(tmp_path) -> None:
    """pp = 1, dp = 2: at ZeRO 3 a rank holds at most 0.53x the parameter + gradient + optimizer bytes of
    ZeRO 0 (the model's prediction), the same activation peak (FSDP2's unsharded parameters are
    not activations) and the same loss."""
    plans = []
    for zero in (0, 3):
        inputs = planning_inputs(CFG, 1, 2, SHAPE.vit_cap, SHAPE.token_cap, dp=2, device="local", source="profile",
                                 profile_cache=str(tmp_path / "profiles"), samples=SHAPE.samples,
                                 precision="32-true", zero=zero)
        plans.append(plan_from_partition(CFG, inputs, evaluate_partition(inputs.profile, inputs.config,
                                                                         (0, len(CFG.block_names())), "none"), zero))
    data = [[profile_batch(CFG, SHAPE, seed=10 * d + k) for k in range(2)] for d in range(2)]
    zero0, zero3 = run_trials(CFG, plans, data, steps=1)
    assert zero3.pp_rank_static(0) <= 0.53 * zero0.pp_rank_static(0)
    # FSDP2 pads a parameter whose first dimension does not divide by dp: a few bytes over the model
    assert zero3.pp_rank_static(0) == pytest.approx(zero3.plan.notes["stage_static_bytes"][0], rel=1e-3)
    assert zero3.pp_rank_activations(0) == pytest.approx(zero0.pp_rank_activations(0), rel=0.02)
    assert zero3.ranks[0].loss == pytest.approx(zero0.ranks[0].loss, rel=1e-5)
