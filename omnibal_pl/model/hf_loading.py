"""Load local Hugging Face checkpoints of InternVL-Chat and LLaVA-1.5 into :class:`VLM` (nothing is downloaded).

Supported layouts (by the checkpoint's ``config.json``):

- ``internvl_chat`` (OpenGVLab's remote-code ``InternVLChatModel``): ``vision_model.*`` (InternViT),
  ``mlp1.{0,1,3}.*`` and ``language_model.*`` with either InternLM2 names (fused grouped ``wqkv``,
  ``feed_forward.w1/w2/w3``, ``output``) or Llama/Qwen2 names (``self_attn.q_proj`` ..., ``lm_head``).
- ``llava`` (transformers' ``LlavaForConditionalGeneration``, both the hub layout
  ``vision_tower.vision_model.* / language_model.model.*`` and transformers 5's ``model.*`` variants).
- ``qwen2_vl`` / ``qwen2_5_vl`` (transformers' ``Qwen2VLForConditionalGeneration`` /
  ``Qwen2_5_VLForConditionalGeneration``: ``visual.*`` and the Qwen2 LLM, hub or transformers-5 spelling).

The mapping is a list of :class:`Rule` s, each tying some of our parameters to some checkpoint tensors
with a conversion both ways, so loading and exporting (:func:`to_hf_state_dict`) share one table.
Every checkpoint tensor must be used or deliberately skipped (blocks after the selected vision layer,
CLIP's unused post-layernorm), and every parameter of ours must be found; otherwise the error lists the
keys.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import safe_open

from omnibal_pl.errors import ConfigError
from omnibal_pl.model.config import LLMConfig, ProjectorConfig, VisionConfig, VLMConfig
from omnibal_pl.model.sparsify.original_names import is_original_predictor_key, original_to_ours
from omnibal_pl.model.lora import is_adapter_param
from omnibal_pl.model.vlm import VLM

Tensors = list[torch.Tensor]
QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")  # transformers' Qwen2VL/Qwen2_5_VLForConditionalGeneration layouts


def _same(ts: Tensors) -> Tensors:
    return list(ts)


@dataclass(frozen=True)
class Rule:
    """Our parameters ``ours`` <-> checkpoint tensors ``theirs``; ``to_ours``/``to_hf`` convert the lists."""

    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    to_ours: Callable[[Tensors], Tensors] = _same
    to_hf: Callable[[Tensors], Tensors] = _same


def _one(ours: str, theirs: str) -> Rule:
    return Rule((ours,), (theirs,))


def _reshaped(ours: str, theirs: str, hf_shape: tuple[int, ...], our_shape: tuple[int, ...]) -> Rule:
    return Rule((ours,), (theirs,), lambda ts: [ts[0].reshape(our_shape)], lambda ts: [ts[0].reshape(hf_shape)])


def _fused_qkv(ours: str, theirs: Sequence[str]) -> Rule:
    """Our fused ``qkv`` = concat of separate q, k, v projections (CLIP)."""
    return Rule((ours,), tuple(theirs), lambda ts: [torch.cat(ts, 0)], lambda ts: list(ts[0].chunk(3, 0)))


def _internlm2_wqkv(prefix: str, theirs: str, llm: LLMConfig) -> Rule:
    """InternLM2's ``wqkv``: rows grouped per kv head as [q x groups, k, v] x head_dim."""
    groups, hd = llm.heads // llm.kv_heads, llm.head_dim

    def split(ts: Tensors) -> Tensors:
        w = ts[0].reshape(llm.kv_heads, groups + 2, hd, llm.hidden)
        return [w[:, :groups].reshape(-1, llm.hidden), w[:, -2].reshape(-1, llm.hidden), w[:, -1].reshape(-1, llm.hidden)]

    def fuse(ts: Tensors) -> Tensors:
        q, k, v = (t.reshape(llm.kv_heads, -1, hd, llm.hidden) for t in ts)
        return [torch.cat([q, k, v], dim=1).reshape(-1, llm.hidden)]

    return Rule(tuple(f"{prefix}.attn.{n}.weight" for n in "qkv"), (theirs,), split, fuse)


