"""Per-optimizer-step accounting shared by the training modules: work done, time, throughput and MFU.

Hot-path rule: nothing here reads a device tensor per micro-batch. The work (tokens, samples, tiles,
FLOPs) comes from the batch's host facts (:class:`~omnibal_pl.batch.PackedBatch`, counted by the
collate); the loss terms are summed as device tensors and read once per optimizer step, by the caller's
all-reduce of :meth:`StepMeter.local_totals` (and :meth:`StepMeter.finish_step` for the keep-rate penalty).
"""
from __future__ import annotations

import time
from collections.abc import Collection

import torch

from omnibal_pl.batch import PackedBatch
from omnibal_pl.data.skips import LOADER_REASONS
from omnibal_pl.model.config import VLMConfig
from omnibal_pl.model.flops import train_flops
from omnibal_pl.qwen_batch import QwenPackedBatch
from omnibal_pl.train.objective import Objective


class StepMeter:
    """Sums one optimizer step's local work (tokens, samples, tiles, training FLOPs) and loss terms; turns
    the step's global totals into logged metrics. Times from the first micro-batch to :meth:`finish_step`.

    ``frozen``: the ``optim.freeze`` parts, which :func:`~omnibal_pl.model.flops.train_flops` counts with
    less backward work.
    """

    def __init__(self, cfg: VLMConfig, peak_tflops: float | None, frozen: Collection[str] = ()) -> None:
        self.cfg = cfg
        self.peak_tflops = peak_tflops
        self.frozen = tuple(frozen)
        self.dropped_total = dict.fromkeys(LOADER_REASONS, 0)  # samples the loaders of all ranks dropped, by reason
        self._reset()

    def _reset(self) -> None:
        self.loss_sum: torch.Tensor | None = None  # device scalars, summed over the step's micro-batches
        self.weight: torch.Tensor | None = None
        self.keep_rate_loss: torch.Tensor | None = None
        self.tokens = self.samples = self.tiles = 0  # host counts
        self.flops = 0.0
        self.micro_batches = 0
        self.dropped = dict.fromkeys(LOADER_REASONS, 0)  # this process's step: samples its loader dropped
        self.start: float | None = None
        self.sample_ids: list[torch.Tensor] = []  # the step's micro-batches' ids, read only if the run stops on them

    def account(self, batch: PackedBatch) -> None:
        """Add a micro-batch's real tokens, samples, tiles and training FLOPs (host facts only: no device read)."""
        if self.start is None:
            self.start = time.perf_counter()
        self.tokens += batch.num_tokens
        self.samples += batch.num_samples
        self.tiles += batch.num_tiles
        grids = batch.image_grids if isinstance(batch, QwenPackedBatch) else None
        self.flops += train_flops(self.cfg, batch.num_tiles, batch.sample_seqlens, self.frozen, grids)
        self.micro_batches += 1
        self.sample_ids.append(batch.sample_ids)
        for reason, n in batch.skipped.items():
            self.dropped[reason] += n

    def step_sample_ids(self) -> list[int]:
        """The dataset indices of this process's micro-batches of the running step (reads the device)."""
        return [int(i) for ids in self.sample_ids for i in ids.tolist()]

    def add_loss(self, objective: Objective) -> None:
        """Add a micro-batch's weighted CE sum, weight and keep-rate penalty, on their device (no host read)."""
        self.loss_sum = _add(self.loss_sum, objective.loss_sum)
        self.weight = _add(self.weight, objective.weight)
        if objective.keep_rate_loss is not None:
            self.keep_rate_loss = _add(self.keep_rate_loss, objective.keep_rate_loss)

    def local_totals(self, device: torch.device) -> torch.Tensor:
        """[loss_sum, weight, tokens, samples, tiles, FLOPs, dropped per ``LOADER_REASONS``] of this process's step
        (float64 on ``device``), to all-reduce. Built without a host read; the caller reads the reduced tensor once per optimizer step."""
        loss = torch.stack([_on(self.loss_sum, device), _on(self.weight, device)])
        return torch.cat([loss, self.work_totals(device)])

    def work_totals(self, device: torch.device) -> torch.Tensor:
        """[tokens, samples, tiles, FLOPs, samples dropped per ``LOADER_REASONS``] of this process's step so far
        (float64 on ``device``), from host counts."""
        return torch.tensor([self.tokens, self.samples, self.tiles, self.flops, *self.dropped.values()],
                            dtype=torch.float64, device=device)

    def finish_step(self, loss: float, totals: list[float], lr: float, world_size: int, grad_norm: float
                    ) -> dict[str, float]:
        """The step's metrics from its global loss, totals (tokens, samples, tiles, FLOPs, then the samples the
        loaders dropped per ``LOADER_REASONS``, which may be left out) and gradient norm before clipping; starts
        the next. ``skipped/<reason>``: samples dropped by the loaders of all ranks since the run began (a resumed
        run gets the earlier counts back from its checkpoint: :class:`~omnibal_pl.train.skip_budget.SkipBudget`).

        Reads the step's keep-rate penalty (sparsification only): one host sync per optimizer step."""
        tokens, samples, tiles, flops, *dropped = totals
        for reason, n in zip(LOADER_REASONS, dropped):
            self.dropped_total[reason] += round(n)
        now = time.perf_counter()
        seconds = max(now - (self.start or now), 1e-9)
        metrics = {"train/loss": loss, "train/tokens_per_s": tokens / seconds, "train/samples_per_s": samples / seconds,
                   "train/tiles_per_s": tiles / seconds, "train/step_s": seconds, "train/lr": lr,
                   "train/grad_norm": grad_norm, **{f"skipped/{r}": float(n) for r, n in self.dropped_total.items()}}
        if self.peak_tflops:
            metrics["train/mfu"] = flops / seconds / (self.peak_tflops * 1e12 * world_size)
        if self.keep_rate_loss is not None:
            metrics["train/keep_rate_loss"] = float(self.keep_rate_loss) / max(self.micro_batches, 1)
        self._reset()
        return metrics


def _add(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    """``total + term`` as a detached fp64 device scalar (``term`` alone when there is no total yet)."""
    term = term.detach().to(torch.float64)
    return term if total is None else total + term


def _on(total: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """A summed term as an fp64 scalar on ``device`` (0 when the step added none)."""
    if total is None:
        return torch.zeros((), dtype=torch.float64, device=device)
    return total.to(device)
