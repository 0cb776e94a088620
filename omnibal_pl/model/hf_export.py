"""Write a :class:`VLM` as a Hugging Face folder that the published loaders read (the inverse of :mod:`.hf_loading`).

Five families (``family``; by default the source folder's, else by the projector kind and the vision family):

- ``llava`` (``projector.kind = mlp2x_gelu``, a CLIP tower): transformers' ``LlavaForConditionalGeneration``
  layout and ``config.json`` (``model_type: llava``), loadable with ``from_pretrained``;
- ``internvl_chat`` (``projector.kind = pixel_shuffle_mlp``, an InternViT tower): OpenGVLab's remote-code
  ``InternVLChatModel`` layout (``vision_model.*``, ``mlp1.*``, ``language_model.*``), with the remote-code
  ``*.py`` files of the folder the model was loaded from;
- ``internvl``: the same model as transformers' native ``InternVLForConditionalGeneration`` (``model_type:
  internvl``; Qwen2 or Llama LLMs), loadable with ``from_pretrained`` without remote code;
- ``qwen2_vl`` / ``qwen2_5_vl`` (``projector.kind = patch_merger``, by ``vision.family``): transformers'
  ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``, tensors under the published
  checkpoints' names (``visual.*``, ``model.*``, ``lm_head.weight``, as ``save_pretrained`` writes them).

Tensors the model never held: :class:`VLM` builds the vision tower only up to its selected layer (and CLIP's
post-layernorm is never used). When the model came from a Hugging Face folder (``source``) those tensors are
copied from it unchanged and the folder's ``config.json`` is kept (it must describe the same model), so the
export has the original architecture. Without a source the exported config describes the tower as built:
``depth = select_layer's block count``, features taken from the last block, and CLIP's unused
post-layernorm written as the identity (ones, zeros). Either way the exported model computes the same logits.

A Dynamic-LLaVA model's predictors are written beside the weights under the original repository's names
(``model.image_score_predictor.*``, ``model.output_text_score_predictor.*``, ``model.instruct_score_predictor.*``):
transformers ignores them (it reports them as unexpected keys), ``init_from`` with ``model/sparsify=dynamic_llava``
and ``omnibal-eval --sparsify`` load them.

Tokenizer files and the chat template are copied from ``tokenizer_source`` (typically the same source folder).
The folder is written under a temporary name and renamed into place, so a failed export leaves no half folder.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from omnibal_pl.errors import ConfigError
from omnibal_pl.model.config import LLMConfig, VLMConfig
from omnibal_pl.model.hf_loading import (QWEN_VL_TYPES, Layout, folder_differences, hf_layout, skipped_tensors,
                                         to_hf_state_dict)
from omnibal_pl.model.sparsify.original_names import original_predictor_state_dict
from omnibal_pl.model.vlm import VLM

FAMILIES = ("llava", "internvl_chat", "internvl", *QWEN_VL_TYPES)
_FAMILY_OF_PROJECTOR = {"mlp2x_gelu": "llava", "pixel_shuffle_mlp": "internvl_chat"}  # patch_merger: vision.family
_FAMILY_OF_VISION_LAYOUT = {"clip": "llava", "internvit": "internvl_chat", "internvl_hf": "internvl"}  # qwen: model_type
# Without a source: InternVL's LLM under Llama/Qwen2 names (Qwen2 when the q/k/v projections have biases)
_DEFAULT_LAYOUT = {"llava": Layout("clip", "llama"), "internvl_chat": Layout("internvit", "llama"),
                   "internvl": Layout("internvl_hf", "llama"), **{f: Layout("qwen", "llama") for f in QWEN_VL_TYPES}}
# Qwen2-VL's published tensor names for the LLM, from the rules' (normalised) ones: the inverse of hf_loading's reading
_QWEN_HUB_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."))

# What a tokenizer source may hold: tokenizer, chat template and processor settings (copied when present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "preprocessor_config.json", "processor_config.json")

# Field values each family's published model fixes (the loader maps exactly these structures).
_INTERNVIT = {"projector.kind": "pixel_shuffle_mlp", "vision.act": "gelu", "vision.layerscale": True,
              "vision.embed_norm": False, "vision.patch_bias": True, "vision.class_token": True}
_FAMILY_FIELDS = {
    "llava": {"projector.kind": "mlp2x_gelu", "vision.norm": "layernorm", "vision.layerscale": False,
              "vision.embed_norm": True, "vision.patch_bias": False, "vision.qkv_bias": True, "vision.qk_norm": False,
              "vision.class_token": True},
    "internvl_chat": _INTERNVIT,
    "internvl": {**_INTERNVIT, "projector.norm_eps": 1e-5},  # transformers' projector LayerNorm: the default epsilon
    "qwen2_vl": {"projector.kind": "patch_merger", "vision.family": "qwen2_vl", "vision.norm": "layernorm",
                 "vision.act": "quick_gelu", "llm.qkv_bias": True},
    "qwen2_5_vl": {"projector.kind": "patch_merger", "vision.family": "qwen2_5_vl", "vision.norm": "rmsnorm",
                   "vision.act": "swiglu", "llm.qkv_bias": True},
}


@dataclass
class ExportResult:
    """What :func:`export_hf` wrote: the folder, its weight files, the tokenizer files copied (empty when the
    tokenizer source had none or was not given) and the number of tensors copied unchanged from ``source``."""

    folder: Path
    weight_files: list[str]
    tokenizer_files: list[str] = field(default_factory=list)
    copied_from_source: int = 0


def family_of(cfg: VLMConfig) -> str:
    """``llava`` or ``internvl_chat`` from the projector kind, or the Qwen family (``vision.family``) of a patch
    merger; :class:`ConfigError` for a model no family holds."""
    if cfg.projector.kind == "patch_merger" and cfg.vision.family in QWEN_VL_TYPES:
        return cfg.vision.family
    if cfg.projector.kind not in _FAMILY_OF_PROJECTOR:
        raise ConfigError(f"model.projector.kind={cfg.projector.kind!r}: no Hugging Face export for this model family "
                          f"(projector kinds {sorted([*_FAMILY_OF_PROJECTOR, 'patch_merger'])})")
    return _FAMILY_OF_PROJECTOR[cfg.projector.kind]


def check_family(cfg: VLMConfig, family: str) -> None:
    """Raises :class:`ConfigError` naming every model field that ``family``'s published layout cannot hold."""
    if family not in FAMILIES:
        raise ConfigError(f"family={family!r} is not one of {FAMILIES} (or auto)")
    wrong = [f"model.{k}={_field(cfg, k)!r} ({family} needs {v!r})" for k, v in _FAMILY_FIELDS[family].items()
             if _field(cfg, k) != v]
    if wrong:
        raise ConfigError(f"family={family}: the checkpoint's model config does not match it: {', '.join(wrong)}")


