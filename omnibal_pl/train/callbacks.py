"""Lightning callbacks of the training loop."""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from omnibal_pl.model.sparsify import Sparsifier, gumbel_tau


class GumbelTemperature(pl.Callback):
    """Sets the predictors' Gumbel temperature before every training batch: :func:`gumbel_tau` at
    ``trainer.global_step`` over ``trainer.estimated_stepping_batches``, start/end from the config."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        for m in pl_module.modules():
            if isinstance(m, Sparsifier):
                m.tau = gumbel_tau(trainer.global_step, max(int(trainer.estimated_stepping_batches), 1),
                                   m.cfg.tau_start, m.cfg.tau_end)
