"""``OmniBalPipelineModule``: pipeline x data parallel training under :class:`~omnibal_pl.parallel.OmniBalStrategy`.

One ``training_step`` is one optimizer step (manual optimisation, as NeMo's Megatron strategy runs a
pipeline inside Lightning): its batch is the step's ``m`` micro-batches (one loader item, see
``OmniBalDataModule(whole_steps=True)``). The step all-reduces the supervised weight W over the
"dp" group, zeroes the gradients, runs the pipeline schedule's forward and backward over the ``m``
micro-batches with each micro-batch's objective multiplied by ``m x dp / W`` (the runner's mean over
``m`` micro-batches and ``dp`` replicas then leaves sum(objective) / W, as in
:class:`~omnibal_pl.train.module.OmniBalModule`), clips by the norm over all stages, steps the optimizer
and the LR schedule, and logs (host syncs: the reduced totals, read once before the schedule runs, and the
step's loss after it; none per micro-batch). Only this rank's stages exist (``configure_model``, called by the
Trainer once processes are up).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from omnibal_pl.batch import PackedBatch
from omnibal_pl.errors import ConfigError
from omnibal_pl.parallel import OmniBalStrategy, PipelineRunner
from omnibal_pl.train.module import VLMTrainingModule
from omnibal_pl.train.objective import micro_batch_objective, token_weights


class OmniBalPipelineModule(VLMTrainingModule):
    """The pipeline's training module (see the module docstring). ``gradient_clip_val``: clip the global
    gradient norm (over all stages) to this value; None or 0 = no clipping (Lightning's own clipping does not
    run under manual optimisation, so the value lives here)."""

    def __init__(self, *args: Any, gradient_clip_val: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.gradient_clip_val = gradient_clip_val
        self.runner: PipelineRunner | None = None
        self.stages: nn.ModuleList | None = None
        self._loss_scale = 1.0  # m x dp / W of the running step

    def _initial_model(self) -> None:
        return None  # the stages come from the strategy in configure_model

    def _strategy(self) -> OmniBalStrategy:
        strategy = self.trainer.strategy
        if not isinstance(strategy, OmniBalStrategy):
            raise ConfigError(f"OmniBalPipelineModule runs under OmniBalStrategy (cluster.strategy=omnibal), not "
                              f"{type(strategy).__name__}; use OmniBalModule for data-parallel training")
        return strategy

    def configure_model(self) -> None:
        if self.runner is not None:
            return
        with torch.device("cpu"):  # the full state only seeds the stages; keep it off the accelerator
            full = self.build_model().state_dict()
        self.runner = self._strategy().build_runner(self.model_cfg, full, self._micro_batch_loss)
        self.stages = nn.ModuleList(self.runner.modules)

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for p, name in self._strategy().optimizer_names().items()]

    def local_models(self) -> list[nn.Module]:
        return [stage.model for stage in self.runner.modules]

    def optimizer_shard_group(self) -> dist.ProcessGroup | None:
        """ZeRO 1: the AdamW state partitioned over this stage's DP ranks (levels 2 and 3 shard it with FSDP2)."""
        return self.runner.dp_group if self._strategy().plan.zero == 1 else None

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        raise ConfigError("a pipelined model has no single-process forward: each rank holds only its stages; "
                          "gather a checkpoint into one VLM to run it whole")

    def _micro_batch_loss(self, out: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        return micro_batch_objective(out, batch, self.model_cfg).value * self._loss_scale

    def training_step(self, batch: list[PackedBatch], batch_idx: int) -> torch.Tensor:
        if not isinstance(batch, (list, tuple)) or len(batch) != self.runner.num_micro_batches:
            raise ConfigError(f"OmniBalPipelineModule takes the step's {self.runner.num_micro_batches} micro-batches "
                              "as one batch: build the DataModule with whole_steps=True")
        for mb in batch:
            self.meter.account(mb)
        totals = self._step_totals(batch)
        dist.all_reduce(totals, group=self.runner.dp_group)  # the ranks of one pipeline hold the same batches
        host = totals.tolist()  # the step's one host sync before its schedule runs (allowed: once per step)
        self._loss_scale = len(batch) * dist.get_world_size(self.runner.dp_group) / max(host[0], 1e-12)
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        loss = self.runner.train_step(batch)
        norm = self.runner.clip_grad_norm_(float(self.gradient_clip_val or math.inf))  # inf: measure, do not clip
        step_loss, grad_norm = torch.stack([loss.to(norm), norm]).tolist()  # read once, after the schedule
        # both global (loss broadcast and averaged over DP, norm over all stages): every rank decides alike
        if not self.nonfinite.admit(step_loss, grad_norm, self.global_step, self.meter.step_sample_ids):
            optimizer.zero_grad(set_to_none=True)  # no gradient: no update, no moment change; the step still counts
        optimizer.step()
        self.lr_schedulers().step()
        self.log_step(step_loss, host[1:], grad_norm)
        return loss

    def validation_step(self, batch: list[PackedBatch], batch_idx: int) -> None:
        """Forward only through the pipeline; the last stage adds each micro-batch's terms to the meter."""
        self.runner.eval_step(batch, self.validation.add)

    def _step_totals(self, batch: list[PackedBatch]) -> torch.Tensor:
        """[W, tokens, samples, tiles, FLOPs] of this rank's step (float64 on the module's device), to all-reduce:
        the supervised weight summed on the device, the work from the meter's host counts (no host read)."""
        weights = [token_weights(mb).sum().to(self.device, torch.float64) for mb in batch]
        return torch.cat([torch.stack(weights).sum().view(1), self.meter.work_totals(self.device)])
