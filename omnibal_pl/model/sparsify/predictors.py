"""The learned keep/drop predictors and their decisions: Gumbel samples in training, top-k / argmax at inference.

Every predictor maps hidden states [n, hidden] to logits [n, 2], column :data:`KEEP` then :data:`DROP`.
:class:`Sparsifier` holds the predictors of one model and turns their logits into the keep mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnibal_pl.batch import PackedBatch
from omnibal_pl.errors import ConfigError
from omnibal_pl.model.attention import varlen_attention
from omnibal_pl.model.sparsify.config import SparsifyConfig
from omnibal_pl.model.sparsify.spans import Spans, find_spans, span_lengths, text_spans_of_image_samples

KEEP, DROP = 0, 1  # predictor logit columns


def _mlp_head(dim: int) -> nn.Sequential:
    """dim -> dim/2 -> dim/4 -> 2 logits (keep, drop), GELU between."""
    return nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(), nn.Linear(dim // 4, 2))


class _PredictorBlock(nn.Module):
    """Pre-LayerNorm transformer block (bidirectional) over each sample's image tokens; like the original's,
    its qkv projection has no bias (proj and MLP have), so the published weights load one to one."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, backend: str) -> None:
        super().__init__()
        self.heads, self.backend = heads, backend
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        n, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, 3, self.heads, dim // self.heads).unbind(1)
        x = x + self.proj(varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=False, backend=self.backend).reshape(n, dim))
        return x + self.mlp(self.norm2(x))


