"""``SkipBudget``: holds a running fit to ``dataset.max_skip_fraction`` (see :mod:`omnibal_pl.data.skips`), and
carries the loaders' drop counts through checkpoints.

The loaders' drops reach the module as global counts: each micro-batch carries the samples its collate left
out (``PackedBatch.skipped``), the step meter adds them to the step's totals, which every rank all-reduces
once per optimizer step anyway, and keeps the sums (``StepMeter.dropped_total``). So every rank sees the same
counts after the same step and stops at the same one: no collective of its own. The sums and the current
epoch's share of them are this callback's checkpoint state, so a resumed run reports (and budgets) the drops
of the steps before the checkpoint too.
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
        self._dropped: dict[str, int] = {}  # the module's StepMeter.dropped_total (the same dict), once set up
        self._epoch = -1  # the epoch _epoch_start belongs to
        self._epoch_start: dict[str, int] = {}  # the drops before it began

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._dropped = pl_module.meter.dropped_total

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch != self._epoch:  # not when a run resumes inside the epoch
            self._epoch, self._epoch_start = trainer.current_epoch, dict(self._dropped)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        epoch = {reason: n - self._epoch_start.get(reason, 0) for reason, n in self._dropped.items()}
        check_budget(add_counts(self.start.counts, epoch), self.start.records, self.limit,
                     f"epoch {trainer.current_epoch}, step {trainer.global_step}")

    def state_dict(self) -> dict[str, Any]:
        return {"dropped": dict(self._dropped), "epoch": self._epoch, "epoch_start": dict(self._epoch_start)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the drop counts into the module's meter (``setup`` ran before Lightning restores callbacks)."""
        self._dropped.update(state_dict["dropped"])
        self._epoch, self._epoch_start = state_dict["epoch"], dict(state_dict["epoch_start"])
