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
from torch.autograd.function import once_differentiable

from omnibal_pl.batch import IGNORE_INDEX, PackedBatch
from omnibal_pl.errors import ConfigError
from omnibal_pl.model.config import VLMConfig
from omnibal_pl.model.sparsify import keep_rate_loss, split_output

LOSS_SCALE = 1024.0  # keeps the per-micro-batch loss near 1 before the global normalisation
# Positions per cross-entropy chunk: one chunk's fp32 logits are 256 x 152064 x 4 B = 148.5 MiB at
# Qwen2's vocabulary (90 MiB at InternLM2's 92544), the loss's only buffer of vocabulary width besides
# the logits and their gradient.
CE_CHUNK_TOKENS = 256


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


def _row_chunks(rows: int, chunk_tokens: int) -> list[slice]:
    """Consecutive row ranges of at most ``chunk_tokens`` rows covering ``range(rows)`` once, in order."""
    return [slice(start, min(start + chunk_tokens, rows)) for start in range(0, rows, chunk_tokens)]


def _chunk_buffer(logits: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """The one fp32 work buffer of a pass, [min(chunk_tokens, N), vocab]: each chunk's logits are copied
    into it and overwritten in place (a fresh ``.float()`` per chunk would alias fp32 logits, and keep two
    chunks alive while the loop variable is rebound)."""
    rows = min(chunk_tokens, logits.shape[0])
    return torch.empty(rows, logits.shape[1], dtype=torch.float32, device=logits.device)


def _logsumexp_(x: torch.Tensor) -> torch.Tensor:
    """log sum_v exp x[n, v] of a [n, vocab] fp32 tensor, overwriting ``x`` (no second [n, vocab] buffer).

    Logits must be finite (a row whose maximum is inf would give NaN)."""
    peak = x.amax(dim=1, keepdim=True)
    return x.sub_(peak).exp_().sum(dim=1).log_().add_(peak.squeeze(1))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """sum_n w_n * CE(logits[n], targets[n]) with fp32 arithmetic on ``chunk_tokens`` rows at a time.

    Forward keeps one [chunk_tokens, vocab] fp32 buffer and saves only the inputs and the per-row
    log-sum-exp ([N] fp32); backward recomputes the softmax chunk by chunk and writes the gradient
    straight into a [N, vocab] tensor of the logits' dtype. Neither pass holds fp32 logits for all rows.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, logits: torch.Tensor, targets: torch.Tensor,
                weights: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
        """``logits`` [N, vocab] any float dtype; ``targets`` [N] int64 in [0, vocab); ``weights`` [N] fp32."""
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        target_logit = torch.empty_like(lse)
        buffer = _chunk_buffer(logits, chunk_tokens)
        for rows in _row_chunks(logits.shape[0], chunk_tokens):
            x = buffer[: rows.stop - rows.start].copy_(logits[rows])
            target_logit[rows] = x.gather(1, targets[rows, None]).squeeze(1)
            lse[rows] = _logsumexp_(x)
        ctx.save_for_backward(logits, targets, weights, lse)
        ctx.chunk_tokens = chunk_tokens
        return ((lse - target_logit) * weights).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 grad_total: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        """d total / d logits[n] = grad_total * w_n * (softmax(logits[n]) - onehot(targets[n]))."""
        logits, targets, weights, lse = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        scale = weights * grad_total
        buffer = _chunk_buffer(logits, ctx.chunk_tokens)
        for rows in _row_chunks(logits.shape[0], ctx.chunk_tokens):
            p = buffer[: rows.stop - rows.start].copy_(logits[rows]).sub_(lse[rows, None]).exp_()
            index = targets[rows, None]
            p.scatter_add_(1, index, torch.full(index.shape, -1.0, dtype=p.dtype, device=p.device))
            grad[rows] = p.mul_(scale[rows, None])
        return grad, None, None, None


def packed_loss_sum(logits: torch.Tensor, batch: PackedBatch,
                    chunk_tokens: int = CE_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_t w_t * CE_t, sum_t w_t) over next-token predictions of a packed micro-batch, both fp32 scalars.

    ``logits`` is [1, L, vocab] in any float dtype. Labels are aligned with ``input_ids``; position t
    predicts label t + 1. Every sample starts with an unsupervised token, so no prediction crosses a sample
    boundary. CE_t is computed in fp32 over ``chunk_tokens`` positions at a time, forward and backward,
    so the extra memory is one [chunk_tokens, vocab] fp32 buffer, not an fp32 copy of the logits; the
    gradient w.r.t. ``logits`` is in their dtype. The last position predicts nothing and enters with
    target 0 and weight 0 (zero loss and gradient), so the chunks cover the logits without a slice copy.
    """
    if chunk_tokens < 1:
        raise ConfigError(f"packed_loss_sum: chunk_tokens={chunk_tokens}; a chunk needs at least 1 position")
    weights = token_weights(batch)
    targets = F.pad(batch.labels[:, 1:].clamp(min=0), (0, 1))
    loss_sum = _ChunkedCrossEntropy.apply(logits.flatten(0, 1), targets.flatten(),
                                          F.pad(weights, (0, 1)).flatten(), chunk_tokens)
    return loss_sum, weights.sum()


def head_loss_sum(logits: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """sum_t w_t * CE_t of :func:`packed_loss_sum`: the loss the block profiler measures with ``llm.head``
    for a training run (:data:`omnibal_pl.plan.profiler.HeadLoss`)."""
    return packed_loss_sum(logits, batch)[0]


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
