"""The balance time model fitted from a run's own micro-batches (``trainer.time_model_steps``).

For ``steps`` optimizer steps after the first ``skip_steps`` (compilation, allocator and optimizer-state
warm-up), every training micro-batch is timed from the start of its batch to its end (forward, backward, and
for the micro-batch that ends a step the optimizer step; on CUDA with a device synchronisation at both ends),
and its features are read from the length table by its sample ids: the same sums the sampler weighs groups by
(:func:`~omnibal_pl.balance.cost.group_features`). Then every rank's measurements are gathered and
:func:`~omnibal_pl.balance.fit_time_model` fits them (the optimizer step fitted alongside and left out,
as it is the same on every rank); global rank 0 writes the model to ``path`` (the run directory's ``time_model.json``) for a
later run's ``balance.cost=fitted balance.time_model=<path>``, with the setting it was measured in
(:func:`time_model_setting`), which that run checks against its own. A fit that is refused (too few micro-batches,
times the terms do not explain) is logged with its reason and nothing is written: the run's balance is as set.
A run that also balances by a time model (``balance.time_model``) logs how that model's predictions of the timed
micro-batches differ from the fresh fit's, a check of the model against the machine it runs on.

Only without the pipeline strategy: there a loader item is a whole pipelined step, not one micro-batch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist

from omnibal_pl.balance.cost import TERMS, TimeModel, fit_time_model, sample_features
from omnibal_pl.errors import BalanceError
from omnibal_pl.lengths import LengthTable
from omnibal_pl.model import VLMConfig, resolve_backend
from omnibal_pl.plan.profiler import device_name, precision_of

log = logging.getLogger(__name__)


def time_model_setting(model: VLMConfig, device: torch.device, precision: str, pad_to: str) -> dict[str, str]:
    """What a micro-batch's seconds depend on besides its features, as a time model records it (``made_for``):
    the model config (its name and a digest of every field: widths, sparsification, LoRA), the device kind
    (``cpu`` or the GPU's name), Lightning's precision, the attention kernel the model's backend runs here, and
    the packing's ``pad_to`` (padding to the caps times tokens the features do not count)."""
    digest = hashlib.sha1(json.dumps(model.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    prec = precision_of(precision)
    return {"model": model.name, "model_config": digest, "device": device_name(device), "precision": prec.name,
            "attention": resolve_backend(model.attention_backend, device, prec.autocast or prec.params),
            "pad_to": pad_to}


class TimeModelCalibration(pl.Callback):
    """Times the micro-batches of optimizer steps ``skip_steps .. skip_steps + steps - 1`` and fits the time model
    (see the module docstring). ``made_for``: the run's :func:`time_model_setting`, recorded in the model; ``clock``
    (seconds) is replaceable for tests; ``model`` holds the fit once done. ``balance_model``: the model the run
    balances by (``balance.time_model``), if any; the log then says how far the fresh fit is from it
    (:func:`model_agreement`)."""

    def __init__(self, path: Path, lengths: LengthTable, steps: int, made_for: dict[str, str], skip_steps: int = 1,
                 clock: Callable[[], float] = time.perf_counter, balance_model: TimeModel | None = None) -> None:
        self.path, self.steps, self.skip_steps, self.clock = Path(path), steps, skip_steps, clock
        self.made_for, self.balance_model = made_for, balance_model
        self.features = sample_features(lengths)  # [samples, len(TERMS)]
        self.rows: list[list[float]] = []  # per timed micro-batch: its features, then seconds and whether it ended a step
        self.model: TimeModel | None = None
        self._started: tuple[float, int] | None = None  # (clock, global step) at the running batch's start
        self._done = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._done and self.skip_steps <= trainer.global_step < self.skip_steps + self.steps:
            _synchronize(pl_module.device)
            self._started = (self.clock(), trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._started is None:
            return
        _synchronize(pl_module.device)
        start, step = self._started
        self._started = None
        ids = batch.sample_ids.tolist()  # a host read, during the timed steps only
        self.rows.append([*self.features[ids].sum(axis=0), self.clock() - start, float(trainer.global_step > step)])
        if trainer.global_step >= self.skip_steps + self.steps:
            self._finish(trainer)

    def _finish(self, trainer: pl.Trainer) -> None:
        self._done = True
        rows = self.rows
        if dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows)
            rows = [r for rank_rows in gathered for r in rank_rows]
        table = np.asarray(rows, np.float64).reshape(-1, len(TERMS) + 2)
        try:
            self.model = fit_time_model(table[:, : len(TERMS)], table[:, len(TERMS)], step_ends=table[:, -1],
                                        made_for=self.made_for)
        except BalanceError as e:
            if trainer.is_global_zero:
                log.warning("trainer.time_model_steps: no time model written: %s", e)
            return
        if trainer.is_global_zero:
            self.model.save(self.path)
            terms = ", ".join(f"{t} {c:.3g}" for t, c in zip(TERMS, self.model.coefficients)) + \
                f", fixed {self.model.fixed_s:.3g}"
            log.warning("time model fitted on %d micro-batches (s per unit: %s; rms error %.3g s): %s; use it with "
                        "balance.cost=fitted balance.time_model=%s", self.model.fitted_on, terms,
                        self.model.rms_error, self.path, self.path)
            if self.balance_model is not None:
                level, spread = model_agreement(self.balance_model, self.model, table[:, : len(TERMS)])
                log.warning("balance.time_model predicts this run's timed micro-batches at %.2fx its own fit (a "
                            "factor common to all does not change the balance) and that ratio varies by %.1f%% "
                            "between them (coefficient of variation): the balance misweighs micro-batches by about "
                            "that; when it is large the model no longer describes this machine, use the one just "
                            "written", level, 100 * spread)


def model_agreement(balance: TimeModel, measured: TimeModel, features: np.ndarray) -> tuple[float, float]:
    """How ``balance`` (the model a run balances by) predicts the micro-batches of ``features`` against
    ``measured`` (fitted on their measured times): the median of the ratio balance / measured per micro-batch (a
    common factor, which does not change which rank is heavier), and the ratio's coefficient of variation (how
    unevenly ``balance`` weighs them, which does; 0 when one model is a multiple of the other)."""
    ratio = balance.predict(features) / measured.predict(features)
    return float(np.median(ratio)), float(np.std(ratio) / np.mean(ratio))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
