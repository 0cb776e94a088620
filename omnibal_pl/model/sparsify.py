"""Dynamic-LLaVA context sparsification (arXiv 2412.00876): learned vision / text token predictors.

Mechanism (as published, extended to packed sequences):

- A :class:`Sparsifier` runs once on the hidden states entering LLM layer ``sparse_layer`` and decides,
  per token, keep (1) or drop (0) for three token kinds of every packed sample (:func:`find_spans`):
  its image tokens (vision predictor), its last assistant answer (output-text predictor) and, when
  enabled, the instruction before that answer (instruction-text predictor). Other tokens are always kept.
- Training removes nothing. Decisions are hard Gumbel-softmax samples with straight-through gradients
  (:func:`gumbel_keep`, temperature from :func:`gumbel_tau`); in layers >= ``sparse_layer`` the
  attention weights are multiplied by the keys' keep mask inside the softmax, each token always seeing
  itself (:func:`masked_varlen_attention`), so the predictors get gradient from the LM loss.
- Loss: LM loss + :func:`keep_rate_loss`.
- Inference (eval mode): the top ``int(n * keep_rate)`` image (and instruction) tokens of a sample by
  score are kept, answer tokens by argmax; :mod:`omnibal_pl.model.generate` removes the dropped tokens.

How the keep mask crosses blocks (and pipeline stages): only one tensor passes between blocks, so from
layer ``sparse_layer`` on the hidden state carries the mask as one extra channel: ``llm.layers.<i>``
with ``i >= sparse_layer`` outputs ``[1, L, hidden + 1]`` (last channel = keep mask, 0/1 values with
straight-through gradients) and ``llm.head`` outputs ``[1, L, vocab + 1]`` (logits, then the mask); use
:func:`split_output`. A pipeline cut may therefore fall anywhere: the mask and its gradient travel with
the activation (:func:`boundary_width` gives the stage-boundary width). The cost is one extra channel
per boundary and one concatenation per masked layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from omnibal_pl.data.batch import PackedBatch
from omnibal_pl.errors import ConfigError
from omnibal_pl.model.attention import varlen_attention

IGNORE_INDEX = -100
KEEP, DROP = 0, 1  # predictor logit columns


@dataclass
class SparsifyConfig:
    """Every knob of Dynamic-LLaVA sparsification (published defaults; ``enabled`` off by default).

    Fields:
        enabled: install the predictors and the masked attention path.
        sparse_layer: LLM layer whose *input* hidden states the predictors read; layers >= it are masked.
        vision_predictor / output_text_predictor / instruct_text_predictor: which predictors exist.
        vision_keep_rate: target kept fraction of a sample's image tokens (0.2: 576 -> 115).
        output_text_keep_rate: target kept fraction of the last answer's tokens.
        instruct_text_keep_rate: target kept fraction of the last instruction's tokens.
        output_text_len_for_training: answers shorter than this (tokens) are not sparsified in training.
        instruct_text_len_for_training: the same for instructions.
        predictor_dim: width of the predictors' first projection (512); later MLP widths are /2, /4.
        predictor_heads: attention heads of the vision predictor's blocks.
        predictor_mlp_dim: MLP width of the vision predictor's blocks.
        predictor_blocks: transformer blocks of the vision predictor.
        tau_start / tau_end: Gumbel-softmax temperature at step 0 and at the last step.
        mask_loss_weight: weight of each keep-rate penalty.
        predictor_lr / predictor_weight_decay: optimiser settings of the predictor parameters, which get
            their own AdamW groups (:func:`omnibal_pl.module.param_groups`).
    """

    enabled: bool = False
    sparse_layer: int = 2
    vision_predictor: bool = True
    output_text_predictor: bool = True
    instruct_text_predictor: bool = False
    vision_keep_rate: float = 0.2
    output_text_keep_rate: float = 0.5
    instruct_text_keep_rate: float = 0.5
    output_text_len_for_training: int = 50
    instruct_text_len_for_training: int = 50
    predictor_dim: int = 512
    predictor_heads: int = 8
    predictor_mlp_dim: int = 2048
    predictor_blocks: int = 2
    tau_start: float = 1.0
    tau_end: float = 0.1
    mask_loss_weight: float = 100.0
    predictor_lr: float = 2e-4
    predictor_weight_decay: float = 0.0

    def __post_init__(self) -> None:
        def require(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"model config: sparsify.{name}: {message}")

        require(self.sparse_layer >= 0, "sparse_layer", f"must be >= 0, got {self.sparse_layer}")
        for name in ("vision_keep_rate", "output_text_keep_rate", "instruct_text_keep_rate"):
            require(0.0 < getattr(self, name) <= 1.0, name, f"must be in (0, 1], got {getattr(self, name)}")
        for name in ("output_text_len_for_training", "instruct_text_len_for_training", "predictor_blocks"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("predictor_dim", "predictor_heads", "predictor_mlp_dim", "tau_start", "tau_end"):
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        require(self.predictor_dim % 8 == 0, "predictor_dim", f"must be a multiple of 8 (the MLP halves it twice), got {self.predictor_dim}")
        require(self.predictor_dim % self.predictor_heads == 0, "predictor_heads",
                f"predictor_dim {self.predictor_dim} is not divisible by {self.predictor_heads} heads")
        require(self.mask_loss_weight >= 0 and self.predictor_lr >= 0 and self.predictor_weight_decay >= 0,
                "mask_loss_weight", "mask_loss_weight, predictor_lr and predictor_weight_decay must be >= 0")
        require(not self.enabled or self.vision_predictor or self.output_text_predictor or self.instruct_text_predictor,
                "enabled", "sparsification is on but every predictor is off; enable one or set enabled: false")


# ------------------------------------------------------------------------------------------ spans


@dataclass
class Spans:
    """Per-token membership of one packed micro-batch of length ``L``.

    ``sample`` [L] int64: packed sample index of each token, -1 on padding. ``vision``, ``instruct``,
    ``output`` [L] bool: image tokens, last instruction, last answer of each sample (disjoint).
    """

    sample: torch.Tensor
    vision: torch.Tensor
    instruct: torch.Tensor
    output: torch.Tensor
    num_samples: int


def find_spans(batch: PackedBatch, image_context_id: int) -> Spans:
    """Spans from the batch's own metadata, per sample (segment ``k < num_samples`` of ``cu_seqlens``).

    - vision: ``input_ids == image_context_id``;
    - output: the last run of ``labels != -100`` (the last assistant answer with its end marker);
    - instruct: the non-image, unsupervised tokens after the sample's last image token and previous
      answer and before the last answer (without an answer: before the sample's last token, which
      is always kept so a prompt's next-token logits exist); each sample's first token (BOS) is excluded.
    Runs on CPU (a few host syncs per micro-batch); the masks come back on the batch's device.
    """
    ids = batch.input_ids[0].cpu()
    answer = batch.labels[0].cpu() != IGNORE_INDEX
    length = ids.shape[0]
    image = ids == image_context_id
    sample = torch.full((length,), -1, dtype=torch.long)
    output = torch.zeros(length, dtype=torch.bool)
    instruct = torch.zeros(length, dtype=torch.bool)
    bounds = batch.cu_seqlens.tolist()
    for k in range(batch.num_samples):
        s, e = bounds[k], bounds[k + 1]
        sample[s:e] = k
        ans = answer[s:e]
        hits = ans.nonzero().flatten()
        if len(hits):
            end = int(hits[-1]) + 1
            gaps = (~ans[:end]).nonzero().flatten()
            start = int(gaps[-1]) + 1 if len(gaps) else 0
            output[s + start:s + end] = True
        else:
            start = e - s - 1
        before = torch.arange(start)
        stops = before[image[s:s + start] | ans[:start]]
        first = max(int(stops[-1]) + 1 if len(stops) else 0, 1)
        instruct[s + first:s + start] = True
    valid = sample >= 0
    device = batch.input_ids.device
    return Spans(sample.to(device), (image & valid).to(device), instruct.to(device), output.to(device), batch.num_samples)


# ------------------------------------------------------------------------------------- predictors


def _mlp_head(dim: int) -> nn.Sequential:
    """dim -> dim/2 -> dim/4 -> 2 logits (keep, drop), GELU between."""
    return nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(), nn.Linear(dim // 4, 2))


class _PredictorBlock(nn.Module):
    """Pre-LayerNorm transformer block (bidirectional) over each sample's image tokens."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, backend: str) -> None:
        super().__init__()
        self.heads, self.backend = heads, backend
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
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


# ------------------------------------------------------------------------------------- decisions


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


class Sparsifier(nn.Module):
    """The predictors, attached to decoder layer ``sparse_layer``; [1, L, hidden] -> keep mask [L] float32.

    Training mode: Gumbel decisions at temperature ``tau`` (set each step by :class:`GumbelTemperature`).
    Eval mode: top-k by score for image and instruction tokens, argmax for answer tokens.
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
        spans = find_spans(batch, self.image_context_id)
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
                span = span & (_span_lengths(span, spans)[spans.sample.clamp_min(0)] >= max(min_len, 1))
            idx = span.nonzero().flatten()
            if len(idx) == 0:
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
    def keep_new_token(self, h: torch.Tensor) -> bool:
        """Decoding: whether a generated token (hidden state [hidden] entering ``sparse_layer``) enters the cache."""
        if self.output_text is None:
            return True
        logits = self.output_text(h.reshape(1, -1))[0]
        return bool(logits[KEEP] > logits[DROP])


def _span_lengths(span: torch.Tensor, spans: Spans) -> torch.Tensor:
    """Tokens of ``span`` per sample [num_samples]."""
    return torch.bincount(spans.sample[span], minlength=spans.num_samples)


def set_temperature(model: nn.Module, tau: float) -> int:
    """Set ``tau`` on every :class:`Sparsifier` in ``model``; returns how many were found."""
    found = [m for m in model.modules() if isinstance(m, Sparsifier)]
    for m in found:
        m.tau = tau
    return len(found)


class GumbelTemperature(pl.Callback):
    """Sets the predictors' Gumbel temperature before every training batch: :func:`gumbel_tau` at
    ``trainer.global_step`` over ``trainer.estimated_stepping_batches``, start/end from the config."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        for m in pl_module.modules():
            if isinstance(m, Sparsifier):
                m.tau = gumbel_tau(trainer.global_step, max(int(trainer.estimated_stepping_batches), 1),
                                   m.cfg.tau_start, m.cfg.tau_end)


# ----------------------------------------------------------------------------- masked attention


def masked_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                            cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Causal attention per packed segment with the keys' keep mask multiplied in inside the softmax.

    ``q`` [L, heads, head_dim], ``k``/``v`` [L, kv_heads, head_dim], ``keep`` [L] (0/1 values, may carry
    gradient), ``cu_seqlens`` [S + 1]; returns [L, heads, head_dim] in ``q``'s dtype. For query i and an
    earlier key j of its segment: ``a_ij = e_ij * p_ij / sum_j' e_ij' * p_ij'`` with
    ``e_ij = exp(q_i.k_j / sqrt(d) - c_i)`` and ``p_ij = keep_j`` for j != i, 1 for j == i. With an
    all-ones mask this is exactly causal softmax attention; ``d a / d keep_j`` is nonzero for dropped keys,
    which an additive -inf mask cannot give. ``c_i`` is the (detached) row maximum over the visible
    keys, so the denominator is >= 1; exponents are clamped at 60 against overflow from dropped keys.

    Eager and dense per segment: it materialises [heads, n, n] float32 scores (see :func:`masked_attention_cost`).
    """
    groups = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    bounds = cu_seqlens.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        n = e - s
        qs = q[s:e].transpose(0, 1).float()
        ks = k[s:e].repeat_interleave(groups, dim=1).transpose(0, 1).float()
        vs = v[s:e].repeat_interleave(groups, dim=1).transpose(0, 1).float()
        scores = (qs @ ks.transpose(1, 2)) * scale  # [heads, n, n]
        eye = torch.eye(n, dtype=torch.float32, device=q.device)
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        m = keep[s:e].float()
        p = (m[None, :] + (1.0 - m[None, :]) * eye) * causal  # [n, n]: keep of key j for query i
        visible = p.detach() > 0
        c = scores.detach().masked_fill(~visible, float("-inf")).amax(dim=-1, keepdim=True)
        w = (scores - c).clamp_max(60.0).exp() * p
        attn = w / w.sum(dim=-1, keepdim=True)
        outs.append((attn @ vs).transpose(0, 1).to(q.dtype))
    return torch.cat(outs, dim=0)


@dataclass
class MaskedAttentionCost:
    """Extra cost of one masked layer's attention over the flash/SDPA path, for a micro-batch.

    ``extra_flops``: forward FLOPs beyond causal flash attention (the dense score and PV halves above
    the diagonal, plus ~8 elementwise ops per score); backward costs about twice that.
    ``saved_bytes``: float32 [heads, n, n] tensors kept for backward (~3 per segment: scores, exp, weights)
    when the layer's attention is not recomputed; with ``recompute`` in (attention, full) it is a
    transient peak inside the layer instead.
    """

    extra_flops: float
    saved_bytes: float


def masked_attention_cost(heads: int, head_dim: int, seqlens: Sequence[int]) -> MaskedAttentionCost:
    """:class:`MaskedAttentionCost` of one layer for segments of ``seqlens`` tokens."""
    squares = sum(n * n for n in seqlens)
    extra = 2.0 * heads * head_dim * squares + 8.0 * heads * squares
    return MaskedAttentionCost(extra_flops=extra, saved_bytes=3.0 * 4 * heads * squares)


def predictor_flops(hidden: int, cfg: SparsifyConfig, image_seqlens: Sequence[int], text_tokens: int) -> float:
    """Forward FLOPs (2 per multiply-add) of the predictors for one micro-batch or prompt.

    ``image_seqlens``: image tokens of each sample (the vision predictor's blocks attend within a sample;
    ignored when ``cfg.vision_predictor`` is off); ``text_tokens``: tokens scored by the text predictors in
    all (answer and instruction spans in training, one per decoded token at inference). Matrix products
    only: norms, GELUs and the pooling are not counted (well under 1% here).
    """
    d, blocks = cfg.predictor_dim, cfg.predictor_blocks
    head = d * (d // 2) + (d // 2) * (d // 4) + (d // 4) * 2  # the shared d -> d/2 -> d/4 -> 2 MLP
    text = 2.0 * text_tokens * (hidden * d + head)
    if not cfg.vision_predictor:
        return text
    n = sum(image_seqlens)
    linear = 2.0 * n * (hidden * d + blocks * (4 * d * d + 2 * d * cfg.predictor_mlp_dim) + head)
    attention = blocks * 4.0 * d * sum(s * s for s in image_seqlens)  # bidirectional: QK^T and PV
    return linear + attention + text


# -------------------------------------------------------------------------- loss and outputs


@dataclass
class KeepRateLoss:
    """``loss``: weighted keep-rate penalty (a scalar with gradient; 0 when no span is sparsified).
    ``kept``: mean kept fraction per kind over the penalised samples (detached floats, for logging)."""

    loss: torch.Tensor
    kept: dict[str, float]


def keep_rate_loss(keep: torch.Tensor, batch: PackedBatch, cfg: SparsifyConfig, image_context_id: int) -> KeepRateLoss:
    """``mask_loss_weight * mean over samples of (keep_rate - kept_fraction)^2``, summed over the kinds.

    ``keep`` [L] or [1, L] is the mask from :func:`split_output`. Vision: samples with image tokens;
    output / instruction text: samples whose span is at least ``*_len_for_training`` tokens long.
    """
    keep = keep.reshape(-1).float()
    spans = find_spans(batch, image_context_id)
    loss = keep.sum() * 0.0
    kept: dict[str, float] = {}
    kinds = (("vision", cfg.vision_predictor, spans.vision, cfg.vision_keep_rate, 1),
             ("instruct_text", cfg.instruct_text_predictor, spans.instruct, cfg.instruct_text_keep_rate,
              max(cfg.instruct_text_len_for_training, 1)),
             ("output_text", cfg.output_text_predictor, spans.output, cfg.output_text_keep_rate,
              max(cfg.output_text_len_for_training, 1)))
    for name, on, span, rate, min_len in kinds:
        if not on:
            continue
        counts = _span_lengths(span, spans)
        sums = torch.zeros(spans.num_samples, dtype=keep.dtype, device=keep.device).index_add(0, spans.sample[span], keep[span])
        chosen = counts >= min_len
        if not bool(chosen.any()):
            continue
        fraction = sums[chosen] / counts[chosen].to(keep.dtype)
        loss = loss + cfg.mask_loss_weight * ((rate - fraction) ** 2).mean()
        kept[name] = float(fraction.detach().mean())
    return KeepRateLoss(loss, kept)


def split_output(out: torch.Tensor, cfg: SparsifyConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's output -> (logits [1, L, vocab], keep mask [1, L] or None when sparsification is off)."""
    if not cfg.enabled:
        return out, None
    return out[..., :-1], out[..., -1]


def boundary_width(name: str, hidden: int, vocab_size: int, cfg: SparsifyConfig) -> int:
    """Last-dim width of the tensor leaving block ``name`` of the LLM (``llm.embed``, ``llm.layers.<i>``,
    ``llm.head``): +1 channel (the keep mask) from layer ``sparse_layer`` on when enabled."""
    extra = int(cfg.enabled)
    if name == "llm.head":
        return vocab_size + extra
    if name.startswith("llm.layers."):
        return hidden + (extra if int(name.rsplit(".", 1)[1]) >= cfg.sparse_layer else 0)
    if name == "llm.embed":
        return hidden
    raise ConfigError(f"boundary_width: {name!r} is not an LLM block (llm.embed, llm.layers.<i>, llm.head)")

