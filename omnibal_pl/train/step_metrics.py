"""Per-optimizer-step accounting shared by the training modules: work done, time, throughput and MFU."""
from __future__ import annotations

import time

import torch

from omnibal_pl.batch import PackedBatch
from omnibal_pl.model.config import VLMConfig
from omnibal_pl.model.flops import train_flops
from omnibal_pl.train.objective import Objective


class StepMeter:
    """Sums one optimizer step's local work (tokens, samples, tiles, training FLOPs) and loss terms; turns
    the step's global totals into logged metrics. Times from the first micro-batch to :meth:`finish_step`."""

    def __init__(self, cfg: VLMConfig, peak_tflops: float | None) -> None:
        self.cfg = cfg
        self.peak_tflops = peak_tflops
        self.losses: list[float] = []  # global loss of every finished step
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = self.weight = self.keep_rate_loss = 0.0
        self.tokens = self.samples = self.tiles = self.flops = 0.0
        self.micro_batches = 0
        self.start: float | None = None

    def account(self, batch: PackedBatch) -> None:
        """Add a micro-batch's tokens, samples, tiles and training FLOPs to the step's totals."""
        if self.start is None:
            self.start = time.perf_counter()
        self.tokens += batch.num_tokens
        self.samples += batch.num_samples
        self.tiles += batch.num_tiles
        self.flops += train_flops(self.cfg, int(batch.pixel_values.shape[0]), torch.diff(batch.cu_seqlens).tolist())
        self.micro_batches += 1

    def add_loss(self, objective: Objective) -> None:
        """Add a micro-batch's weighted CE sum, weight and keep-rate penalty."""
        self.loss_sum += float(objective.loss_sum.detach())
        self.weight += float(objective.weight.detach())
        if objective.keep_rate_loss is not None:
            self.keep_rate_loss += float(objective.keep_rate_loss)

    def local_totals(self, device: torch.device) -> torch.Tensor:
        """[loss_sum, weight, tokens, samples, tiles, FLOPs] of this process's step (float64), to all-reduce."""
        return torch.tensor([self.loss_sum, self.weight, self.tokens, self.samples, self.tiles, self.flops],
                            dtype=torch.float64, device=device)

    def finish_step(self, loss: float, totals: list[float], lr: float, world_size: int) -> dict[str, float]:
        """The step's metrics from its global loss and totals (tokens, samples, tiles, FLOPs); starts the next."""
        tokens, samples, tiles, flops = totals
        self.losses.append(loss)
        now = time.perf_counter()
        seconds = max(now - (self.start or now), 1e-9)
        metrics = {"train/loss": loss, "train/tokens_per_s": tokens / seconds, "train/samples_per_s": samples / seconds,
                   "train/tiles_per_s": tiles / seconds, "train/step_s": seconds, "train/lr": lr}
        if self.peak_tflops:
            metrics["train/mfu"] = flops / seconds / (self.peak_tflops * 1e12 * world_size)
        if self.keep_rate_loss:
            metrics["train/keep_rate_loss"] = self.keep_rate_loss / max(self.micro_batches, 1)
        self._reset()
        return metrics
