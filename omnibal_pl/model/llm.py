"""LLM decoder in the Llama / InternLM2 / Qwen2 family over one packed sequence [1, L, hidden].

Packing: ``batch.cu_seqlens`` delimits the samples (attention never crosses them) and
``batch.position_ids`` restart at 0 per sample (RoPE sees each sample from position 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnibal_pl.batch import PackedBatch
from omnibal_pl.errors import ConfigError, DataError
from omnibal_pl.model.attention import varlen_attention
from omnibal_pl.model.block import TransformerBlock
from omnibal_pl.model.config import LLMConfig, VLMConfig
from omnibal_pl.model.norms import RMSNorm
from omnibal_pl.model.rope import mrope_cos_sin
from omnibal_pl.model.sparsify import Sparsifier, masked_varlen_attention


class TokenEmbed(nn.Module):
    """Block ``llm.embed``: projector output [T, tokens_per_tile, hidden] -> hidden states [1, L, hidden].

    Embeds ``batch.input_ids`` and overwrites the positions holding ``image_context_id`` with the
    features of the tiles whose ``image_flags == 1``, in tile order.
    """

    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.image_context_id = cfg.image_context_id
        self.tok = nn.Embedding(cfg.llm.vocab_size, cfg.llm.hidden)

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        h = self.tok(batch.input_ids)
        slots = batch.input_ids == self.image_context_id
        self._check_image_tokens(slots, batch, x.shape[1])
        feats = real_tile_features(x, batch)
        h = h.masked_scatter(slots.unsqueeze(-1), feats.to(h.dtype))
        # Dummy tiles (flag 0) still ran through the encoder: a zero-weighted term keeps every vision
        # parameter in the autograd graph, so DDP and pipeline backward see the same graph each step.
        return h + 0.0 * x.sum().to(h.dtype)

    def _check_image_tokens(self, slots: torch.Tensor, batch: PackedBatch, tokens_per_tile: int) -> None:
        """Image-context tokens must equal real tiles x ``tokens_per_tile``. A collated batch is checked from
        its host facts (no sync); a batch without ``image_tokens`` (built by hand: tests, generation, the
        profiler) from its tensors, one host sync."""
        if batch.image_tokens is not None:
            have, tiles = batch.image_tokens, batch.num_tiles
        else:
            have, tiles = int(slots.sum()), int((batch.image_flags == 1).sum())
        if have != tiles * tokens_per_tile:
            raise DataError(
                f"llm.embed: input_ids hold {have} image-context tokens (id {self.image_context_id}) but "
                f"{tiles} real tiles x {tokens_per_tile} tokens per tile = {tiles * tokens_per_tile} "
                f"features; the tokenizer/collate must insert tokens_per_tile context tokens per tile with "
                f"image_flags == 1 and the model's image_context_id must match the tokenizer's"
            )


def real_tile_features(x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Features of the tiles with ``image_flags == 1``, in tile order: [num_tiles * tokens_per_tile, hidden].

    ``x`` [T, tokens_per_tile, hidden]. Sized by the host count ``batch.num_tiles`` (a stable sort puts the
    flagged tiles first), so unlike boolean indexing it needs no host sync.
    """
    unflagged = (batch.image_flags.to(x.device) != 1).to(torch.int8)
    order = torch.sort(unflagged, stable=True).indices[: batch.num_tiles]
    return x.index_select(0, order).reshape(-1, x.shape[-1])


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, head_dim] (float32) for positions [L], halves laid out as in HF's ``rotate_half``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [L, heads, head_dim] by the per-token angles in cos/sin [L, head_dim]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos[:, None] + rotated.float() * sin[:, None]).to(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE over the packed segments."""

    def __init__(self, cfg: LLMConfig, backend: str) -> None:
        super().__init__()
        self.cfg = cfg
        self.backend = backend
        self.q = nn.Linear(cfg.hidden, cfg.heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor, batch: PackedBatch, block: TransformerBlock,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """``keep`` [L] (0/1 keep mask of the keys, Dynamic-LLaVA): use the masked eager path."""
        length = x.shape[1]
        hd = self.cfg.head_dim
        q = self.q(x).view(length, self.cfg.heads, hd)
        k = self.k(x).view(length, self.cfg.kv_heads, hd)
        v = self.v(x).view(length, self.cfg.kv_heads, hd)
        if self.cfg.mrope_section:  # Qwen2-VL's multimodal positions: position_ids [3, L]
            cos, sin = mrope_cos_sin(batch.position_ids.to(x.device), hd, self.cfg.rope_theta, self.cfg.mrope_section)
        else:
            cos, sin = rope_cos_sin(batch.position_ids[0].to(x.device), hd, self.cfg.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cu_seqlens = batch.cu_seqlens.to(x.device)
        if keep is None:
            out = block.attention_core(self._core, q, k, v, cu_seqlens, batch.max_seqlen, batch.bounds)
        else:
            out = block.attention_core(masked_varlen_attention, q, k, v, keep, cu_seqlens)
        return self.o(out.reshape(1, length, -1))

    def _core(self, q, k, v, cu_seqlens, max_seqlen, bounds):
        """``bounds``: the host copy of ``cu_seqlens`` (``batch.bounds``), so sdpa/flex need no device read."""
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, backend=self.backend, host_bounds=bounds)


class SwiGLU(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.up = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.down = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class DecoderLayer(TransformerBlock):
    """Block ``llm.layers.<i>``: pre-RMSNorm attention and SwiGLU; [1, L, hidden] -> same.

    With Dynamic-LLaVA sparsification (:mod:`omnibal_pl.model.sparsify`) layer ``sparse_layer`` owns the
    ``sparsifier`` that makes the keep mask from its input, and every layer from it on (``masked``) uses
    the masked attention path and outputs [1, L, hidden + 1], the mask riding as the last channel.
    """

    def __init__(self, cfg: LLMConfig, backend: str) -> None:
        super().__init__()
        self.hidden = cfg.hidden
        self.attn_norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.attn = Attention(cfg, backend)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.mlp = SwiGLU(cfg)
        self.masked = False
        self.sparsifier: Sparsifier | None = None

    def compute(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        if not self.masked:
            x = x + self.attn(self.attn_norm(x), batch, self)
            return x + self.mlp(self.mlp_norm(x))
        if self.sparsifier is not None:
            keep = self.sparsifier(x, batch)
        elif x.shape[-1] == self.hidden + 1:
            x, keep = x[..., :-1], x[0, :, -1]
        else:
            raise ConfigError(
                f"a sparsified decoder layer got {x.shape[-1]} channels, expected hidden {self.hidden} + 1 keep-mask "
                f"channel from the layers before it; run the layers from sparsify.sparse_layer on in order"
            )
        x = x + self.attn(self.attn_norm(x), batch, self, keep)
        x = x + self.mlp(self.mlp_norm(x))
        return torch.cat([x, keep.to(x.dtype).view(1, -1, 1)], dim=-1)


class Head(nn.Module):
    """Block ``llm.head``: final RMSNorm + output projection; [1, L, hidden] -> logits [1, L, vocab].

    With sparsification (``keep_channel``): [1, L, hidden + 1] -> [1, L, vocab + 1], the keep mask
    passed through as the last column (split it with :func:`omnibal_pl.model.sparsify.split_output`).
    """

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.out = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.keep_channel = False

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        if not self.keep_channel:
            return self.out(self.norm(x))
        logits = self.out(self.norm(x[..., :-1]))
        return torch.cat([logits, x[..., -1:].to(logits.dtype)], dim=-1)


class LanguageModel(nn.Module):
    """Container of ``embed``, ``layers`` (ModuleDict "0".."n-1") and ``head``.

    With ``tie_embeddings`` the head's weight *is* the embedding matrix (one parameter, named
    ``llm.embed.tok.weight``); both blocks must then live on the same pipeline stage or the strategy
    must keep the two copies in sync.
    """

    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.embed = TokenEmbed(cfg)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg.llm, cfg.attention_backend) for i in range(cfg.llm.layers)})
        self.head = Head(cfg.llm)
        if cfg.llm.tie_embeddings:
            self.head.out.weight = self.embed.tok.weight
        if cfg.sparsify.enabled:
            self.install_sparsifier(cfg)

    def install_sparsifier(self, cfg: VLMConfig) -> None:
        """Add fresh predictors to layer ``cfg.sparsify.sparse_layer`` and mask the layers from it on.

        Called at construction when ``cfg.sparsify.enabled``, or on a loaded model (before blocks are
        deleted for a pipeline stage) to start Dynamic-LLaVA training from a fine-tuned checkpoint.
        """
        sparse = cfg.sparsify
        if sparse.sparse_layer >= cfg.llm.layers:
            raise ConfigError(f"model config: sparsify.sparse_layer {sparse.sparse_layer} is not a layer of this "
                              f"{cfg.llm.layers}-layer LLM; pick one in [0, {cfg.llm.layers})")
        cut = self.layers[str(sparse.sparse_layer)]
        cut.sparsifier = Sparsifier(sparse, cfg.llm.hidden, cfg.image_context_id, cfg.attention_backend).to(cut.attn.q.weight)
        for i, layer in self.layers.items():
            layer.masked = int(i) >= sparse.sparse_layer
        self.head.keep_channel = True