def _field(cfg: VLMConfig, dotted: str) -> object:
    part, name = dotted.split(".")
    return getattr(getattr(cfg, part), name)


def _text_config(t: LLMConfig) -> dict:
    """transformers' Qwen2Config (biases on q/k/v only) or LlamaConfig of the LLM, as JSON."""
    qwen = t.qkv_bias
    return {
        "model_type": "qwen2" if qwen else "llama", "vocab_size": t.vocab_size, "hidden_size": t.hidden,
        "intermediate_size": t.intermediate, "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
        "num_key_value_heads": t.kv_heads, "head_dim": t.head_dim, "rms_norm_eps": t.rms_eps, "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta}, "tie_word_embeddings": t.tie_embeddings,
        **({"use_sliding_window": False} if qwen else {"attention_bias": False, "mlp_bias": False}),
    }


def _internvl_config(cfg: VLMConfig) -> dict:
    """transformers' native InternVLConfig as JSON for the tower as built (features from its last block)."""
    v, t = cfg.vision, cfg.llm
    return {
        "architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl",
        "image_token_id": cfg.image_context_id, "image_seq_length": cfg.tokens_per_tile,
        "downsample_ratio": cfg.projector.downsample_ratio, "projector_hidden_act": "gelu",
        "vision_feature_layer": -1, "vision_feature_select_strategy": "default", "tie_word_embeddings": t.tie_embeddings,
        "vision_config": {
            "model_type": "internvl_vision", "hidden_size": v.width, "num_hidden_layers": v.num_blocks,
            "num_attention_heads": v.heads, "intermediate_size": v.mlp_dim, "image_size": [v.image_size] * 2,
            "patch_size": [v.patch_size] * 2, "norm_type": "rms_norm" if v.norm == "rmsnorm" else "layer_norm",
            "layer_norm_eps": v.norm_eps, "use_qk_norm": v.qk_norm, "attention_bias": v.qkv_bias, "hidden_act": "gelu",
            "use_mean_pooling": True, "use_absolute_position_embeddings": True, "num_channels": 3,
        },
        "text_config": _text_config(t),
    }


def _llava_config(cfg: VLMConfig) -> dict:
    """transformers' LlavaConfig as JSON for the tower as built (features from its last block)."""
    v, t = cfg.vision, cfg.llm
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": cfg.image_context_id, "image_seq_length": cfg.tokens_per_tile,
        "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu", "multimodal_projector_bias": True, "tie_word_embeddings": t.tie_embeddings,
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
            "num_hidden_layers": v.num_blocks, "num_attention_heads": v.heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "hidden_act": v.act, "layer_norm_eps": v.norm_eps, "num_channels": 3,
        },
        "text_config": _text_config(t),
    }


