"""VLM blocks (vision encoder, projector, LLM), varlen attention backends and HF checkpoint loading."""
from omnibal_pl.model.attention import flash_available, resolve_backend, varlen_attention
from omnibal_pl.model.block import RECOMPUTE_MODES, TransformerBlock
from omnibal_pl.model.config import LLMConfig, ProjectorConfig, VisionConfig, VLMConfig
from omnibal_pl.model.dummy import dummy_batch
from omnibal_pl.model.hf_loading import Layout, load_hf_model, load_hf_weights, to_hf_state_dict, vlm_config_from_hf
from omnibal_pl.model.vlm import VLM

__all__ = [
    "LLMConfig",
    "Layout",
    "ProjectorConfig",
    "RECOMPUTE_MODES",
    "TransformerBlock",
    "VLM",
    "VLMConfig",
    "VisionConfig",
    "dummy_batch",
    "flash_available",
    "load_hf_model",
    "load_hf_weights",
    "resolve_backend",
    "to_hf_state_dict",
    "varlen_attention",
    "vlm_config_from_hf",
]
