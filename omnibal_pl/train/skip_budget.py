"""``SkipBudget``: holds a running fit to ``dataset.max_skip_fraction`` (see :mod:`omnibal_pl.data.skips`).

The loaders' drops reach the module as global counts: each micro-batch carries the samples its collate left
out (``PackedBatch.skipped``), the step meter adds them to the step's totals, which every rank all-reduces
once per optimizer step anyway, and keeps the sums (``StepMeter.dropped_total``). So every rank sees the same
counts after the same step and stops at the same one: no collective of its own.
"""
from __future__ import annotations

from typing import Any

import lightning as L

from omnibal_pl.data.skips import SkipCounts, add_counts, check_budget


class SkipBudget(L.Callback):
    """After every training batch: the samples left out at start as bad (``start``) plus those the loaders
    dropped in the current epoch must stay within ``limit`` x ``start.records``, else
    :class:`~omnibal_pl.data.skips.TooManySkipped` ends the fit, naming the reasons and counts."""

    def __init__(self, start: SkipCounts, limit: float) -> None:
        self.start = start
        self.limit = limit
        self._epoch_start: dict[str, int] = {}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = dict(pl_module.meter.dropped_total)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        total = pl_module.meter.dropped_total
        epoch = {reason: n - self._epoch_start.get(reason, 0) for reason, n in total.items()}
        check_budget(add_counts(self.start.counts, epoch), self.start.records, self.limit,
                     f"epoch {trainer.current_epoch}, step {trainer.global_step}")
