"""Qwen2-VL / Qwen2.5-VL's dynamic-resolution vision encoder and patch merger as VLM blocks.

Every image is its own grid of ``h x w`` patches of 14 px (``t`` frames of 2: a still image is its
frame twice), flattened as Qwen's image processor does: ``pixel_values`` [P, 3 * 2 * 14 * 14], the
patches of one ``2 x 2`` merge block consecutive, blocks row-major, images in packing order. A "tile"
of this family is one merge block: it becomes one LLM token, so ``image_flags`` has one entry per block
([P / 4], 1 = real) and the padding blocks after the real ones carry zeros.

Blocks (see :mod:`omnibal_pl.model.vlm`):

=====================  ==============================  =================================
``vision.embed``       pixel_values [P, 3 * 2 * 14^2]  [P, width] (window order)
``vision.blocks.<i>``  [P, width]                      [P, width]
``projector``          [P, width]                      [P / 4, 1, hidden] (image order)
=====================  ==============================  =================================

Attention never crosses images. Qwen2.5-VL's windowed blocks attend within windows of
``window_size / 28`` x ``window_size / 28`` merge blocks; to make every window one contiguous
segment the embedding reorders the merge blocks window by window and the merger restores the image
order (as Qwen does). Positions are 2-D rotary: the first half of each head's frequencies follows the
patch row, the second the column.

Where the images are comes from the batch's host ``image_grids`` (:class:`QwenPackedBatch`); the
segment bounds, the window order and the rotary angles are computed once per (grids, device) and cached.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from omnibal_pl.batch import IGNORE_INDEX, PackedBatch
from omnibal_pl.errors import DataError
from omnibal_pl.model.attention import varlen_attention
from omnibal_pl.model.block import TransformerBlock
from omnibal_pl.model.config import VisionConfig, VLMConfig
from omnibal_pl.model.llm import apply_rope
from omnibal_pl.model.norms import make_norm
from omnibal_pl.model.vision import VisionMLP
from omnibal_pl.qwen_batch import Grid, QwenPackedBatch, pack_qwen_vision


@dataclass(frozen=True)
class VisionLayout:
    """Where the patches of one micro-batch go (see the module docstring); ``order`` None without windows.

    ``image_bounds`` / ``window_bounds``: host segment offsets in patches (a trailing padding segment
    included); ``image_cu`` / ``window_cu`` the same as int32 tensors; ``order`` [P / m^2] merge blocks in
    window order, ``restore`` its inverse; ``cos``/``sin`` [P, head_dim] rotary angles, in window order.
    """

    image_bounds: tuple[int, ...]
    window_bounds: tuple[int, ...]
    image_cu: torch.Tensor
    window_cu: torch.Tensor
    order: torch.Tensor | None
    restore: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor


def _window_order(t: int, gh: int, gw: int, side: int) -> tuple[list[int], list[int]]:
    """Merge blocks of one image (row-major ids) in window order, and the size of each non-empty window."""
    order, sizes = [], []
    for frame in range(t):
        for wy in range(0, gh, side):
            for wx in range(0, gw, side):
                ids = [frame * gh * gw + y * gw + x for y in range(wy, min(wy + side, gh))
                       for x in range(wx, min(wx + side, gw))]
                order += ids
                sizes.append(len(ids))
    return order, sizes


@functools.lru_cache(maxsize=8)  # the micro-batches in flight: every block of one reuses its layout
def vision_layout(grids: tuple[Grid, ...], patches: int, merge: int, window_blocks: int, head_dim: int,
                  theta: float, device: torch.device) -> VisionLayout:
    """The :class:`VisionLayout` of ``patches`` patch rows holding images ``grids`` (then padding);
    ``window_blocks`` = window side in merge blocks (0: no windows)."""
    unit = merge * merge
    real = sum(t * h * w for t, h, w in grids)
    if real > patches or patches % unit or any(h % merge or w % merge for _, h, w in grids):
        raise DataError(f"vision layout: images {list(grids)} need {real} patches in whole {merge}x{merge} blocks, "
                        f"the batch has {patches} patch rows")
    image_bounds, window_bounds, order, rows, cols = [0], [0], [], [], []
    blocks = 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        for _ in range(t):
            image_bounds.append(image_bounds[-1] + h * w)
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        rows.append(r.reshape(gh, merge, gw, merge).transpose(1, 2).flatten().repeat(t))
        cols.append(c.reshape(gh, merge, gw, merge).transpose(1, 2).flatten().repeat(t))
        if window_blocks:
            ids, sizes = _window_order(t, gh, gw, window_blocks)
            order += [blocks + i for i in ids]
            for size in sizes:
                window_bounds.append(window_bounds[-1] + size * unit)
        blocks += t * gh * gw
    if patches > real:  # the padding blocks: one segment of their own, in place
        image_bounds.append(patches)
        window_bounds.append(patches)
        order += range(blocks, patches // unit)
        rows.append(torch.zeros(patches - real, dtype=torch.long))
        cols.append(torch.zeros(patches - real, dtype=torch.long))
    if not window_blocks:
        window_bounds = image_bounds
    quarter = torch.arange(0, head_dim // 2, 2, dtype=torch.float32)
    inv_freq = 1.0 / theta ** (quarter / (head_dim // 2))
    rc = torch.stack([torch.cat(rows), torch.cat(cols)], dim=-1).float() if rows else torch.zeros(0, 2)
    angles = (rc[:, :, None] * inv_freq).flatten(1)  # [P, head_dim / 2]: rows' frequencies, then columns'
    angles = torch.cat([angles, angles], dim=-1)
    perm = torch.tensor(order, dtype=torch.long) if window_blocks else None
    if perm is not None:
        angles = angles.view(-1, unit, head_dim)[perm].view(-1, head_dim)
    as_cu = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    return VisionLayout(
        image_bounds=tuple(image_bounds), window_bounds=tuple(window_bounds),
        image_cu=as_cu(image_bounds), window_cu=as_cu(window_bounds),
        order=perm.to(device) if perm is not None else None,
        restore=torch.argsort(perm).to(device) if perm is not None else None,
        cos=angles.cos().to(device), sin=angles.sin().to(device))


def layout_of(batch: PackedBatch, cfg: VisionConfig, device: torch.device) -> VisionLayout:
    """The cached :class:`VisionLayout` of ``batch`` for encoder ``cfg`` on ``device``."""
    if not isinstance(batch, QwenPackedBatch):
        raise DataError(f"the Qwen vision encoder needs a QwenPackedBatch (image grids), got {type(batch).__name__}")
    window = cfg.window_size // (cfg.patch_size * cfg.spatial_merge)
    return vision_layout(tuple(map(tuple, batch.image_grids)), batch.pixel_values.shape[0], cfg.spatial_merge, window,
                         cfg.width // cfg.heads, cfg.rope_theta, torch.device(device))


def _by_blocks(x: torch.Tensor, index: torch.Tensor, unit: int) -> torch.Tensor:
    """Rows of ``x`` [P, ...] permuted merge block by merge block (``unit`` rows each) by ``index``."""
    return x.view(-1, unit, *x.shape[1:])[index].view(x.shape)


class QwenPatchEmbed(nn.Module):
    """Block ``vision.embed``: flattened patches [P, 3 * t * p * p] -> [P, width], in window order.

    A linear map: Qwen's Conv3d has kernel = stride = the patch, so it is one matrix per patch."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(3 * cfg.temporal_patch_size * cfg.patch_size**2, cfg.width, bias=False)

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.proj.in_features:
            raise DataError(f"vision.embed wants Qwen patches [P, {self.proj.in_features}] (a QwenPackedBatch, e.g. from "
                            f"pack_qwen_samples), got pixel_values {list(x.shape)}: tiles of a fixed-size dataset do "
                            f"not fit a Qwen model")
        h = self.proj(x.to(self.proj.weight.dtype))
        layout = layout_of(batch, self.cfg, h.device)
        return h if layout.order is None else _by_blocks(h, layout.order, self.cfg.spatial_merge**2)


