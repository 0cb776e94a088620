"""The pipeline x data parallel runtime that runs a :class:`~omnibal_pl.plan.Plan`: mesh, stages,
pipeline step, tied weights, distributed checkpoints and the Lightning strategy."""
from omnibal_pl.parallel.mesh import ParallelDims, build_mesh, check_sizes
from omnibal_pl.parallel.pipeline import LossFn, PipelineRunner, all_reduce_grads, build_pipeline, clip_grad_norm_
from omnibal_pl.parallel.stage import StageModule, build_stage, gather_full_state_dict, initial_state_dict, load_stage_state
from omnibal_pl.parallel.strategy import OmniBalStrategy
from omnibal_pl.parallel.tied import TiedCopy, tie_embeddings

__all__ = [
    "LossFn",
    "OmniBalStrategy",
    "ParallelDims",
    "PipelineRunner",
    "StageModule",
    "TiedCopy",
    "all_reduce_grads",
    "build_mesh",
    "build_pipeline",
    "build_stage",
    "check_sizes",
    "clip_grad_norm_",
    "gather_full_state_dict",
    "initial_state_dict",
    "load_stage_state",
    "tie_embeddings",
]
