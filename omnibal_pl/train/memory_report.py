"""What each rank of a run holds, measured after a few optimizer steps, beside the plan's prediction.

Every run writes ``memory_report.json`` (global rank 0, gathered from every rank) once the batch after
optimizer step ``at_step`` has finished (past the pipeline's shape inference and the optimizer's lazy state):

- measured, per rank: parameter, gradient and optimizer-state bytes this rank holds (local shards under
  ZeRO 2/3, this rank's partition of the state under ZeRO 1); the peak of activation bytes autograd held
  during that step's batch (:class:`~omnibal_pl.plan.saved_bytes.PeakSavedBytes`: the whole step under
  the pipeline strategy, its first micro-batch otherwise); on CUDA the allocator's peak
  (``torch.cuda.max_memory_allocated``) since the run started;
- predicted: the plan's static bytes (parameters + gradients + optimizer state) and in-flight activation
  bytes of this rank's stages (``plan.notes``), or, without a plan, the memory model's static bytes of the
  whole model at ZeRO 0.

Static bytes are bookkeeping, so measured and predicted should agree (``scripts/bench_memory.py`` shows
the figures); activations are checked against the CUDA peak by ``scripts/gpu_check.sh``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from omnibal_pl.parallel.dcp import state_holder
from omnibal_pl.parallel.sharding import local_tensor
from omnibal_pl.plan.costs import ZeroSharding, training_static_bytes
from omnibal_pl.plan.plan import Plan
from omnibal_pl.plan.saved_bytes import ParameterFilter, PeakSavedBytes


def held_bytes(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds in ``params``, their gradients and ``optimizer``'s per-parameter tensors."""
    def size(tensors: Any) -> int:
        return sum(local_tensor(t).numel() * t.element_size() for t in tensors)

    state = state_holder(optimizer).state
    return {"params": size(params), "grads": size(p.grad for p in params if p.grad is not None),
            "optimizer": size(v for p in params for v in state.get(p, {}).values()
                              if isinstance(v, torch.Tensor) and v.dim() > 0)}


class MemoryReport(pl.Callback):
    """Writes ``path`` (see the module docstring) after optimizer step ``at_step``; ``plan``: the run's plan
    (None for a run without pipeline stages)."""

    def __init__(self, path: Path, plan: Plan | None, at_step: int = 2) -> None:
        self.path, self.plan, self.at_step = Path(path), plan, at_step
        self.written = False
        self.probe: PeakSavedBytes | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.written or trainer.global_step < self.at_step or self.probe is not None:
            return
        micro_batches = batch if isinstance(batch, (list, tuple)) else [batch]
        self.probe = PeakSavedBytes(ParameterFilter([*pl_module.parameters(),
                                                     *(t for mb in micro_batches for t in mb.tensors())]))
        self.probe.__enter__()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.written or self.probe is None:
            return
        self.probe.__exit__(None, None, None)
        self.written = True
        row = self._measure(trainer, pl_module)
        row["measured_activations"] = self.probe.peak
        rows = [row]
        if dist.is_available() and dist.is_initialized():
            rows = [None] * dist.get_world_size()
            dist.all_gather_object(rows, row)
        if trainer.is_global_zero:
            self.path.write_text(json.dumps({"at_step": trainer.global_step, "ranks": rows}, indent=1))

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        params = list(pl_module.parameters())
        measured = held_bytes(params, trainer.optimizers[0])
        row: dict[str, Any] = {"rank": trainer.global_rank, "measured": measured,
                               "measured_static": sum(measured.values())}
        if pl_module.device.type == "cuda":
            row["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(pl_module.device)
        if self.plan is not None and "stage_static_bytes" in self.plan.notes:
            stages = self.plan.stages_of_rank(trainer.strategy.dims.pp_rank)
            row["stages"] = stages
            row["predicted_static"] = sum(self.plan.notes["stage_static_bytes"][s] for s in stages)
            row["predicted_activations"] = sum(self.plan.notes["stage_activation_bytes"][s] for s in stages)
        elif self.plan is None:
            count = sum(p.numel() for p in params)
            row["predicted_static"] = sum(training_static_bytes(count, 4, ZeroSharding(0, 1)))
        return row