class GatedMLP(nn.Module):
    """Qwen2.5-VL's vision MLP: down(silu(gate(x)) * up(x)), every projection with a bias."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.width, cfg.mlp_dim)
        self.up = nn.Linear(cfg.width, cfg.mlp_dim)
        self.down = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class QwenVisionAttention(nn.Module):
    """Fused-qkv attention with 2-D rotary positions over the patches of each segment (image or window)."""

    def __init__(self, cfg: VisionConfig, backend: str) -> None:
        super().__init__()
        self.heads, self.backend = cfg.heads, backend
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, layout: VisionLayout, windowed: bool, block: TransformerBlock) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.heads, -1).unbind(1)
        q, k = apply_rope(q, layout.cos, layout.sin), apply_rope(k, layout.cos, layout.sin)
        bounds, cu = (layout.window_bounds, layout.window_cu) if windowed else (layout.image_bounds, layout.image_cu)
        longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        out = block.attention_core(self._core, q, k, v, cu, longest, bounds)
        return self.proj(out.reshape(x.shape[0], -1))

    def _core(self, q, k, v, cu, longest, bounds):
        return varlen_attention(q, k, v, cu, longest, causal=False, backend=self.backend, host_bounds=bounds)


class QwenVisionBlock(TransformerBlock):
    """Block ``vision.blocks.<i>``: pre-norm attention (over windows or whole images) and MLP; [P, width] -> same."""

    def __init__(self, cfg: VisionConfig, index: int, backend: str) -> None:
        super().__init__()
        self.cfg = cfg
        self.windowed = cfg.window_size > 0 and index not in cfg.full_attention_blocks
        self.norm1 = make_norm(cfg.norm, cfg.width, cfg.norm_eps)
        self.attn = QwenVisionAttention(cfg, backend)
        self.norm2 = make_norm(cfg.norm, cfg.width, cfg.norm_eps)
        self.mlp = GatedMLP(cfg) if cfg.act == "swiglu" else VisionMLP(cfg)

    def compute(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        layout = layout_of(batch, self.cfg, x.device)
        x = x + self.attn(self.norm1(x), layout, self.windowed, self)
        return x + self.mlp(self.norm2(x))


class QwenVisionEncoder(nn.Module):
    """Container of ``embed`` and ``blocks`` (ModuleDict "0".."n-1"), as :class:`~omnibal_pl.model.vision.VisionEncoder`."""

    def __init__(self, cfg: VisionConfig, backend: str) -> None:
        super().__init__()
        self.embed = QwenPatchEmbed(cfg)
        self.blocks = nn.ModuleDict({str(i): QwenVisionBlock(cfg, i, backend) for i in range(cfg.num_blocks)})


class PatchMerger(nn.Module):
    """Block ``projector``: norm, each merge block's m^2 patches concatenated, Linear + GELU + Linear, image
    order restored; [P, width] -> [P / m^2, 1, hidden]."""

    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        v = cfg.vision
        self.cfg = v
        self.unit = v.spatial_merge**2
        self.norm = make_norm(v.norm, v.width, v.norm_eps)
        self.fc1 = nn.Linear(v.width * self.unit, v.width * self.unit)
        self.fc2 = nn.Linear(v.width * self.unit, cfg.llm.hidden)

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        h = self.fc2(F.gelu(self.fc1(self.norm(x).reshape(-1, self.unit * x.shape[-1]))))
        layout = layout_of(batch, self.cfg, h.device)
        return (h if layout.restore is None else h[layout.restore]).unsqueeze(1)


def pack_qwen_samples(cfg: VLMConfig, input_ids: Sequence[torch.Tensor], pixel_values: Sequence[torch.Tensor],
                      grids: Sequence[Sequence[Grid]], token_cap: int | None = None, block_cap: int | None = None
                      ) -> QwenPackedBatch:
    """Samples (``input_ids`` [n_i], their images' patches [p_i, 3 * t * p * p] and grids) packed into one
    :class:`QwenPackedBatch`: tokens end to end with M-RoPE positions restarting per sample (padded to
    ``token_cap``), patches end to end (padded to ``block_cap`` merge blocks). Labels: every text token
    (next-token targets are the model's to shift), weight 1."""
    ids = torch.cat(list(input_ids))
    seqlens = [len(s) for s in input_ids]
    length = token_cap or len(ids)
    vision = pack_qwen_vision(input_ids, pixel_values, grids, cfg.image_context_id, cfg.vision.spatial_merge, length,
                              block_cap)
    pad = length - len(ids)
    ids = F.pad(ids, (0, pad))
    labels = torch.where(ids == cfg.image_context_id, IGNORE_INDEX, ids)
    labels[len(ids) - pad:] = IGNORE_INDEX
    segments = seqlens + ([pad] if pad else [])
    cu = torch.tensor([0, *torch.tensor(segments).cumsum(0).tolist()], dtype=torch.int32)
    return QwenPackedBatch(
        input_ids=ids[None], labels=labels[None], position_ids=vision.position_ids,
        cu_seqlens=cu, max_seqlen=max(segments), pixel_values=vision.pixel_values,
        image_flags=vision.image_flags, loss_weight=(labels[None] != IGNORE_INDEX).float(),
        sample_ids=torch.arange(len(input_ids)), num_samples=len(input_ids),
        image_tokens=int((ids == cfg.image_context_id).sum()),  # host fact: the model checks it without a sync
        image_grids=vision.image_grids)
