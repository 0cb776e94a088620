"""Validation loss and token accuracy over the held-out split (``dataset.val_fraction``).

One pass sums, over every micro-batch of every DP rank: the weighted cross-entropy sum_t w_t * CE_t and the
weight sum_t w_t (the training objective's terms, so ``val/loss`` is comparable to ``train/loss``), and the
supervised next-token predictions and how many of them the argmax gets right. The sums stay on the device
until the pass ends; one all-reduce and one host read give

- ``val/loss`` = sum(w * CE) / sum(w), the global weighted mean, whatever the DP size;
- ``val/token_acc`` = correct / supervised predictions (unweighted);
- ``val/skipped/<reason>``: held-out samples the loaders dropped in the pass (an image that no longer decodes,
  under ``dataset.bad_samples=skip``); each pass reads them again, so each pass counts them again.
"""
from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl
import torch

from omnibal_pl.batch import IGNORE_INDEX, PackedBatch
from omnibal_pl.data.skips import LOADER_REASONS
from omnibal_pl.model.config import VLMConfig
from omnibal_pl.model.sparsify import split_output
from omnibal_pl.train.objective import packed_loss_sum


class ValidationMeter:
    """Sums of one validation pass (see the module docstring): [CE sum, weight, correct, predictions, dropped per
    ``LOADER_REASONS``], float64."""

    def __init__(self, cfg: VLMConfig) -> None:
        self.cfg = cfg
        self.totals: torch.Tensor | None = None
        self.last: dict[str, float] = {}  # the metrics of the last finished pass

    def add(self, out: torch.Tensor, batch: PackedBatch) -> None:
        """Add a micro-batch's terms from the model's output (no host read)."""
        logits, _ = split_output(out, self.cfg.sparsify)
        loss_sum, weight = packed_loss_sum(logits, batch)
        targets = batch.labels[:, 1:]
        supervised = targets != IGNORE_INDEX
        correct = ((logits[:, :-1].argmax(-1) == targets) & supervised).sum()
        dropped = torch.tensor([batch.skipped.get(r, 0) for r in LOADER_REASONS], dtype=torch.float64, device=logits.device)
        terms = torch.cat([torch.stack([loss_sum.double(), weight.double(), correct.double(), supervised.sum().double()]),
                           dropped])
        self.totals = terms if self.totals is None else self.totals + terms

    def finish(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> dict[str, float]:
        """The pass's global metrics (``all_reduce_sum``: the sum over DP ranks); resets for the next pass.
        A rank that validated nothing contributes zeros, so every rank takes part in the reduction."""
        size = 4 + len(LOADER_REASONS)
        local = self.totals if self.totals is not None else torch.zeros(size, dtype=torch.float64, device=device)
        self.totals = None
        loss_sum, weight, correct, predictions, *dropped = all_reduce_sum(local).tolist()
        self.last = {"val/loss": loss_sum / max(weight, 1e-12), "val/token_acc": correct / max(predictions, 1.0),
                     **{f"val/skipped/{r}": n for r, n in zip(LOADER_REASONS, dropped)}}
        return dict(self.last)


class ValidateAfterLastStep(pl.Callback):
    """Validation after the run's last optimizer step (``trainer.max_steps``, or the last batch of epoch
    ``trainer.max_epochs``) also when ``val_check_interval`` does not divide it, so a run ends with the final
    weights' ``val/loss`` (what ``omnibal-train`` returns to a sweeper).

    Lightning validates every ``val_check_interval`` loader items, and when a stop is requested; this requests the
    stop at the last step (which ends the run there anyway), so Lightning's own check validates once, also on a
    last step that is an interval's."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        last_epoch = 0 < trainer.max_epochs <= trainer.current_epoch + 1 and trainer.is_last_batch
        if 0 < trainer.max_steps <= trainer.global_step or last_epoch:
            trainer.should_stop = True
