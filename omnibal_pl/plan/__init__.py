"""Model and memory balance: block costs (profiler, cost model), pipeline simulator, partition search,
per-stage adaptive recomputation, and the plan file the strategy runs."""
from omnibal_pl.plan.cost_model import PRESETS, DevicePreset, cost_model_profile, device_preset, fit_device
from omnibal_pl.plan.costs import BlockCost, CostProfile
from omnibal_pl.plan.partition import ScoredPartition, evaluate_partition, exact_partition, search_partition
from omnibal_pl.plan.make import PlanInputs, make_plan, plan_from_partition, planning_inputs
from omnibal_pl.plan.plan import RECOMPUTE_MODES, SCHEDULES, Plan, check_pipeline_sizes, even_bounds, uniform_plan
from omnibal_pl.plan.profiler import profile_blocks
from omnibal_pl.plan.schedule import PipelineConfig
from omnibal_pl.plan.simulator import SimResult, save_gantt, simulate

__all__ = [
    "BlockCost",
    "CostProfile",
    "DevicePreset",
    "PRESETS",
    "RECOMPUTE_MODES",
    "SCHEDULES",
    "PipelineConfig",
    "Plan",
    "PlanInputs",
    "ScoredPartition",
    "SimResult",
    "check_pipeline_sizes",
    "cost_model_profile",
    "even_bounds",
    "device_preset",
    "evaluate_partition",
    "exact_partition",
    "fit_device",
    "make_plan",
    "plan_from_partition",
    "planning_inputs",
    "profile_blocks",
    "save_gantt",
    "search_partition",
    "simulate",
    "uniform_plan",
]
