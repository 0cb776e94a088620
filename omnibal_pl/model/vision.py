"""Vision encoder in the InternViT / CLIP-ViT family: patch embedding and pre-norm blocks.

Tiles are independent images: attention is bidirectional within each tile and never across tiles.
All tiles have the same length, so attention is one batched SDPA call ([T, heads, P, head_dim]),
which dispatches to flash / memory-efficient kernels on CUDA without any varlen bookkeeping.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnibal_pl.batch import PackedBatch
from omnibal_pl.model.block import TransformerBlock
from omnibal_pl.model.config import VisionConfig
from omnibal_pl.model.norms import RMSNorm, make_norm
from omnibal_pl.pixels import normalise


class VisionEmbed(nn.Module):
    """Block ``vision.embed``: pixels [T, 3, H, W] -> tokens [T, P, width], P = patches (+1 class token).

    ``uint8`` pixels (a loader that leaves tiles raw) are normalised here, on the device, with the batch's
    ``pixel_norm``."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        self.cls = nn.Parameter(torch.zeros(cfg.width)) if cfg.class_token else None
        self.pos = nn.Parameter(torch.zeros(cfg.seq_len, cfg.width))
        self.norm = make_norm(cfg.norm, cfg.width, cfg.norm_eps) if cfg.embed_norm else None

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        size = self.cfg.image_size
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != size or x.shape[3] != size:
            raise ValueError(f"vision.embed wants pixel_values [T, 3, {size}, {size}], got {list(x.shape)}")
        if x.dtype == torch.uint8:
            if batch.pixel_norm is None:
                raise ValueError("vision.embed got uint8 pixel_values without the batch's pixel_norm (mean, std) to "
                                 "normalise them; the collate sets it from tiling.pixels=uint8")
            x = normalise(x, *batch.pixel_norm)
        h = self.patch(x.to(self.patch.weight.dtype)).flatten(2).transpose(1, 2)  # [T, patches, width]
        if self.cls is not None:
            h = torch.cat([self.cls.to(h.dtype).expand(h.shape[0], 1, -1), h], dim=1)
        h = h + self.pos.to(h.dtype)
        return self.norm(h) if self.norm is not None else h


class VisionAttention(nn.Module):
    """Fused-qkv multi-head self-attention over the tokens of each tile."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=cfg.qkv_bias)
        # InternViT-6B normalises q and k over all heads at once, always with RMSNorm.
        self.q_norm = RMSNorm(cfg.width, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.width, cfg.norm_eps) if cfg.qk_norm else None
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, block: TransformerBlock) -> torch.Tensor:
        tiles, length, width = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(tiles, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = block.attention_core(F.scaled_dot_product_attention, q, k, v)
        return self.proj(out.transpose(1, 2).reshape(tiles, length, width))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)
        self.quick_gelu = cfg.act == "quick_gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.quick_gelu else F.gelu(h)
        return self.fc2(h)


class VisionBlock(TransformerBlock):
    """Block ``vision.blocks.<i>``: pre-norm attention and MLP, optional LayerScale; [T, P, width] -> same."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.width, cfg.norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = make_norm(cfg.norm, cfg.width, cfg.norm_eps)
        self.mlp = VisionMLP(cfg)
        self.ls1 = nn.Parameter(torch.ones(cfg.width)) if cfg.layerscale else None
        self.ls2 = nn.Parameter(torch.ones(cfg.width)) if cfg.layerscale else None

    def compute(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        a = self.attn(self.norm1(x), self)
        x = x + (a * self.ls1 if self.ls1 is not None else a)
        m = self.mlp(self.norm2(x))
        return x + (m * self.ls2 if self.ls2 is not None else m)


class VisionEncoder(nn.Module):
    """Container of ``embed`` and ``blocks`` (a ModuleDict keyed "0".."n-1", so names survive pruning)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.embed = VisionEmbed(cfg)
        self.blocks = nn.ModuleDict({str(i): VisionBlock(cfg) for i in range(cfg.num_blocks)})
