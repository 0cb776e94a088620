"""The training objective of a packed micro-batch: weighted next-token cross-entropy (plus Dynamic-LLaVA's
keep-rate penalty), and the normalisation that makes it independent of DP size and accumulation.

Each micro-batch contributes sum_t w_t * CE_t over its supervised tokens (``loss_weight`` from the
packing: token, sample or square weighting). The step's loss is that sum over every micro-batch of
every DP rank, divided by the step's global weight sum W.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from omnibal_pl.batch import IGNORE_INDEX, PackedBatch
from omnibal_pl.model.config import VLMConfig
from omnibal_pl.model.sparsify import keep_rate_loss, split_output

LOSS_SCALE = 1024.0  # keeps the per-micro-batch loss near 1 before the global normalisation


class Objective(NamedTuple):
    """One micro-batch's terms: ``value`` to differentiate (CE sum + weighted penalty), ``loss_sum`` =
    sum_t w_t * CE_t, ``weight`` = sum_t w_t, ``keep_rate_loss`` (None without sparsification)."""

    value: torch.Tensor
    loss_sum: torch.Tensor
    weight: torch.Tensor
    keep_rate_loss: torch.Tensor | None


def token_weights(batch: PackedBatch) -> torch.Tensor:
    """Per next-token prediction weights [1, L - 1]: the packing's ``loss_weight``, 0 where no loss is taken."""
    labels = batch.labels[:, 1:]
    return batch.loss_weight[:, 1:].float() * (labels != IGNORE_INDEX)


def packed_loss_sum(logits: torch.Tensor, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_t w_t * CE_t, sum_t w_t) over next-token predictions of a packed micro-batch.

    Labels are aligned with ``input_ids``; position t predicts label t + 1. Every sample starts with an
    unsupervised token, so no prediction crosses a sample boundary.
    """
    labels = batch.labels[:, 1:]
    weights = token_weights(batch)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten().clamp(min=0), reduction="none")
    return (ce * weights.flatten()).sum(), weights.sum()


def micro_batch_objective(out: torch.Tensor, batch: PackedBatch, cfg: VLMConfig) -> Objective:
    """The objective of one micro-batch from the model's output.

    With sparsification the keep-rate penalty is weighted by the micro-batch's share of the supervised
    weight, so the step-end division by the global weight W cancels it back to a per-micro-batch term.
    """
    logits, keep = split_output(out, cfg.sparsify)
    loss_sum, weight = packed_loss_sum(logits, batch)
    if keep is None:
        return Objective(loss_sum, loss_sum, weight, None)
    aux = keep_rate_loss(keep, batch, cfg.sparsify, cfg.image_context_id).loss
    return Objective(loss_sum + aux * weight.detach(), loss_sum, weight, aux.detach())
