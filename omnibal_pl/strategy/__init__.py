"""The pipeline x data parallel runtime that runs a plan: mesh, stage construction, pipeline step."""
from omnibal_pl.strategy.mesh import ParallelDims, build_mesh, check_sizes
from omnibal_pl.strategy.pipeline import (
    SCHEDULES,
    LossFn,
    PipelineRunner,
    all_reduce_grads,
    build_pipeline,
    clip_grad_norm_,
)
from omnibal_pl.strategy.stage import (
    PipelineLayout,
    StageModule,
    block_names,
    build_stage,
    check_layout,
    gather_full_state_dict,
    initial_state_dict,
    load_stage_state,
    uniform_layout,
)
from omnibal_pl.strategy.tied import TiedCopy, tie_embeddings
from omnibal_pl.strategy.lightning import OmniBalStrategy

__all__ = [
    "LossFn",
    "ParallelDims",
    "PipelineLayout",
    "PipelineRunner",
    "SCHEDULES",
    "StageModule",
    "TiedCopy",
    "all_reduce_grads",
    "block_names",
    "build_mesh",
    "build_pipeline",
    "build_stage",
    "check_layout",
    "check_sizes",
    "clip_grad_norm_",
    "gather_full_state_dict",
    "initial_state_dict",
    "load_stage_state",
    "tie_embeddings",
    "uniform_layout",
    "OmniBalStrategy",
]
