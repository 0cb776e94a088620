"""The keep-rate loss: pulls each sample's kept fraction of every sparsified span towards its target rate."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omnibal_pl.batch import PackedBatch
from omnibal_pl.model.sparsify.config import SparsifyConfig
from omnibal_pl.model.sparsify.predictors import sparsified_spans
from omnibal_pl.model.sparsify.spans import span_lengths


@dataclass
class KeepRateLoss:
    """``loss``: weighted keep-rate penalty (a scalar with gradient; 0 when no span is sparsified).
    ``kept``: mean kept fraction per kind over the penalised samples (detached floats, for logging)."""

    loss: torch.Tensor
    kept: dict[str, float]


def keep_rate_loss(keep: torch.Tensor, batch: PackedBatch, cfg: SparsifyConfig, image_context_id: int) -> KeepRateLoss:
    """``mask_loss_weight * sum over kinds of mean over samples of (keep_rate - kept_fraction)^2``, as the original.

    ``keep`` [L] or [1, L] is the mask from :func:`~omnibal_pl.model.sparsify.channel.split_output`; the
    spans are those the predictors decided on (:func:`~omnibal_pl.model.sparsify.predictors.sparsified_spans`).
    Vision: the mean over samples with image tokens. Output / instruction text: the mean over every sample
    that has the span, a span shorter than ``*_len_for_training`` tokens (kept whole, so not penalised)
    counting 0; the original sets such a sample's target to its own kept fraction, which is the same. (A
    mean over the long spans only would weigh the penalty B / B_long times stronger.) Host syncs (allowed,
    sparsification only): the spans, and per kind whether any sample is penalised and its kept fraction.
    """
    keep = keep.reshape(-1).float()
    spans = sparsified_spans(batch, cfg, image_context_id)
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
        counts = span_lengths(span, spans)
        sums = torch.zeros(spans.num_samples, dtype=keep.dtype, device=keep.device).index_add(0, spans.sample[span], keep[span])
        penalised = counts >= min_len
        if not bool(penalised.any()):
            continue
        fraction = sums[penalised] / counts[penalised].to(keep.dtype)
        samples = (counts > 0).sum()
        loss = loss + cfg.mask_loss_weight * ((rate - fraction) ** 2).sum() / samples
        kept[name] = float(fraction.detach().mean())
    return KeepRateLoss(loss, kept)
