"""Analytic cost of sparsification: the masked attention path (FLOPs, memory) and the predictors (FLOPs).

Plain arithmetic on shapes (no torch): the planner's cost model (:mod:`omnibal_pl.plan.cost_model`) and
``scripts/bench_sparsify.py`` use these formulas without running the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from omnibal_pl.model.sparsify.config import SparsifyConfig


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
    """:class:`MaskedAttentionCost` of one layer of :func:`~omnibal_pl.model.sparsify.masked_attention.masked_varlen_attention`
    for segments of ``seqlens`` tokens."""
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