class VisionPredictor(nn.Module):
    """Image tokens [n, hidden] of several samples -> keep/drop logits [n, 2].

    LayerNorm -> Linear(hidden, dim) -> GELU, ``blocks`` transformer blocks over each sample's image
    tokens, then per token: the first dim/2 channels as they are and the last dim/2 averaged over the
    sample's image tokens (every token counts as kept before the decision), concatenated -> MLP -> 2.
    """

    def __init__(self, hidden: int, cfg: SparsifyConfig, backend: str) -> None:
        super().__init__()
        dim = cfg.predictor_dim
        self.embed = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim), nn.GELU())
        self.blocks = nn.ModuleList(_PredictorBlock(dim, cfg.predictor_heads, cfg.predictor_mlp_dim, backend)
                                    for _ in range(cfg.predictor_blocks))
        self.out = _mlp_head(dim)

    def forward(self, x: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
        """``x`` [n, hidden] sorted by ``group`` [n] (sample index in 0..num_groups-1)."""
        counts = torch.bincount(group, minlength=num_groups)
        cu = F.pad(counts[counts > 0].cumsum(0), (1, 0)).to(torch.int32)
        h = self.embed(x)
        max_len = int(counts.max())
        for block in self.blocks:
            h = block(h, cu, max_len)
        local, pooled = h.chunk(2, dim=-1)
        sums = torch.zeros(num_groups, pooled.shape[-1], dtype=pooled.dtype, device=pooled.device).index_add(0, group, pooled)
        mean = sums / counts.clamp_min(1).unsqueeze(-1).to(pooled.dtype)
        return self.out(torch.cat([local, mean[group]], dim=-1))


class TextPredictor(nn.Module):
    """Per-token MLP (no mixing between tokens, so training matches cached decoding): [n, hidden] -> [n, 2].

    LayerNorm -> Linear(hidden, dim) -> GELU -> dim/2 -> dim/4 -> 2.
    """

    def __init__(self, hidden: int, cfg: SparsifyConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, cfg.predictor_dim), nn.GELU(), *_mlp_head(cfg.predictor_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def gumbel_tau(step: int, max_steps: int, start: float = 1.0, end: float = 0.1) -> float:
    """Temperature ``start * (end / start) ** (step / max_steps)``, clamped to ``end`` after ``max_steps``."""
    if max_steps <= 0:
        raise ConfigError(f"gumbel_tau: max_steps must be > 0, got {max_steps}")
    return start * (end / start) ** (min(step, max_steps) / max_steps)


def gumbel_keep(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Hard Gumbel-softmax keep decisions [n] (exactly 0. or 1.) with straight-through gradients.

    Forward value: ``argmax(logits + gumbel noise) == KEEP``; gradient: that of
    ``softmax((logits + noise) / tau)[:, KEEP]``. Under ``torch.utils.checkpoint`` the noise is the
    same in the recomputation (checkpoint restores the RNG state).
    """
    noise = -torch.empty_like(logits, dtype=torch.float32).exponential_().log()
    soft = ((logits.float() + noise) / tau).softmax(dim=-1)[:, KEEP]
    hard = (soft > 0.5).float()  # two classes: argmax == KEEP iff its probability exceeds one half
    return hard + (soft - soft.detach())


def topk_keep(scores: torch.Tensor, group: torch.Tensor, num_groups: int, rate: float) -> torch.Tensor:
    """Keep the top ``int(n_g * rate)`` tokens by score in each group g: [n] float 0/1 (no gradient)."""
    keep = torch.zeros_like(scores, dtype=torch.float32)
    for g in range(num_groups):
        idx = (group == g).nonzero().flatten()
        top = scores[idx].topk(int(len(idx) * rate)).indices
        keep[idx[top]] = 1.0
    return keep


def _zero_dependency(module: nn.Module) -> torch.Tensor:
    """A scalar 0 that depends on every parameter of ``module``: a predictor with nothing to decide on in a
    micro-batch still gets a (zero) gradient, so DDP's reducer never waits for it on one rank while the
    others reduce theirs (the hang a step without long answers caused)."""
    return sum(p.reshape(-1)[0] for p in module.parameters()) * 0.0


def sparsified_spans(batch: PackedBatch, cfg: SparsifyConfig, image_context_id: int) -> Spans:
    """The spans the predictors decide on: :func:`find_spans`, the text spans limited to image samples when
    the vision predictor is on (:func:`text_spans_of_image_samples`)."""
    spans = find_spans(batch, image_context_id)
    return text_spans_of_image_samples(spans) if cfg.vision_predictor else spans


class Sparsifier(nn.Module):
    """The predictors, attached to decoder layer ``sparse_layer``; [1, L, hidden] -> keep mask [L] float32.

    Training mode: Gumbel decisions at temperature ``tau`` (set each step by
    :class:`omnibal_pl.train.callbacks.GumbelTemperature`, or by :func:`set_temperature`).
    Eval mode: top-k by score for image and instruction tokens, argmax for answer tokens.
    Which tokens are decided on: :func:`sparsified_spans` (with the vision predictor on, the text of
    text-only samples is always kept).

    Host syncs per micro-batch (allowed, sparsification only: the spans and their sizes decide which tokens
    the predictors see): :func:`find_spans`' copy of the ids and labels, each span's ``nonzero``, and the
    vision predictor's longest sample (``max_seqlen`` of its attention).
    """

    def __init__(self, cfg: SparsifyConfig, hidden: int, image_context_id: int, backend: str) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_context_id = image_context_id
        self.tau = cfg.tau_start
        self.vision = VisionPredictor(hidden, cfg, backend) if cfg.vision_predictor else None
        self.output_text = TextPredictor(hidden, cfg) if cfg.output_text_predictor else None
        self.instruct_text = TextPredictor(hidden, cfg) if cfg.instruct_text_predictor else None

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        spans = sparsified_spans(batch, self.cfg, self.image_context_id)
        h = x[0]
        keep = torch.ones(h.shape[0], dtype=torch.float32, device=h.device)
        c = self.cfg
        kinds = ((self.vision, spans.vision, c.vision_keep_rate, 0, True),
                 (self.instruct_text, spans.instruct, c.instruct_text_keep_rate, c.instruct_text_len_for_training, True),
                 (self.output_text, spans.output, c.output_text_keep_rate, c.output_text_len_for_training, False))
        for predictor, span, rate, min_len, topk in kinds:
            if predictor is None:
                continue
            if self.training:  # short spans are not sparsified in training
                span = span & (span_lengths(span, spans)[spans.sample.clamp_min(0)] >= max(min_len, 1))
            idx = span.nonzero().flatten()
            if len(idx) == 0:
                if self.training:
                    keep = keep + _zero_dependency(predictor)
                continue
            group = spans.sample[idx]
            logits = predictor(h[idx], group, spans.num_samples) if predictor is self.vision else predictor(h[idx])
            if self.training:
                decided = gumbel_keep(logits, self.tau)
            elif topk:
                decided = topk_keep((logits[:, KEEP] - logits[:, DROP]).float(), group, spans.num_samples, rate)
            else:
                decided = (logits[:, KEEP] > logits[:, DROP]).float()
            keep = keep.index_put((idx,), decided)
        return keep

    @torch.no_grad()
    def keep_new_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """Decoding: whether each generated token enters the cache of the sparsified layers, [n] bool, from its
        hidden state entering ``sparse_layer`` (``h`` [n, hidden]); all True without an output-text predictor."""
        if self.output_text is None:
            return torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
        logits = self.output_text(h)
        return logits[:, KEEP] > logits[:, DROP]


def set_temperature(model: nn.Module, tau: float) -> int:
    """Set ``tau`` on every :class:`Sparsifier` in ``model``; returns how many were found."""
    found = [m for m in model.modules() if isinstance(m, Sparsifier)]
    for m in found:
        m.tau = tau
    return len(found)