def _internvl_chat_config(cfg: VLMConfig, layout: Layout) -> dict:
    """OpenGVLab's InternVLChatConfig as JSON for the tower as built (``select_layer = -1``)."""
    v, t = cfg.vision, cfg.llm
    arch = "InternLM2ForCausalLM" if layout.llm == "internlm2" else ("Qwen2ForCausalLM" if t.qkv_bias else "LlamaForCausalLM")
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "select_layer": -1,
        "downsample_ratio": cfg.projector.downsample_ratio, "ps_version": "v2", "force_image_size": v.image_size,
        "template": None, "tie_word_embeddings": t.tie_embeddings,
        "vision_config": {
            "model_type": "intern_vit_6b", "architectures": ["InternVisionModel"], "hidden_size": v.width,
            "image_size": v.image_size, "patch_size": v.patch_size, "num_hidden_layers": v.num_blocks,
            "num_attention_heads": v.heads, "intermediate_size": v.mlp_dim, "qkv_bias": v.qkv_bias,
            "qk_normalization": v.qk_norm, "norm_type": "rms_norm" if v.norm == "rmsnorm" else "layer_norm",
            "layer_norm_eps": v.norm_eps, "hidden_act": "gelu", "use_flash_attn": False,
        },
        "llm_config": {
            "architectures": [arch], "model_type": {"InternLM2ForCausalLM": "internlm2", "Qwen2ForCausalLM": "qwen2",
                                                    "LlamaForCausalLM": "llama"}[arch],
            "vocab_size": t.vocab_size, "hidden_size": t.hidden, "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads, "num_key_value_heads": t.kv_heads, "intermediate_size": t.intermediate,
            "rope_theta": t.rope_theta, "rms_norm_eps": t.rms_eps, "tie_word_embeddings": t.tie_embeddings,
            "bias": False, "hidden_act": "silu",
        },
    }


