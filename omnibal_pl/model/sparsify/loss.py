"""The keep-rate loss: pulls each sample's kept fraction of every sparsified span towards its target rate."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omnibal_pl.batch import PackedBatch
from omnibal_pl.model.sparsify.config import SparsifyConfig
from omnibal_pl.model.sparsify.spans import find_spans, span_lengths


@dataclass
class KeepRateLoss:
    """``loss``: weighted keep-rate penalty (a scalar with gradient; 0 when no span is sparsified).
    ``kept``: mean kept fraction per kind over the penalised samples (detached floats, for logging)."""

    loss: torch.Tensor
    kept: dict[str, float]


def keep_rate_loss(keep: torch.Tensor, batch: PackedBatch, cfg: SparsifyConfig, image_context_id: int) -> KeepRateLoss:
    """``mask_loss_weight * mean over samples of (keep_rate - kept_fraction)^2``, summed over the kinds.

    ``keep`` [L] or [1, L] is the mask from :func:`~omnibal_pl.model.sparsify.channel.split_output`.
    Vision: samples with image tokens; output / instruction text: samples whose span is at least
    ``*_len_for_training`` tokens long. Host syncs (allowed, sparsification only): :func:`find_spans`, and
    per kind whether any sample is penalised and its kept fraction for ``kept``.
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
        counts = span_lengths(span, spans)
        sums = torch.zeros(spans.num_samples, dtype=keep.dtype, device=keep.device).index_add(0, spans.sample[span], keep[span])
        chosen = counts >= min_len
        if not bool(chosen.any()):
            continue
        fraction = sums[chosen] / counts[chosen].to(keep.dtype)
        loss = loss + cfg.mask_loss_weight * ((rate - fraction) ** 2).mean()
        kept[name] = float(fraction.detach().mean())
    return KeepRateLoss(loss, kept)
