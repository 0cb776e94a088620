"""A progress bar over the run's optimizer steps.

Lightning's bars count loader items within an epoch: under gradient accumulation an item is a micro-batch (the
bar ran to the epoch's micro-batch count, "20/5" beside max_steps=5), and the rich bar prints
``Epoch 0/-2`` when ``max_epochs=-1``. This one has a single bar for the whole fit: ``steps n/N`` with
``N = trainer.estimated_stepping_batches`` (max_steps, or what max_epochs gives), ``n`` the optimizer steps done
(resumed runs start at their step), whatever the accumulation, pipeline or epoch boundaries.
"""
from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf


class StepProgressBar(TQDMProgressBar):
    """TQDM bar over optimizer steps (see the module docstring); validation bars are Lightning's."""

    @property
    def train_description(self) -> str:
        return "steps"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=convert_inf(trainer.estimated_stepping_batches))
        bar.n = bar.initial = trainer.global_step
        bar.refresh()

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run: epochs do not restart it

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if step != bar.n and self._should_update(step, bar.total):  # accumulation: the step ends on its last item
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