def _qwen_vl_config(cfg: VLMConfig) -> dict:
    """transformers' Qwen2VLConfig / Qwen2_5_VLConfig as JSON for the model as built (the fields
    :func:`~omnibal_pl.model.hf_loading.vlm_config_from_hf` reads back; the video and vision start/end token ids are
    left to transformers' defaults, the published ones)."""
    v, t, family = cfg.vision, cfg.llm, cfg.vision.family
    vision = {"model_type": f"{family}_vision", "depth": v.num_blocks, "num_heads": v.heads, "patch_size": v.patch_size,
              "spatial_merge_size": v.spatial_merge, "temporal_patch_size": v.temporal_patch_size, "in_channels": 3}
    if family == "qwen2_5_vl":
        vision.update(hidden_size=v.width, intermediate_size=v.mlp_dim, out_hidden_size=t.hidden, hidden_act="silu",
                      window_size=v.window_size, fullatt_block_indexes=list(v.full_attention_blocks))
    else:  # Qwen2-VL names the tower's width embed_dim and the merger's output hidden_size
        if v.mlp_dim % v.width:
            raise ConfigError(f"model.vision.mlp_dim={v.mlp_dim}: Qwen2-VL's config holds the MLP size as an integer "
                              f"mlp_ratio of the width ({v.width}), so it cannot hold this model")
        vision.update(embed_dim=v.width, mlp_ratio=v.mlp_dim // v.width, hidden_size=t.hidden, hidden_act="quick_gelu")
    rope = {"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section)}
    text = {**_text_config(t), "model_type": f"{family}_text", "rope_parameters": rope}
    return {"architectures": [f"{'Qwen2_5_VL' if family == 'qwen2_5_vl' else 'Qwen2VL'}ForConditionalGeneration"],
            "model_type": family, "image_token_id": cfg.image_context_id, "tie_word_embeddings": t.tie_embeddings,
            "vision_config": vision, "text_config": text}


def _identity_post_layernorm(cfg: VLMConfig) -> dict[str, torch.Tensor]:
    """CLIP's post-layernorm, which LLaVA never applies to the features it takes: the identity."""
    w = cfg.vision.width
    return {"vision_tower.post_layernorm.weight": torch.ones(w), "vision_tower.post_layernorm.bias": torch.zeros(w)}


def _write_shards(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> list[str]:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_bytes``
    each (a larger single tensor gets its own shard) plus ``model.safetensors.index.json``."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def _resolve_family(cfg: VLMConfig, source: Path | None, family: str) -> str:
    """The family to write: ``family``, or with ``auto`` the source folder's, else the config's; checked against
    both (a source describing another model, or of another family, is an error naming what differs)."""
    source_family = None
    if source is not None:
        differences = folder_differences(cfg, source)
        if differences:
            raise ConfigError(f"source={source}: its config.json describes another model than the checkpoint's: "
                              f"{'; '.join(differences)}")
        model_type = json.loads((source / "config.json").read_text()).get("model_type")
        source_family = model_type if model_type in QWEN_VL_TYPES else _FAMILY_OF_VISION_LAYOUT.get(hf_layout(source).vision)
        if source_family is None:
            raise ConfigError(f"source={source}: no Hugging Face export for its model_type; pass source=null")
    if family == "auto":
        family = source_family or family_of(cfg)
    elif source_family not in (None, family):
        raise ConfigError(f"family={family}, but source={source} is a {source_family} folder; pass source=null to write "
                          f"the {family} layout from the checkpoint alone")
    check_family(cfg, family)
    return family


def _qwen_hub_name(key: str) -> str:
    """A rules' name of a Qwen2-VL tensor as the published checkpoints spell it (``visual.*`` stays)."""
    for ours, hub in _QWEN_HUB_PREFIXES:
        if key.startswith(ours):
            return hub + key[len(ours):]
    return key


def _state_and_config(model: VLM, family: str, source: Path | None) -> tuple[dict[str, torch.Tensor], dict, int]:
    """The folder's tensors (checkpoint names), its ``config.json`` and how many tensors came from ``source``."""
    cfg = model.cfg
    layout = hf_layout(source) if source is not None else _DEFAULT_LAYOUT[family]
    state = to_hf_state_dict(model, layout)
    if cfg.sparsify.enabled:  # Dynamic-LLaVA's predictors, under the original checkpoints' names
        state.update(original_predictor_state_dict(model))
    copied = 0
    if source is not None:
        unbuilt = skipped_tensors(source, cfg, layout)
        state.update(unbuilt)
        config, copied = json.loads((source / "config.json").read_text()), len(unbuilt)
    elif family in QWEN_VL_TYPES:
        config = _qwen_vl_config(cfg)
    elif family == "llava":
        state.update(_identity_post_layernorm(cfg))
        config = _llava_config(cfg)
    else:
        config = _internvl_config(cfg) if family == "internvl" else _internvl_chat_config(cfg, layout)
    if family in QWEN_VL_TYPES:
        state = {_qwen_hub_name(k): t for k, t in state.items()}
    return state, config, copied


def export_hf(model: VLM, target: str | Path, *, source: str | Path | None = None,
              tokenizer_source: str | Path | None = None, family: str = "auto", dtype: torch.dtype | None = None,
              max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> ExportResult:
    """Write ``model`` as a Hugging Face folder at ``target`` (see the module docstring).

    ``source``: the Hugging Face folder the model was initialised from (its config must describe the same
    model: the error names the fields that differ); ``tokenizer_source``: a folder whose tokenizer files and
    chat template are copied (None: none copied, :attr:`ExportResult.tokenizer_files` is empty); ``family``:
    ``auto`` (the source's, else from the config) or one of :data:`FAMILIES`, checked against the config;
    ``dtype``: cast the weights (None: as held); ``max_shard_bytes``: the largest safetensors file;
    ``overwrite``: replace an existing ``target``.
    """
    target = Path(target)
    source = Path(source) if source is not None else None
    if target.exists() and not overwrite:
        raise ConfigError(f"target={target} exists; choose another folder or pass overwrite=true to replace it")
    if model.cfg.adapter.enabled:
        raise ConfigError("model.adapter: the model still holds LoRA adapters; fold them into the base weights first "
                          "(omnibal_pl.model.lora.merge_lora; omnibal-export does it)")
    if tokenizer_source is not None and not Path(tokenizer_source).is_dir():
        raise ConfigError(f"tokenizer={tokenizer_source}: no such folder")
    family = _resolve_family(model.cfg, source, family)
    state, config, copied = _state_and_config(model, family, source)
    state = {k: (t.to(dtype) if dtype is not None else t).detach().cpu().contiguous() for k, t in state.items()}

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        weight_files = _write_shards(state, staging, max_shard_bytes)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        if source is not None:
            for name in ["generation_config.json", *(p.name for p in sorted(source.glob("*.py")))]:
                if (source / name).is_file():  # remote code (InternVL-Chat) and generation defaults
                    shutil.copy2(source / name, staging / name)
        tokenizer_files = []
        if tokenizer_source is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_source) / name).is_file():
                    shutil.copy2(Path(tokenizer_source) / name, staging / name)
                    tokenizer_files.append(name)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(target, weight_files, tokenizer_files, copied)
