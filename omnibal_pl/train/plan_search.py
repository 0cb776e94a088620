"""A searched plan checked on the real ranks before training: measured refinement and adaptive recompute.

Both run trial steps (:func:`~omnibal_pl.train.trial.run_trials`) of candidate plans on the run's own
local devices, on the micro-batches of the run's first step (every candidate sees the same data):

- ``plan.refine=K`` (:func:`refine_plan`): the ``K`` best partitions of the search
  (:func:`~omnibal_pl.plan.partition.ranked_partitions`) each run a few steps; the fastest measured step
  wins (OmniBal's final selection on the cluster). The plan records every candidate's predicted and
  measured step seconds under ``notes.refine``.
- ``plan.adapt=true`` (:func:`adapt_plan`): the plan runs a few steps, each pipeline rank's static bytes
  and activation peak are measured, recompute is chosen again from the measurement
  (:func:`~omnibal_pl.plan.adapt.adapted_recompute`) and measured again, up to ``rounds`` times, until
  the choice no longer changes. The plan records each round (modes, measured and predicted bytes per
  rank) under ``notes.adapt``; a plan whose measured peak plus its transient bytes is over budget on
  some rank is never returned.

Trials start their own processes on this machine, so they run on global rank 0 before Lightning
launches the run's processes, on one node (``cluster.num_nodes=1``).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from omnibal_pl.batch import PackedBatch
from omnibal_pl.data.datamodule import LoaderConfig, OmniBalDataModule, PackingConfig
from omnibal_pl.data.training_data import TrainingData
from omnibal_pl.errors import PlanError
from omnibal_pl.model import VLMConfig
from omnibal_pl.plan.adapt import adapted_recompute, rank_transient_bytes
from omnibal_pl.plan.make import PlanInputs, plan_from_partition
from omnibal_pl.plan.partition import ranked_partitions
from omnibal_pl.plan.plan import Plan
from omnibal_pl.train.trial import PlanTrial, run_trials

GIB = 2**30


def first_step_batches(data: TrainingData, packing: PackingConfig) -> list[list[PackedBatch]]:
    """The micro-batches of the run's first optimizer step, per DP replica (what trials run on)."""
    out = []
    for rank in range(data.balance.dp):
        module = OmniBalDataModule(data, packing, LoaderConfig(), whole_steps=True, dp_rank=rank)
        out.append(list(next(iter(module.train_dataloader()))))
    return out


def _rank_figures(trial: PlanTrial) -> dict[str, list[float]]:
    ranks = range(trial.plan.pp)
    return {"static_bytes": [float(trial.pp_rank_static(r)) for r in ranks],
            "activation_bytes": [float(trial.pp_rank_activations(r)) for r in ranks],
            "peak_bytes": [float(trial.pp_rank_peak(r)) for r in ranks]}


def refine_plan(model: VLMConfig, inputs: PlanInputs, k: int, batches: list[list[PackedBatch]], zero: int,
                **trial_args: Any) -> Plan:
    """The fastest measured of the search's ``k`` best partitions (module docstring)."""
    candidates = [plan_from_partition(model, inputs, scored, zero)
                  for scored in ranked_partitions(inputs.profile, inputs.config, k)]
    trials = run_trials(model, candidates, batches, **trial_args)
    report = [{"stage_blocks": [len(s) for s in t.plan.stages], "predicted_step_s": t.plan.predicted_step_s,
               "measured_step_s": t.step_s} for t in trials]
    best = min(range(len(trials)), key=lambda i: trials[i].step_s)
    chosen = trials[best].plan
    return replace(chosen, notes={**chosen.notes, "refine": {"chosen": best, "candidates": report}})


def adapt_plan(model: VLMConfig, plan: Plan, inputs: PlanInputs, batches: list[list[PackedBatch]], rounds: int = 3,
               **trial_args: Any) -> Plan:
    """``plan`` with recompute adapted to measured memory (module docstring)."""
    budget = [inputs.config.budget(r) for r in range(plan.pp)]
    history: list[dict[str, Any]] = []
    current, fitting = plan, None
    for _ in range(rounds):
        trial = run_trials(model, [current], batches, **trial_args)[0]
        figures = _rank_figures(trial)
        history.append({"recompute": dict(current.recompute), "predicted_stage_bytes": list(current.stage_memory_bytes),
                        **figures})
        transient = [rank_transient_bytes(current, inputs.profile, inputs.config, r) for r in range(plan.pp)]
        fits = all(p + t <= b for p, t, b in zip(figures["peak_bytes"], transient, budget))
        if fits:
            fitting = current
        adapted = adapted_recompute(current, inputs.profile, inputs.config, figures["static_bytes"],
                                    figures["activation_bytes"])
        if adapted.recompute == current.recompute:
            break
        current = adapted
    if fitting is None:
        peaks = ", ".join(f"rank {r}: {p / GIB:.3f} GiB" for r, p in enumerate(history[-1]["peak_bytes"]))
        raise PlanError(f"adaptive recompute: no measured plan fits the budget of {budget[0] / GIB:.3f} GiB per rank "
                        f"after {len(history)} rounds ({peaks}); raise plan.memory_gb / plan.memory_fraction or use "
                        "more pipeline stages")
    return replace(fitting, notes={**fitting.notes, "adapt": history})
