"""The LightningModules that train a :class:`~omnibal_pl.model.VLM` on packed micro-batches:
:class:`VLMTrainingModule` holds what every run shares (model build, optimizer, step logging), and
:class:`OmniBalModule` trains with data parallelism (DDP, or one process); the pipeline-parallel one is
:class:`~omnibal_pl.train.pipeline_module.OmniBalPipelineModule`.

Loss and gradients (:mod:`omnibal_pl.train.objective`): ``training_step`` returns sum(w * CE) / ``LOSS_SCALE``
of its micro-batch; Lightning divides by ``accumulate_grad_batches`` and DDP averages over ranks;
``on_before_optimizer_step`` (before clipping) all-reduces the step's totals once and multiplies the
gradients by ``LOSS_SCALE * accumulate * dp / W`` (W: the step's global supervised weight). So the loss
and the gradients are the same whatever the DP size and the gradient accumulation.

Host syncs: none inside a micro-batch (``training_step`` accounts from the batch's host facts and keeps the
loss terms on the device); one per optimizer step, reading the all-reduced totals in
``on_before_optimizer_step`` (plus the keep-rate penalty under sparsification, in
:meth:`~omnibal_pl.train.step_metrics.StepMeter.finish_step`).

Logged every optimizer step (:class:`~omnibal_pl.train.step_metrics.StepMeter`): ``train/loss``,
``train/lr``, ``train/tokens_per_s``, ``train/samples_per_s``, ``train/tiles_per_s``, ``train/step_s``,
``train/mfu`` (when the device's peak is known), ``train/keep_rate_loss`` (sparsification) and the
sampler's per-step balance (``balance/vit_dist``, ``balance/llm_dist``: the step's spread over DP ranks).
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import nn

from omnibal_pl.batch import PackedBatch
from omnibal_pl.errors import ConfigError
from omnibal_pl.model import VLM, VLMConfig, load_hf_weights
from omnibal_pl.model.lora import trainable_state_dict
from omnibal_pl.parallel import OmniBalStrategy
from omnibal_pl.train.faults import NonFiniteSteps
from omnibal_pl.train.objective import LOSS_SCALE, micro_batch_objective
from omnibal_pl.train.optim import OptimConfig, build_optimizer
from omnibal_pl.train.run_record import CHECKPOINT_KEY as RUN_RECORD_KEY, RunRecord
from omnibal_pl.train.step_metrics import StepMeter
from omnibal_pl.train.validation import ValidationMeter


class VLMTrainingModule(L.LightningModule):
    """What every training module shares: a VLM built from ``model`` (a :class:`VLMConfig` or its mapping),
    randomly initialised from ``seed`` or loaded from ``init_from`` (a local Hugging Face InternVL-Chat /
    LLaVA-1.5 checkpoint folder), its AdamW + schedule, the per-step metrics, and the skipping of non-finite
    steps (``max_nonfinite_steps`` consecutive ones stop the run: :class:`~omnibal_pl.train.faults.NonFiniteSteps`)."""

    def __init__(self, model: VLMConfig | dict[str, Any], optim: OptimConfig | None = None,
                 peak_tflops: float | None = None, seed: int = 0, init_from: str | None = None,
                 max_nonfinite_steps: int = 3) -> None:
        super().__init__()
        self.model_cfg = model if isinstance(model, VLMConfig) else VLMConfig.from_dict(model)
        self.optim = optim or OptimConfig()
        self.seed, self.init_from = seed, init_from
        self.save_hyperparameters({"model": self.model_cfg.to_dict(), "optim": vars(self.optim),
                                   "peak_tflops": peak_tflops, "seed": seed, "init_from": init_from})
        self.meter = StepMeter(self.model_cfg, peak_tflops, self.optim.freeze)
        self.validation = ValidationMeter(self.model_cfg)
        self.record = RunRecord()  # every optimizer step of the run, whatever the loggers; kept in checkpoints
        self.nonfinite = NonFiniteSteps(max_nonfinite_steps)
        self.model: VLM | None = self._initial_model()

    @property
    def losses(self) -> list[float]:
        """The global loss of every optimizer step of the run (a resumed run: from its checkpoint on, the earlier
        attempts' steps too)."""
        return self.record.losses

    def build_model(self) -> VLM:
        """The whole model: ``torch.manual_seed(seed); VLM(cfg)``, then ``init_from``'s weights if given."""
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = VLM(self.model_cfg)
        if self.init_from is not None:
            load_hf_weights(model, self.init_from)
        return model

    def _initial_model(self) -> VLM | None:
        return self.build_model()

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(model name, parameter) of everything this process optimises, each parameter once."""
        return list(self.model.named_parameters())

    def local_models(self) -> list[VLM]:
        """The models whose state this process's checkpoint holds: the VLM (the pipeline: this rank's stages)."""
        return [self.model]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """With an adapter (``model/adapter=lora``) the checkpoint holds only the trained parameters, under every
        strategy: the frozen ones are rebuilt from the seed or ``init_from`` on resume."""
        if self.model_cfg.adapter.enabled:
            trained = {f"model.{n}" for m in self.local_models() for n in trainable_state_dict(m)}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}
        checkpoint[RUN_RECORD_KEY] = {**self.record.state_dict(), "nonfinite": self.nonfinite.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The run's record and skipped-step counts up to the checkpoint (none in a checkpoint saved before they
        were kept: the summary then covers this attempt only)."""
        state = checkpoint.get(RUN_RECORD_KEY)
        if state is not None:
            self.record.load_state_dict(state, int(checkpoint["global_step"]))
            self.nonfinite.load_state_dict(state["nonfinite"])

    def on_train_start(self) -> None:
        self.record.start_attempt()

    @property
    def grad_norms(self) -> list[float]:
        """The global gradient norm (before clipping) of every optimizer step of the run."""
        return self.record.grad_norms

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """A micro-batch, or a step's list of them, moved with ``non_blocking`` copies on CUDA (from the pinned
        memory ``loader.pin_memory=true`` gives); Lightning's own move would copy them blocking."""
        non_blocking = device.type == "cuda"
        if isinstance(batch, PackedBatch):
            return batch.to(device, non_blocking=non_blocking)
        if isinstance(batch, list) and all(isinstance(b, PackedBatch) for b in batch):
            return [b.to(device, non_blocking=non_blocking) for b in batch]
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def log_step(self, loss: float, totals: list[float], grad_norm: float) -> None:
        """Record and log one optimizer step; ``totals``: the step's global tokens, samples, tiles, FLOPs;
        ``grad_norm``: the global L2 norm of the step's gradients before clipping."""
        sched = self.lr_schedulers()
        lr = self.optim.lr * sched.lr_lambdas[0](sched.last_epoch)  # the LLM's rate now, the same on every rank
        metrics = self.meter.finish_step(loss, totals, lr, self.trainer.world_size, grad_norm)
        metrics["train/skipped_steps"] = float(self.nonfinite.skipped)
        metrics.update(self._balance_metrics())
        self.record.add_step(loss, grad_norm, metrics)
        # every value is global (reduced or broadcast), so every rank logs it for its callbacks
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False)
        self.log("loss", loss, on_step=True, prog_bar=True, logger=False)

    def _balance_metrics(self) -> dict[str, float]:
        """This step's spread of tiles and tokens over DP ranks, from the sampler's arrangement."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if getattr(datamodule, "sampler", None) is None:
            return {}
        items = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return datamodule.step_balance(items)

    def optimizer_shard_group(self) -> dist.ProcessGroup | None:
        """The group the optimizer state is partitioned over (ZeRO 1), or None to keep it whole."""
        return None

    def configure_optimizers(self) -> dict[str, Any]:
        # a pipeline rank holds only its stages, which may all be frozen (LoRA on the LLM, vision stages)
        pipelined = isinstance(self.trainer.strategy, OmniBalStrategy)
        opt, sched = build_optimizer(self.named_trainable_parameters(), self.optim, self.model_cfg.sparsify,
                                     self.trainer.estimated_stepping_batches, self.optimizer_shard_group(),
                                     allow_frozen=pipelined)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_validation_epoch_end(self) -> None:
        """The pass's global metrics: the sums of every rank (ranks without a last stage add zeros)."""
        metrics = self.validation.finish(lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"), self.device)
        self.log_dict(metrics, prog_bar=True)  # global values (reduced), the same on every rank


class OmniBalModule(VLMTrainingModule):
    """Data-parallel training: one micro-batch per ``training_step``, Lightning's accumulation over the
    step's ``micro_batches`` and DDP's gradient average, normalised as the module docstring says."""

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        return self.model(batch)

    def training_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor:
        self.meter.account(batch)
        objective = micro_batch_objective(self.model(batch), batch, self.model_cfg)
        self.meter.add_loss(objective)
        return objective.value / LOSS_SCALE

    def validation_step(self, batch: PackedBatch, batch_idx: int) -> None:
        self.validation.add(self.model(batch), batch)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """An adapter checkpoint's trained parameters over this module's frozen ones (built as the saving run
        built them); a checkpoint lacking a trained parameter is an error, not a silent fresh adapter."""
        super().on_load_checkpoint(checkpoint)
        if not self.model_cfg.adapter.enabled:
            return
        saved = checkpoint["state_dict"]
        missing = sorted(f"model.{n}" for n in trainable_state_dict(self.model) if f"model.{n}" not in saved)
        if missing:
            raise ConfigError(f"checkpoint lacks trained parameters {missing[:6]}{' ...' if len(missing) > 6 else ''}; "
                              "it was saved without this adapter config (model.adapter)")
        checkpoint["state_dict"] = {**self.state_dict(), **saved}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        reduced = self.trainer.strategy.reduce(self.meter.local_totals(self.device), reduce_op="sum")
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        # the step's one host sync (allowed: once per optimizer step); gradients are equal on every DP rank
        *totals, unscaled_norm = torch.cat([reduced, norm.to(reduced)[None]]).tolist()
        total_weight = max(totals[1], 1e-12)
        scale = LOSS_SCALE * self.trainer.accumulate_grad_batches * self.trainer.world_size / total_weight
        loss, grad_norm = totals[0] / total_weight, unscaled_norm * scale
        # both global (reduced; gradients equal on every DP rank): every rank decides alike
        if self.nonfinite.admit(loss, grad_norm, self.global_step, self.meter.step_sample_ids):
            for g in grads:
                g.mul_(scale)
        else:
            for p in self.model.parameters():
                p.grad = None  # the optimizer skips parameters without a gradient: no update, no moment change
        self.log_step(loss, totals[2:], grad_norm)