def _qwen_vision_rules(cfg: VisionConfig) -> list[Rule]:
    """Qwen2-VL / Qwen2.5-VL ``visual.*``: the patch Conv3d is our linear patch embedding (kernel = stride)."""
    d, patch = cfg.width, (3, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    rules = [_reshaped("vision.embed.proj.weight", "visual.patch_embed.proj.weight", (d, *patch), (d, -1))]
    mlp = ("gate", "up", "down") if cfg.act == "swiglu" else ("fc1", "fc2")
    norms = ("weight", "bias") if cfg.norm == "layernorm" else ("weight",)
    for i in range(cfg.num_blocks):
        ours, theirs = f"vision.blocks.{i}", f"visual.blocks.{i}"
        rules += [_one(f"{ours}.{n}.{k}", f"{theirs}.{n}.{k}") for n in ("norm1", "norm2") for k in norms]
        rules += [_one(f"{ours}.attn.{n}.{k}", f"{theirs}.attn.{n}.{k}") for n in ("qkv", "proj") for k in ("weight", "bias")]
        rules += [_one(f"{ours}.mlp.{n}.{k}", f"{theirs}.mlp.{n}{'_proj' if cfg.act == 'swiglu' else ''}.{k}")
                  for n in mlp for k in ("weight", "bias")]
    return rules


def _internvl_hf_vision_rules(cfg: VisionConfig) -> list[Rule]:
    """transformers' native InternVL ``vision_tower.*`` (``InternVLVisionModel``): q/k/v as separate projections."""
    d, p = cfg.width, "vision_tower"
    rules = [
        _reshaped("vision.embed.cls", f"{p}.embeddings.cls_token", (1, 1, d), (d,)),
        _reshaped("vision.embed.pos", f"{p}.embeddings.position_embeddings", (1, cfg.seq_len, d), (cfg.seq_len, d)),
        _one("vision.embed.patch.weight", f"{p}.embeddings.patch_embeddings.projection.weight"),
        _one("vision.embed.patch.bias", f"{p}.embeddings.patch_embeddings.projection.bias"),
    ]
    norms = ("weight", "bias") if cfg.norm == "layernorm" else ("weight",)
    for i in range(cfg.num_blocks):
        ours, theirs = f"vision.blocks.{i}", f"{p}.encoder.layer.{i}"
        rules += [_one(f"{ours}.{o}.{k}", f"{theirs}.{t}.{k}") for o, t in (("norm1", "layernorm_before"),
                  ("norm2", "layernorm_after")) for k in norms]
        rules += [_one(f"{ours}.{o}.{k}", f"{theirs}.{t}.{k}") for o, t in (("attn.proj", "attention.projection_layer"),
                  ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")) for k in ("weight", "bias")]
        rules += [_one(f"{ours}.ls1", f"{theirs}.lambda_1"), _one(f"{ours}.ls2", f"{theirs}.lambda_2")]
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            rules.append(_fused_qkv(f"{ours}.attn.qkv.{kind}", [f"{theirs}.attention.{n}_proj.{kind}" for n in "qkv"]))
        if cfg.qk_norm:
            rules += [_one(f"{ours}.attn.{n}.weight", f"{theirs}.attention.{n}.weight") for n in ("q_norm", "k_norm")]
    return rules


def _vision_rules(cfg: VisionConfig, style: str) -> list[Rule]:
    if style == "qwen":
        return _qwen_vision_rules(cfg)
    if style == "internvl_hf":
        return _internvl_hf_vision_rules(cfg)
    d = cfg.width
    if style == "internvit":
        p = "vision_model"
        rules = [
            _reshaped("vision.embed.cls", f"{p}.embeddings.class_embedding", (1, 1, d), (d,)),
            _reshaped("vision.embed.pos", f"{p}.embeddings.position_embedding", (1, cfg.seq_len, d), (cfg.seq_len, d)),
            _one("vision.embed.patch.weight", f"{p}.embeddings.patch_embedding.weight"),
            _one("vision.embed.patch.bias", f"{p}.embeddings.patch_embedding.bias"),
        ]
        names = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    else:  # clip
        p = "vision_tower"
        rules = [
            _one("vision.embed.cls", f"{p}.embeddings.class_embedding"),
            _one("vision.embed.pos", f"{p}.embeddings.position_embedding.weight"),
            _one("vision.embed.patch.weight", f"{p}.embeddings.patch_embedding.weight"),
            _one("vision.embed.norm.weight", f"{p}.pre_layrnorm.weight"),
            _one("vision.embed.norm.bias", f"{p}.pre_layrnorm.bias"),
        ]
        names = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
                 "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(cfg.num_blocks):
        ours, theirs = f"vision.blocks.{i}", f"{p}.encoder.layers.{i}"
        for our_mod, their_mod in names.items():
            for kind in ("weight", "bias"):
                if kind == "weight" or cfg.norm == "layernorm" or not our_mod.startswith("norm"):
                    rules.append(_one(f"{ours}.{our_mod}.{kind}", f"{theirs}.{their_mod}.{kind}"))
        if style == "internvit":
            rules.append(_one(f"{ours}.attn.qkv.weight", f"{theirs}.attn.qkv.weight"))
            if cfg.qkv_bias:
                rules.append(_one(f"{ours}.attn.qkv.bias", f"{theirs}.attn.qkv.bias"))
            if cfg.qk_norm:
                rules += [_one(f"{ours}.attn.{n}.weight", f"{theirs}.attn.{n}.weight") for n in ("q_norm", "k_norm")]
            rules += [_one(f"{ours}.{n}", f"{theirs}.{n}") for n in ("ls1", "ls2")]
        else:
            for kind in ("weight", "bias"):
                rules.append(_fused_qkv(f"{ours}.attn.qkv.{kind}", [f"{theirs}.self_attn.{n}_proj.{kind}" for n in "qkv"]))
    return rules


def _projector_rules(cfg: VLMConfig, style: str) -> list[Rule]:
    if style == "qwen":
        norm = ("weight", "bias") if cfg.vision.norm == "layernorm" else ("weight",)
        return [_one(f"projector.norm.{k}", f"visual.merger.ln_q.{k}") for k in norm] + [
            _one(f"projector.{o}.{k}", f"visual.merger.mlp.{t}.{k}") for o, t in (("fc1", 0), ("fc2", 2))
            for k in ("weight", "bias")]
    if style == "internvit":
        pairs = {"norm": "mlp1.0", "fc1": "mlp1.1", "fc2": "mlp1.3"}
    elif style == "internvl_hf":
        pairs = {"norm": "multi_modal_projector.layer_norm", "fc1": "multi_modal_projector.linear_1",
                 "fc2": "multi_modal_projector.linear_2"}
    else:
        pairs = {"fc1": "multi_modal_projector.linear_1", "fc2": "multi_modal_projector.linear_2"}
    return [_one(f"projector.{o}.{k}", f"{t}.{k}") for o, t in pairs.items() for k in ("weight", "bias")]


def _llm_rules(llm: LLMConfig, style: str) -> list[Rule]:
    m = "language_model.model"
    if style == "internlm2":
        rules = [_one("llm.embed.tok.weight", f"{m}.tok_embeddings.weight"), _one("llm.head.norm.weight", f"{m}.norm.weight")]
        head = "language_model.output.weight"
        names = {"attn_norm": "attention_norm", "mlp_norm": "ffn_norm", "attn.o": "attention.wo",
                 "mlp.gate": "feed_forward.w1", "mlp.up": "feed_forward.w3", "mlp.down": "feed_forward.w2"}
    else:  # llama / qwen2
        rules = [_one("llm.embed.tok.weight", f"{m}.embed_tokens.weight"), _one("llm.head.norm.weight", f"{m}.norm.weight")]
        head = "language_model.lm_head.weight"
        names = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn.o": "self_attn.o_proj",
                 "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
                 "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj"}
    if not llm.tie_embeddings:
        rules.append(_one("llm.head.out.weight", head))
    for i in range(llm.layers):
        ours, theirs = f"llm.layers.{i}", f"{m}.layers.{i}"
        rules += [_one(f"{ours}.{o}.weight", f"{theirs}.{t}.weight") for o, t in names.items()]
        if style == "internlm2":
            rules.append(_internlm2_wqkv(ours, f"{theirs}.attention.wqkv.weight", llm))
        elif llm.qkv_bias:
            rules += [_one(f"{ours}.attn.{n}.bias", f"{theirs}.self_attn.{n}_proj.bias") for n in "qkv"]
    return rules


@dataclass(frozen=True)
class Layout:
    """Which naming a checkpoint uses: ``vision`` in {internvit, internvl_hf (transformers' native InternVL), clip,
    qwen}, ``llm`` in {internlm2, llama}."""

    vision: str
    llm: str

    def rules(self, cfg: VLMConfig) -> list[Rule]:
        return _vision_rules(cfg.vision, self.vision) + _projector_rules(cfg, self.vision) + _llm_rules(cfg.llm, self.llm)

    def skipped(self, key: str, cfg: VLMConfig) -> bool:
        """Checkpoint tensors we deliberately do not load."""
        layer = re.match(r"(vision_model|vision_tower)\.encoder\.layers?\.(\d+)\.", key)
        if layer and int(layer.group(2)) >= cfg.vision.num_blocks:
            return True  # blocks after the selected feature layer never influence the output
        if key.startswith("vision_tower.post_layernorm.") or key.endswith("embeddings.position_ids"):
            return True
        return cfg.llm.tie_embeddings and key in ("language_model.lm_head.weight", "language_model.output.weight")


# --------------------------------------------------------------------------------------------- config


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: a Hugging Face checkpoint directory needs its config.json") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None


def _layout(config: dict, path: Path) -> Layout:
    kind = config.get("model_type")
    if kind == "llava":
        return Layout("clip", "llama")
    if kind in QWEN_VL_TYPES:
        return Layout("qwen", "llama")
    if kind == "internvl":
        return Layout("internvl_hf", "llama")
    if kind == "internvl_chat":
        arch = (config["llm_config"].get("architectures") or [""])[0]
        return Layout("internvit", "internlm2" if arch.startswith("InternLM2") else "llama")
    raise ConfigError(f"{path}: model_type {kind!r} is not supported; expected 'internvl_chat', 'internvl', 'llava', "
                      f"'qwen2_vl' or 'qwen2_5_vl'")


def _rope_theta(text: dict) -> float:
    return float(text.get("rope_theta") or (text.get("rope_parameters") or {}).get("rope_theta") or 10000.0)


def _llm_config(text: dict, qkv_bias: bool) -> LLMConfig:
    # Defaults are those of transformers' LlamaConfig: llava-hf's published text_config omits them.
    heads = text.get("num_attention_heads", 32)
    return LLMConfig(
        vocab_size=text.get("vocab_size", 32000),
        hidden=text.get("hidden_size", 4096),
        layers=text.get("num_hidden_layers", 32),
        heads=heads,
        kv_heads=text.get("num_key_value_heads") or heads,
        intermediate=text.get("intermediate_size", 11008),
        rope_theta=_rope_theta(text),
        rms_eps=text.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(text.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
    )


def _select_layer(hf_index: int, where: str) -> int:
    """HF indexes ``hidden_states`` (0 = embeddings); ours indexes block outputs."""
    if not isinstance(hf_index, int) or hf_index == 0:
        raise ConfigError(f"{where}: feature layer {hf_index!r} is not supported (need one block output, not 0 or a list)")
    return hf_index - 1 if hf_index > 0 else hf_index


def _find_token_id(path: Path, token: str) -> int | None:
    added = path / "added_tokens.json"
    if added.exists() and token in _read_json(added):
        return int(_read_json(added)[token])
    tok_cfg = path / "tokenizer_config.json"
    if tok_cfg.exists():
        for idx, entry in (_read_json(tok_cfg).get("added_tokens_decoder") or {}).items():
            if entry.get("content") == token:
                return int(idx)
    tok = path / "tokenizer.json"
    if tok.exists():
        for entry in _read_json(tok).get("added_tokens") or []:
            if entry.get("content") == token:
                return int(entry["id"])
    return None


def _qwen_vl_config(config: dict, name: str, where: str) -> VLMConfig:
    """Qwen2-VL / Qwen2.5-VL: the text fields at the top (hub) or under ``text_config`` (transformers 5)."""
    v, text = config["vision_config"], config.get("text_config") or config
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if not rope.get("mrope_section"):
        raise ConfigError(f"{where}: no mrope_section in rope_parameters / rope_scaling")
    qwen25 = config["model_type"] == "qwen2_5_vl"
    merge, patch = v.get("spatial_merge_size", 2), v.get("patch_size", 14)
    width = v["hidden_size"] if qwen25 else v["embed_dim"]
    vision = VisionConfig(
        image_size=patch * merge, patch_size=patch, width=width, depth=v["depth"], heads=v["num_heads"],
        mlp_dim=v["intermediate_size"] if qwen25 else int(width * v.get("mlp_ratio", 4)),
        norm="rmsnorm" if qwen25 else "layernorm", norm_eps=1e-6, act="swiglu" if qwen25 else "quick_gelu",
        qkv_bias=True, qk_norm=False, layerscale=False, class_token=False, patch_bias=False, embed_norm=False,
        family=config["model_type"], temporal_patch_size=v.get("temporal_patch_size", 2), spatial_merge=merge,
        window_size=v.get("window_size", 0) if qwen25 else 0,
        full_attention_blocks=list(v.get("fullatt_block_indexes", [])) if qwen25 else [])
    llm = dataclasses.replace(_llm_config(text, qkv_bias=True), mrope_section=list(rope["mrope_section"]))
    image_id = config.get("image_token_id", text.get("image_token_id", 151655))
    return VLMConfig(name=name, vision=vision, projector=ProjectorConfig(kind="patch_merger"), llm=llm,
                     image_context_id=int(image_id))


def _square(size: int | Sequence[int], where: str) -> int:
    sides = [size, size] if isinstance(size, int) else list(size)
    if len(sides) != 2 or sides[0] != sides[1]:
        raise ConfigError(f"{where}: only square images and patches are supported, got {size}")
    return int(sides[0])


def _internvl_hf_config(config: dict, name: str, where: str) -> VLMConfig:
    """transformers' native ``InternVLConfig`` (``model_type: internvl``): InternViT + pixel shuffle + Qwen2/Llama."""
    v, text = config["vision_config"], config["text_config"]
    if config.get("downsample_ratio", 0.5) != 0.5 or config.get("projector_hidden_act", "gelu") != "gelu" \
            or config.get("vision_feature_select_strategy", "default") != "default":
        raise ConfigError(f"{where}: only downsample_ratio 0.5, a GELU projector and the 'default' feature strategy "
                          "are supported")
    vision = VisionConfig(
        image_size=_square(v.get("image_size", 448), where), patch_size=_square(v.get("patch_size", 14), where),
        width=v.get("hidden_size", 1024), depth=v.get("num_hidden_layers", 24), heads=v.get("num_attention_heads", 16),
        mlp_dim=v.get("intermediate_size", 4096), norm="rmsnorm" if v.get("norm_type") == "rms_norm" else "layernorm",
        norm_eps=v.get("layer_norm_eps", 1e-6), act="gelu", qkv_bias=bool(v.get("attention_bias", False)),
        qk_norm=bool(v.get("use_qk_norm", False)), layerscale=True, class_token=True, patch_bias=True,
        embed_norm=False, select_layer=_select_layer(config.get("vision_feature_layer", -1), where),
    )
    qwen = text.get("model_type", "qwen2") == "qwen2"
    # the top-level flag decides (InternVLConfig's default: tied); the text config's own is ignored by transformers
    tied = bool(config.get("tie_word_embeddings", True))
    llm = _llm_config({**text, "tie_word_embeddings": tied}, qkv_bias=qwen or bool(text.get("attention_bias", False)))
    return VLMConfig(name=name, vision=vision, projector=ProjectorConfig(kind="pixel_shuffle_mlp"), llm=llm,
                     image_context_id=int(config.get("image_token_id", 0)))


def vlm_config_from_hf(path: str | Path, image_context_id: int | None = None, name: str | None = None) -> VLMConfig:
    """Our :class:`VLMConfig` from a checkpoint directory's ``config.json``.

    ``image_context_id`` defaults to LLaVA's ``image_token_index`` or, for InternVL, the id of
    ``<IMG_CONTEXT>`` in the directory's tokenizer files.
    """
    path = Path(path)
    config = _read_json(path / "config.json")
    layout = _layout(config, path)
    where = str(path / "config.json")
    if layout.vision in ("qwen", "internvl_hf"):
        read = _qwen_vl_config if layout.vision == "qwen" else _internvl_hf_config
        cfg = read(config, name or path.name, where)
        return dataclasses.replace(cfg, image_context_id=image_context_id) if image_context_id is not None else cfg
    if layout.vision == "clip":
        v = config["vision_config"]
        if config.get("vision_feature_select_strategy", "default") != "default":
            raise ConfigError(f"{where}: vision_feature_select_strategy must be 'default' (class token dropped)")
        if config.get("projector_hidden_act", "gelu") != "gelu" or not config.get("multimodal_projector_bias", True):
            raise ConfigError(f"{where}: only LLaVA-1.5's GELU projector with biases is supported")
        vision = VisionConfig(
            image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32), width=v.get("hidden_size", 768),
            depth=v.get("num_hidden_layers", 12), heads=v.get("num_attention_heads", 12),
            mlp_dim=v.get("intermediate_size", 3072), norm="layernorm", norm_eps=v.get("layer_norm_eps", 1e-5),
            act=v.get("hidden_act", "quick_gelu"), qkv_bias=True, qk_norm=False, layerscale=False, class_token=True,
            patch_bias=False, embed_norm=True, select_layer=_select_layer(config.get("vision_feature_layer", -2), where),
        )
        projector = ProjectorConfig(kind="mlp2x_gelu")
        text = config.get("text_config") or {}
        llm = _llm_config(text, qkv_bias=bool(text.get("attention_bias", False)))
        image_id = config.get("image_token_index", config.get("image_token_id"))
        image_id = image_context_id if image_context_id is not None else image_id
    else:
        v, text = config["vision_config"], config["llm_config"]
        if config.get("ps_version", "v2") != "v2" or config.get("downsample_ratio", 0.5) != 0.5:
            raise ConfigError(f"{where}: only ps_version 'v2' with downsample_ratio 0.5 is supported")
        vision = VisionConfig(
            image_size=config.get("force_image_size") or v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
            depth=v["num_hidden_layers"], heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"],
            norm="rmsnorm" if v.get("norm_type", "rms_norm") == "rms_norm" else "layernorm",
            norm_eps=v.get("layer_norm_eps", 1e-6), act="gelu", qkv_bias=bool(v.get("qkv_bias", False)),
            qk_norm=bool(v.get("qk_normalization", False)), layerscale=True, class_token=True, patch_bias=True,
            embed_norm=False, select_layer=_select_layer(config.get("select_layer", -1), where),
        )
        projector = ProjectorConfig(kind="pixel_shuffle_mlp")
        if layout.llm == "internlm2" and text.get("bias", False):
            raise ConfigError(f"{where}: InternLM2 with bias=true (biases on wqkv/wo) is not supported")
        qwen = (text.get("architectures") or [""])[0].startswith("Qwen2")
        llm = _llm_config(text, qkv_bias=qwen or bool(text.get("attention_bias", False)))
        image_id = image_context_id if image_context_id is not None else _find_token_id(path, "<IMG_CONTEXT>")
    if image_id is None:
        raise ConfigError(f"{path}: cannot find the image-context token id; pass image_context_id explicitly")
    return VLMConfig(name=name or path.name, vision=vision, projector=projector, llm=llm, image_context_id=int(image_id))


def hf_layout(path: str | Path) -> Layout:
    """The tensor naming of a checkpoint directory, from its ``config.json``."""
    path = Path(path)
    return _layout(_read_json(path / "config.json"), path)


# Model fields a Hugging Face config.json does not hold: they are the run's choice, whatever the folder.
RUN_SIDE_FIELDS = ("attention_backend", "sparsify", "adapter")


def folder_differences(cfg: VLMConfig, path: str | Path) -> list[str]:
    """``"field: ours != folder's"`` for every architecture field (vision, projector, LLM, image-context id) in
    which ``cfg`` differs from the checkpoint directory's ``config.json``; empty when the folder holds the model
    ``cfg`` describes. An InternVL folder without tokenizer files is taken to use ``cfg``'s image-context id."""
    path = Path(path)
    named = hf_layout(path).vision == "clip" or _find_token_id(path, "<IMG_CONTEXT>") is not None
    folder = vlm_config_from_hf(path, image_context_id=None if named else cfg.image_context_id)

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if prefix or k not in ("name", *RUN_SIDE_FIELDS):
                out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(cfg.to_dict()), flat(folder.to_dict())
    return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if a[k] != b[k]]


# --------------------------------------------------------------------------------------------- weights


def _normalise_key(key: str) -> str:
    """Map transformers-5 / hub spellings of LLaVA keys onto one spelling (the rules' names)."""
    key = re.sub(r"^model\.(vision_tower|multi_modal_projector|visual)\.", r"\1.", key)
    key = re.sub(r"^model\.language_model\.", "language_model.model.", key)
    key = re.sub(r"^model\.(layers|embed_tokens|norm)\.", r"language_model.model.\1.", key)  # Qwen2-VL hub files
    key = re.sub(r"^lm_head\.", "language_model.lm_head.", key)
    return key.replace("vision_tower.vision_model.", "vision_tower.")


def _checkpoint_files(path: Path) -> dict[str, Path]:
    """Normalised key -> the safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index)["weight_map"]
        return {_normalise_key(k): path / f for k, f in weight_map.items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise ConfigError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints load)")
    with safe_open(single, "pt") as f:
        return {_normalise_key(k): single for k in f.keys()}


def _read_tensors(files: dict[str, Path], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    raw_names: dict[Path, dict[str, str]] = {}
    for f in {files[k] for k in keys}:
        with safe_open(f, "pt") as handle:
            raw_names[f] = {_normalise_key(k): k for k in handle.keys()}
    out = {}
    by_file: dict[Path, list[str]] = {}
    for k in keys:
        by_file.setdefault(files[k], []).append(k)
    for f, ks in by_file.items():
        with safe_open(f, "pt") as handle:
            for k in ks:
                out[k] = handle.get_tensor(raw_names[f][k])
    return out


def load_hf_weights(model: VLM, path: str | Path, layout: Layout | None = None) -> None:
    """Copy a checkpoint's tensors into ``model`` (which may live on the meta device: tensors are assigned).

    Raises :class:`ConfigError` naming missing checkpoint keys, unexpected ones, or shape mismatches.
    """
    path = Path(path)
    layout = layout or _layout(_read_json(path / "config.json"), path)
    files = _checkpoint_files(path)
    rules = layout.rules(model.cfg)
    needed = [k for r in rules for k in r.theirs]
    missing = sorted(set(needed) - set(files))
    # Dynamic-LLaVA predictors under the original's names load into a model with sparsification on
    predictors = [k for k in files if is_original_predictor_key(k)] if model.cfg.sparsify.enabled else []
    used = set(needed) | set(predictors)
    unexpected = sorted(k for k in files if k not in used and not layout.skipped(k, model.cfg))
    if missing or unexpected:
        raise ConfigError(
            f"{path}: checkpoint does not match the model built from its config: "
            f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''} ({len(missing)}), "
            f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''} ({len(unexpected)}); "
            f"check the model config (layers, select_layer, tie_embeddings) against the checkpoint"
        )
    tensors = _read_tensors(files, needed)
    params = dict(model.named_parameters())
    loaded: dict[str, torch.Tensor] = {}
    for rule in rules:
        for name, t in zip(rule.ours, rule.to_ours([tensors[k] for k in rule.theirs])):
            if name not in params:
                raise ConfigError(f"{path}: the mapping names {name!r}, which this model does not have")
            if tuple(t.shape) != tuple(params[name].shape):
                raise ConfigError(f"{path}: {rule.theirs} gives {name} shape {tuple(t.shape)}, model wants {tuple(params[name].shape)}")
            loaded[name] = t.to(params[name].dtype)
    if predictors:
        loaded.update(original_to_ours(model, _read_tensors(files, predictors)))
    # Dynamic-LLaVA's predictors (when the checkpoint has none) and LoRA adapters are new: they keep their initialisation
    not_loaded = sorted(n for n in set(params) - set(loaded) if ".sparsifier." not in n and not is_adapter_param(n))
    if not_loaded:
        raise ConfigError(f"{path}: no checkpoint tensor for parameters {not_loaded}")
    model.load_state_dict(loaded, strict=False, assign=True)
    if model.cfg.llm.tie_embeddings:
        model.llm.head.out.weight = model.llm.embed.tok.weight


def load_hf_model(path: str | Path, image_context_id: int | None = None, dtype: torch.dtype | None = None) -> VLM:
    """Build our :class:`VLM` from a local checkpoint directory and load its weights (on CPU)."""
    cfg = vlm_config_from_hf(path, image_context_id)
    with torch.device("meta"):
        model = VLM(cfg)
    load_hf_weights(model, path)
    return model.to(dtype) if dtype is not None else model


def skipped_tensors(path: str | Path, cfg: VLMConfig, layout: Layout) -> dict[str, torch.Tensor]:
    """The checkpoint's weights that :func:`load_hf_weights` deliberately leaves out of a model of ``cfg``
    (vision blocks after the selected layer, CLIP's post-layernorm), under their normalised names; a tied
    head and ``position_ids`` buffers are not among them."""
    files = _checkpoint_files(Path(path))
    tied_heads = ("language_model.lm_head.weight", "language_model.output.weight")
    keys = [k for k in files if layout.skipped(k, cfg) and not k.endswith("position_ids") and k not in tied_heads]
    return _read_tensors(files, keys)


def to_hf_state_dict(model: VLM, layout: Layout) -> dict[str, torch.Tensor]:
    """Our weights under the checkpoint names of ``layout`` (the inverse of :func:`load_hf_weights`)."""
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for rule in layout.rules(model.cfg):
        for key, t in zip(rule.theirs, rule.to_hf([params[n].detach() for n in rule.ours])):
            out[key] = t.contiguous()
    return out
