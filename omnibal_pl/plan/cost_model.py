"""Per-block costs from the model config alone: FLOPs and activation bytes, timed by a device preset.

This plans models whose hardware is not at hand (InternVL-Chat-V1.5, 26B, on H100s). Per block and
micro-batch (:class:`~omnibal_pl.batch.MicroBatchShape`):

- FLOPs: :func:`omnibal_pl.model.flops.block_forward_flops` (linear terms plus the sum over packed
  samples of s^2), the attention core's share from :func:`~omnibal_pl.model.flops.attention_forward_flops`;
  backward is twice the forward. Qwen vision blocks: each sample's merge blocks as one near-square image
  (:func:`~omnibal_pl.model.flops.square_grids`), attended whole or by windows as the block does.
- Time of an op: a roofline, ``overhead_s + max(flops / (peak * efficiency), bytes / bandwidth)`` where
  the bytes are the parameters read plus the activations written (forward) or twice both (backward).
- Activations kept for backward, in the training dtype, counted tensor by tensor for this package's
  blocks with flash attention (which keeps only its output and a float32 log-sum-exp per query and head).
  ``attention`` recompute frees what the attention core keeps beyond its inputs and output (the
  log-sum-exp; on the masked eager path of Dynamic-LLaVA, the float32 [heads, n, n] score tensors);
  ``full`` keeps only the block input. Only transformer blocks recompute; other blocks get the same
  bytes and no recompute time in every mode, so the planner never picks a mode for them.
- Parameters per block: counted on the real model built on the meta device (no memory, exact names).
- Dynamic-LLaVA (``cfg.sparsify.enabled``): in training nothing is removed; layers >= ``sparse_layer``
  run the masked eager attention over the full sequence, which costs the dense float32 score and PV
  matmuls plus elementwise passes instead of causal flash attention, and keeps the float32 scores
  (:func:`omnibal_pl.model.sparsify.masked_attention_cost`). In the ``prefill`` phase (inference) the
  predictors' kept counts apply: from ``sparse_layer`` on, each sample keeps
  ``int(image_tokens * vision_keep_rate)`` of its image tokens and its text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from omnibal_pl.batch import MicroBatchShape
from omnibal_pl.errors import ConfigError
from omnibal_pl.model.config import VLMConfig
from omnibal_pl.model.flops import attention_forward_flops, block_forward_flops, block_kind, square_grids
from omnibal_pl.model.sparsify import masked_attention_cost
from omnibal_pl.model.vlm import VLM
from omnibal_pl.plan.costs import BlockCost, CostProfile, ZeroSharding, training_static_bytes

MIB = 2**20
PHASES = ("train", "prefill")


@dataclass(frozen=True)
class DevicePreset:
    """What the cost model knows about an accelerator.

    ``bf16_tflops``: dense peak of 16-bit matmuls (TFLOP/s); ``fp32_tflops``: peak without tensor cores,
    where the float32 eager masked attention runs; ``hbm_gbs``: memory bandwidth (GB/s);
    ``memory_bytes``: device memory as torch reports it; ``p2p_gbs``: bandwidth between pipeline stages
    (GB/s; the inter-node link); ``efficiency``: achieved fraction of peak on matmuls; ``overhead_s``:
    fixed seconds per block op (kernel launches).
    """

    name: str
    bf16_tflops: float
    fp32_tflops: float
    hbm_gbs: float
    memory_bytes: float
    p2p_gbs: float
    efficiency: float = 0.55
    overhead_s: float = 0.0

    def op_seconds(self, flops: float, bytes_moved: float, fp32: bool = False) -> float:
        """Roofline time of one op: ``flops`` at the (fp32 or bf16) peak times efficiency, or
        ``bytes_moved`` at the memory bandwidth, whichever is longer."""
        peak = (self.fp32_tflops if fp32 else self.bf16_tflops) * 1e12 * self.efficiency
        return max(flops / peak, bytes_moved / (self.hbm_gbs * 1e9))


# Data-sheet figures (dense, no sparsity); memory as torch.cuda reports it; p2p: 400 Gb/s InfiniBand per
# GPU (H100, H200), 200 Gb/s (A100).
PRESETS: dict[str, DevicePreset] = {
    "h100_80gb": DevicePreset("h100_80gb", bf16_tflops=989.0, fp32_tflops=67.0, hbm_gbs=3350.0,
                              memory_bytes=81559 * MIB, p2p_gbs=50.0),
    "h200": DevicePreset("h200", bf16_tflops=989.0, fp32_tflops=67.0, hbm_gbs=4800.0,
                         memory_bytes=143771 * MIB, p2p_gbs=50.0),
    "a100_80gb": DevicePreset("a100_80gb", bf16_tflops=312.0, fp32_tflops=19.5, hbm_gbs=2039.0,
                              memory_bytes=81251 * MIB, p2p_gbs=25.0),
}


def device_preset(name: str) -> DevicePreset:
    """The preset called ``name``; ``measured`` presets come from :func:`fit_device`."""
    if name not in PRESETS:
        raise ConfigError(f"device preset {name!r} is unknown; use one of {sorted(PRESETS)}, or 'measured' "
                          "(fitted to a profile of this machine)")
    return PRESETS[name]


_PARAMS: dict[str, list[tuple[str, int]]] = {}


def block_parameters(cfg: VLMConfig) -> list[tuple[str, int]]:
    """``(name, parameter count)`` of every block of ``VLM(cfg).blocks()``, in order (built on the meta
    device, cached per config; a tied head counts the shared matrix again, as its stage holds a copy)."""
    key = repr(cfg)
    if key not in _PARAMS:
        with torch.device("meta"):
            model = VLM(cfg)
        _PARAMS[key] = [(name, sum(p.numel() for p in block.parameters())) for name, block in model.blocks()]
    return list(_PARAMS[key])


@dataclass(frozen=True)
class BlockWork:
    """One block's forward work for one micro-batch: ``linear_flops`` and ``attention_flops`` (the
    attention core; on the masked path the dense fp32 matmuls), ``attention_fp32``: whether the core
    runs the float32 eager path, ``attention_bytes``: memory traffic of the core beyond its inputs,
    ``act_*``: bytes kept for backward per recompute mode, ``out_bytes``: the output (a stage boundary's
    transfer)."""

    linear_flops: float
    attention_flops: float
    attention_fp32: bool
    attention_bytes: float
    act_none: float
    act_attention: float
    act_full: float
    out_bytes: float


def _llm_lengths(cfg: VLMConfig, shape: MicroBatchShape, layer: int | None, phase: str) -> list[int]:
    """Sample lengths seen by LLM layer ``layer`` (None: the head): all tokens in training; at prefill with
    sparsification, from ``sparse_layer`` on, only the kept image tokens plus the text."""
    lengths = shape.seqlens
    sp = cfg.sparsify
    if phase == "train" or not sp.enabled or not sp.vision_predictor or (layer is not None and layer < sp.sparse_layer):
        return lengths
    images = shape.image_tokens(cfg.tokens_per_tile)
    return [n - k + int(k * sp.vision_keep_rate) for n, k in zip(lengths, images)]


def block_work(cfg: VLMConfig, name: str, shape: MicroBatchShape, phase: str = "train",
               element_bytes: int = 2) -> BlockWork:
    """:class:`BlockWork` of block ``name`` (see the module docstring for what is counted)."""
    if phase not in PHASES:
        raise ConfigError(f"phase {phase!r} is not one of {PHASES}")
    kind = block_kind(name)
    v, llm, e = cfg.vision, cfg.llm, element_bytes
    tiles, tpt = shape.vit_cap, cfg.tokens_per_tile
    n_vis = tiles * v.seq_len  # tokens inside the encoder
    index = int(name.rsplit(".", 1)[1]) if kind in ("llm_layer", "vision_block") else 0  # within its kind
    layer = index if kind == "llm_layer" else None
    lengths = _llm_lengths(cfg, shape, layer, phase)
    tokens = sum(lengths)
    # Qwen's vision attention spans whole images or windows: each sample's blocks as one near-square image
    grids = square_grids(shape.sample_tiles(tpt), v.spatial_merge) if v.family != "vit" else None
    flops = block_forward_flops(cfg, kind, tiles, lengths, grids, index)
    attn = attention_forward_flops(cfg, kind, tiles, lengths, grids, index)
    if kind == "vision_embed":
        act = e * (tiles * 3 * v.image_size**2 + (n_vis * v.width if v.embed_norm else 0))
        return BlockWork(flops, 0.0, False, 0.0, act, act, act, e * n_vis * v.width)
    if kind == "vision_block":
        width = (8 + 2 * v.qk_norm + 2 * v.layerscale) * v.width + 2 * v.mlp_dim
        lse = 4.0 * tiles * v.heads * v.seq_len
        none = e * n_vis * width + lse
        return BlockWork(flops - attn, attn, False, 0.0, none, none - lse, e * n_vis * v.width, e * n_vis * v.width)
    if kind == "projector":
        rows = tiles * tpt
        width_in = v.width * cfg.projector.merge
        act = e * rows * ((2 * width_in if cfg.projector.kind == "pixel_shuffle_mlp" else width_in) + 2 * llm.hidden)
        return BlockWork(flops, 0.0, False, 0.0, act, act, act, e * rows * llm.hidden)
    if kind == "llm_embed":
        act = 8.0 * tokens  # the token ids
        return BlockWork(0.0, 0.0, False, 0.0, act, act, act, e * tokens * llm.hidden)
    d, hd, f = llm.hidden, llm.head_dim, llm.intermediate
    if kind == "llm_head":
        act = e * tokens * 2 * d + (e + 4) * tokens * llm.vocab_size  # norm in/out, logits, fp32 log-softmax
        return BlockWork(flops, 0.0, False, 0.0, act, act, act, 0.0)
    # llm_layer
    full = e * tokens * d
    lse = 4.0 * llm.heads * tokens
    none = e * tokens * (6 * d + 2 * llm.kv_heads * hd + 4 * f) + lse
    sp = cfg.sparsify
    if phase == "train" and sp.enabled and layer >= sp.sparse_layer:
        masked = masked_attention_cost(llm.heads, hd, lengths)
        squares = sum(n * n for n in lengths)
        dense = 4.0 * llm.heads * hd * squares  # the fp32 score and PV matmuls over whole segments
        copies = 4.0 * 3 * tokens * llm.heads * hd  # fp32 copies of q and the repeated k, v
        traffic = 64.0 * llm.heads * squares  # ~8 elementwise passes reading and writing fp32 scores
        return BlockWork(flops - attn, dense, True, traffic, none + masked.saved_bytes + copies,
                         none - lse, full + e * tokens, full + e * tokens)
    return BlockWork(flops - attn, attn, False, 0.0, none, none - lse, full, full)


def _times(work: BlockWork, params: int, device: DevicePreset, element_bytes: int) -> tuple[float, float, float]:
    """(forward, backward, attention-core forward) seconds."""
    weights = params * element_bytes
    core = device.op_seconds(work.attention_flops, work.attention_bytes, fp32=work.attention_fp32)
    forward = device.op_seconds(work.linear_flops, weights + work.act_none) + core + device.overhead_s
    backward = device.op_seconds(2 * work.linear_flops, 2 * (weights + work.act_none)) + 2 * core + device.overhead_s
    return forward, backward, core


def cost_model_profile(cfg: VLMConfig, shape: MicroBatchShape, device: DevicePreset | str = "h100_80gb", *,
                       phase: str = "train", element_bytes: int = 2, sharding: ZeroSharding = ZeroSharding()
                       ) -> CostProfile:
    """The :class:`CostProfile` (``source="cost_model"``) of ``cfg`` for one micro-batch of ``shape`` on
    ``device``. ``phase="prefill"``: forward only (inference), nothing kept for backward, parameters only.
    ``sharding``: the ZeRO level and DP size the static bytes are split by."""
    preset = device_preset(device) if isinstance(device, str) else device
    blocks = []
    for name, params in block_parameters(cfg):
        kind = block_kind(name)
        work = block_work(cfg, name, shape, phase, element_bytes)
        forward, backward, core = _times(work, params, preset, element_bytes)
        param_bytes, grad_opt = training_static_bytes(params, element_bytes, sharding)
        recomputes = kind in ("vision_block", "llm_layer")
        if phase == "prefill":
            blocks.append(BlockCost(name, kind, forward, 0.0, 0, 0, 0, 0.0, 0.0, param_bytes, 0))
            continue
        blocks.append(BlockCost(
            name=name, kind=kind, forward_s=forward, backward_s=backward,
            act_none_bytes=int(work.act_none),
            act_attention_bytes=int(work.act_attention if recomputes else work.act_none),
            act_full_bytes=int(work.act_full if recomputes else work.act_none),
            recompute_attention_s=core if recomputes else 0.0,
            recompute_full_s=forward if recomputes else 0.0,
            param_bytes=param_bytes, grad_opt_bytes=grad_opt,
        ))
    return CostProfile(blocks=blocks, model=cfg.name, device=preset.name,
                       micro_batch={**shape.as_dict(), "dtype_bytes": element_bytes, "phase": phase},
                       source="cost_model")


def hop_seconds(cfg: VLMConfig, shape: MicroBatchShape, device: DevicePreset | str, element_bytes: int = 2) -> float:
    """Seconds to send the largest block output between pipeline stages (one hop of the simulator)."""
    preset = device_preset(device) if isinstance(device, str) else device
    largest = max(block_work(cfg, name, shape, "train", element_bytes).out_bytes for name, _ in block_parameters(cfg))
    return largest / (preset.p2p_gbs * 1e9)


def fit_device(profile: CostProfile, cfg: VLMConfig, memory_bytes: float, name: str = "measured") -> DevicePreset:
    """A preset fitted to a measured profile of ``cfg``: least squares of each block's measured
    forward + backward seconds against its training FLOPs, ``seconds = flops / throughput + 2 overhead``
    (efficiency 1, the fitted throughput standing for peak x efficiency; no bandwidth limit)."""
    shape = MicroBatchShape(**{k: int(profile.micro_batch[k]) for k in ("vit_cap", "token_cap", "samples")})
    profile.check_blocks([n for n, _ in block_parameters(cfg)])
    flops, seconds = [], []
    for block in profile.blocks:
        work = block_work(cfg, block.name, shape)
        flops.append(3.0 * (work.linear_flops + work.attention_flops))
        seconds.append(block.forward_s + block.backward_s)
    x, y = np.array(flops), np.array(seconds)
    (slope, intercept), *_ = np.linalg.lstsq(np.stack([x, np.full_like(x, 2.0)], axis=1), y, rcond=None)
    if intercept < 0:  # no negative launch cost: refit through the origin
        slope, intercept = float(x @ y / (x @ x)), 0.0
    if slope <= 0:
        raise ConfigError(f"profile of {profile.model!r}: block times do not grow with FLOPs; profile a larger "
                          "micro-batch shape before fitting a device to it")
    tflops = 1.0 / slope / 1e12
    return DevicePreset(name, bf16_tflops=tflops, fp32_tflops=tflops, hbm_gbs=float("inf"),
                        memory_bytes=memory_bytes, p2p_gbs=float("inf"), efficiency=1.0, overhead_s=float(intercept))


def total_forward_flops(cfg: VLMConfig, shape: MicroBatchShape, phase: str = "train",
                        names: Sequence[str] | None = None) -> float:
    """Forward FLOPs of the named blocks (all by default) for one micro-batch in ``phase``."""
    names = [n for n, _ in block_parameters(cfg)] if names is None else names
    return sum(w.linear_flops + w.attention_flops for w in (block_work(cfg, n, shape, phase) for n in names))


