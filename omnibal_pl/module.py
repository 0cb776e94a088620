"""``OmniBalModule``: the LightningModule that trains a :class:`~omnibal_pl.model.VLM` on packed micro-batches.

Loss. Each micro-batch contributes sum_t w_t * CE_t over its supervised tokens (``loss_weight`` from
the packing: token, sample or square weighting). The step's loss is that sum over every micro-batch
of every DP rank, divided by the step's global weight sum W (one all-reduce per optimizer step). So
the loss and the gradients are the same whatever the DP size and the gradient accumulation. Mechanics:
``training_step`` returns sum(w * CE) / ``LOSS_SCALE``; Lightning divides by ``accumulate_grad_batches``
and DDP averages over ranks; ``on_before_optimizer_step`` (before clipping) multiplies the gradients
by ``LOSS_SCALE * accumulate * dp / W``.

Optimiser. AdamW with parameter groups per part (vision, projector, llm, Dynamic-LLaVA predictors),
each with its own learning rate; no weight decay on norms, biases, layer scales and embeddings; frozen
parts get ``requires_grad = False``. Linear warmup then cosine decay to ``min_lr_ratio`` x lr.

Logged every step: ``train/loss``, ``train/lr``, ``train/tokens_per_s``, ``train/samples_per_s``,
``train/tiles_per_s``, ``train/mfu`` (when the device's peak is known), and the sampler's per-step
balance (``balance/vit_dist``, ``balance/llm_dist``: the step's spread over DP ranks).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from omnibal_pl.balance.metrics import dist_ratio
from omnibal_pl.data.batch import PackedBatch
from omnibal_pl.errors import ConfigError, DataError
from omnibal_pl.model import VLM, VLMConfig, load_hf_weights
from omnibal_pl.model.flops import train_flops
from omnibal_pl.model.sparsify import keep_rate_loss, split_output
from omnibal_pl.strategy.pipeline import PipelineRunner

if TYPE_CHECKING:
    from omnibal_pl.strategy.lightning import OmniBalStrategy

IGNORE_INDEX = -100
LOSS_SCALE = 1024.0  # keeps the per-micro-batch loss near 1 before the global normalisation
PARTS = ("vision", "projector", "llm", "predictors")


@dataclass
class OptimConfig:
    """AdamW and schedule. Learning rates per part default to ``lr``; ``freeze`` lists parts to freeze."""

    lr: float = 2e-4
    vision_lr: float | None = None
    projector_lr: float | None = None
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.03  # of the run's optimizer steps
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of each group's lr
    freeze: list[str] = field(default_factory=list)  # any of vision, projector, llm

    def __post_init__(self) -> None:
        bad = [p for p in self.freeze if p not in PARTS[:3]]
        if bad:
            raise ConfigError(f"optim.freeze: {bad} are not parts of the model; choose from {PARTS[:3]}")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("optim.warmup_ratio must be in [0, 1) and optim.min_lr_ratio in [0, 1]")


def part_of(name: str) -> str:
    """Which part a parameter belongs to (``predictors`` for Dynamic-LLaVA's sparsifier)."""
    return "predictors" if ".sparsifier." in name else name.split(".", 1)[0]


def no_decay(name: str, p: nn.Parameter) -> bool:
    """Norm weights, biases, layer scales (all 1-D) and embeddings are not decayed."""
    return p.ndim < 2 or name.startswith("llm.embed") or name.endswith((".cls", ".pos"))


def param_groups(model: nn.Module | Iterable[tuple[str, nn.Parameter]], optim: OptimConfig, predictor_lr: float,
                 predictor_weight_decay: float) -> list[dict]:
    """AdamW groups keyed by (part, decay) over a module's (or given) named parameters; freezes the parts in
    ``optim.freeze``."""
    lrs = {"vision": optim.vision_lr or optim.lr, "projector": optim.projector_lr or optim.lr, "llm": optim.lr,
           "predictors": predictor_lr}
    groups: dict[tuple[str, bool], dict] = {}
    named = model.named_parameters() if isinstance(model, nn.Module) else model
    for name, p in named:
        part = part_of(name)
        if part in optim.freeze:
            p.requires_grad_(False)
            continue
        if not p.requires_grad:
            continue
        decay = not no_decay(name, p)
        wd = (predictor_weight_decay if part == "predictors" else optim.weight_decay) if decay else 0.0
        group = groups.setdefault((part, decay), {"name": f"{part}{'' if decay else '_no_decay'}", "params": [],
                                                  "lr": lrs[part], "weight_decay": wd})
        group["params"].append(p)
    return list(groups.values())


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear 0 -> 1 over ``warmup`` steps, then cosine 1 -> ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def token_weights(batch: PackedBatch) -> torch.Tensor:
    """Per next-token prediction weights [1, L - 1]: the packing's ``loss_weight``, 0 where no loss is taken."""
    labels = batch.labels[:, 1:]
    return batch.loss_weight[:, 1:].float() * (labels != IGNORE_INDEX)


def packed_loss_sum(logits: torch.Tensor, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_t w_t * CE_t, sum_t w_t) over next-token predictions of a packed micro-batch.

    Labels are aligned with ``input_ids``; position t predicts label t + 1. Every sample starts with an
    unsupervised token, so no prediction crosses a sample boundary.
    """
    labels = batch.labels[:, 1:]
    weights = token_weights(batch)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten().clamp(min=0), reduction="none")
    return (ce * weights.flatten()).sum(), weights.sum()


class OmniBalModule(L.LightningModule):
    """Trains a VLM built from ``model`` (a :class:`VLMConfig` or its mapping), randomly initialised from
    ``seed`` or loaded from ``init_from``, a local Hugging Face InternVL-Chat / LLaVA-1.5 checkpoint folder."""

    def __init__(self, model: VLMConfig | dict[str, Any], optim: OptimConfig | None = None,
                 peak_tflops: float | None = None, seed: int = 0, init_from: str | None = None) -> None:
        super().__init__()
        self.model_cfg = model if isinstance(model, VLMConfig) else VLMConfig.from_dict(model)
        self.optim = optim or OptimConfig()
        self.peak_tflops = peak_tflops
        self.seed, self.init_from = seed, init_from
        self.save_hyperparameters({"model": self.model_cfg.to_dict(), "optim": vars(self.optim),
                                   "peak_tflops": peak_tflops, "seed": seed, "init_from": init_from})
        self.model: VLM | None = self._initial_model()
        self._step = self._empty_step()
        self._step_start: float | None = None
        self.losses: list[float] = []  # global loss of every optimizer step of this process's fit

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

    @staticmethod
    def _empty_step() -> dict[str, float]:
        return {"loss": 0.0, "weight": 0.0, "tokens": 0.0, "samples": 0.0, "tiles": 0.0, "flops": 0.0, "aux": 0.0,
                "micro_batches": 0.0}

    # ------------------------------------------------------------------ training
    def forward(self, batch: PackedBatch) -> torch.Tensor:
        return self.model(batch)

    def objective(self, out: torch.Tensor, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(objective, sum_t w_t * CE_t, sum_t w_t) of one micro-batch from the model's output.

        The objective is the weighted CE sum plus, with sparsification, the keep-rate penalty weighted by the
        micro-batch's share of the supervised weight (so the step-end division by the global weight W cancels).
        """
        logits, keep = split_output(out, self.model_cfg.sparsify)
        loss_sum, weight = packed_loss_sum(logits, batch)
        objective = loss_sum
        if keep is not None:
            aux = keep_rate_loss(keep, batch, self.model_cfg.sparsify, self.model_cfg.image_context_id)
            objective = objective + aux.loss * weight.detach()
            self._step["aux"] += float(aux.loss.detach())
        return objective, loss_sum, weight

    def _account(self, batch: PackedBatch) -> None:
        """Add a micro-batch's tokens, samples, tiles and training FLOPs to the step's totals."""
        s = self._step
        if self._step_start is None:
            self._step_start = time.perf_counter()
        s["tokens"] += batch.num_tokens
        s["samples"] += batch.num_samples
        s["tiles"] += batch.num_tiles
        s["flops"] += train_flops(self.model_cfg, int(batch.pixel_values.shape[0]), torch.diff(batch.cu_seqlens).tolist())
        s["micro_batches"] += 1

    def training_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor:
        self._account(batch)
        objective, loss_sum, weight = self.objective(self.model(batch), batch)
        self._step["loss"] += float(loss_sum.detach())
        self._step["weight"] += float(weight.detach())
        return objective / LOSS_SCALE

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        s = self._step
        stats = torch.tensor([s["loss"], s["weight"], s["tokens"], s["samples"], s["tiles"], s["flops"]],
                             dtype=torch.float64, device=self.device)
        stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        total_weight = max(float(stats[1]), 1e-12)
        scale = LOSS_SCALE * self.trainer.accumulate_grad_batches * self.trainer.world_size / total_weight
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        self._log_step(float(stats[0]) / total_weight, stats[2:].tolist(), optimizer)

    def _log_step(self, loss: float, totals: list[float], optimizer: torch.optim.Optimizer) -> None:
        """Record and log one optimizer step; ``totals``: the step's global tokens, samples, tiles, FLOPs."""
        s = self._step
        tokens, samples, tiles, flops = totals
        self.losses.append(loss)
        now = time.perf_counter()
        seconds = max(now - (self._step_start or now), 1e-9)
        sched = self.lr_schedulers()
        lr = self.optim.lr * sched.lr_lambdas[0](sched.last_epoch)  # the LLM's rate now, the same on every rank
        metrics = {"train/loss": loss, "train/tokens_per_s": tokens / seconds, "train/samples_per_s": samples / seconds,
                   "train/tiles_per_s": tiles / seconds, "train/step_s": seconds, "train/lr": lr}
        if self.peak_tflops:
            metrics["train/mfu"] = flops / seconds / (self.peak_tflops * 1e12 * self.trainer.world_size)
        if s["aux"]:
            metrics["train/keep_rate_loss"] = s["aux"] / max(s["micro_batches"], 1)
        metrics.update(self._balance_metrics())
        # every value is global (reduced or broadcast), so every rank logs it for its callbacks
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False)
        self.log("loss", loss, on_step=True, prog_bar=True, logger=False)
        self._step = self._empty_step()
        self._step_start = None

    def _balance_metrics(self) -> dict[str, float]:
        """This step's spread of tiles and tokens over DP ranks, from the sampler's plan (known to all ranks)."""
        sampler = getattr(getattr(self.trainer, "datamodule", None), "sampler", None)
        if sampler is None:
            return {}
        plan = sampler.plan()
        step = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed // sampler.cfg.micro_batches - 1
        if not 0 <= step < plan.steps.num_steps:
            return {}
        vit, tokens = plan.step_loads(step)
        return {"balance/vit_dist": dist_ratio(vit[None]), "balance/llm_dist": dist_ratio(tokens[None])}

    def configure_optimizers(self) -> dict[str, Any]:
        sp = self.model_cfg.sparsify
        groups = param_groups(self.named_trainable_parameters(), self.optim, sp.predictor_lr, sp.predictor_weight_decay)
        if not groups:
            raise ConfigError("optim.freeze leaves no trainable parameter; unfreeze a part")
        opt = torch.optim.AdamW(groups, betas=tuple(self.optim.betas), eps=self.optim.eps)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.optim.warmup_ratio * total)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, total, warmup, self.optim.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class OmniBalPipelineModule(OmniBalModule):
    """:class:`OmniBalModule` trained by :class:`~omnibal_pl.strategy.OmniBalStrategy`: pipeline stages x DP.

    The Trainer runs with ``accumulate_grad_batches = micro_batches``, so one optimizer step still spans
    ``micro_batches`` loader batches (the sampler's per-rank micro-batches) and the step counts, logging,
    schedule and checkpoint positions are the non-pipeline module's. ``training_step`` collects the step's
    micro-batches and, on the last one, runs the pipeline schedule's forward and backward over all of them
    (returning a zero placeholder before): gradients are zeroed right before the schedule runs (Lightning's zero_grad is
    a no-op here) and the strategy skips Lightning's backward. The loss and gradients equal the
    non-pipeline module's: each micro-batch's objective is multiplied by ``m x dp / W`` (W: the step's
    global supervised weight, one all-reduce over "dp" before the schedule), and the runner's mean over
    ``m`` micro-batches and ``dp`` replicas leaves sum(objective) / W. Clipping uses the norm over all stages.

    Only this rank's stages exist (``configure_model``, called by the Trainer once processes are up).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runner: PipelineRunner | None = None
        self.stages: nn.ModuleList | None = None
        self._pending: list[PackedBatch] = []
        self._loss_scale = 1.0  # m x dp / W of the running step
        self._step_loss = 0.0
        self._totals = [0.0] * 4  # the running step's global tokens, samples, tiles, FLOPs

    def _initial_model(self) -> None:
        return None  # the stages come from the strategy in configure_model

    def _strategy(self) -> "OmniBalStrategy":
        from omnibal_pl.strategy.lightning import OmniBalStrategy

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

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        raise ConfigError("a pipelined model has no single-process forward: each rank holds only its stages; "
                          "gather a checkpoint into one VLM to run it whole")

    def _micro_batch_loss(self, out: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        return self.objective(out, batch)[0] * self._loss_scale

    def training_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor:
        self._account(batch)
        self._pending.append(batch)
        if len(self._pending) < self.runner.num_micro_batches:
            return torch.zeros((), device=self.device)  # nothing ran yet (Lightning needs a tensor in DDP-like runs)
        batches, self._pending = self._pending, []
        s = self._step
        weight = sum(float(token_weights(b).sum()) for b in batches)
        totals = torch.tensor([weight, s["tokens"], s["samples"], s["tiles"], s["flops"]], dtype=torch.float64)
        dist.all_reduce(totals, group=self.runner.dp_group)  # the ranks of one pipeline hold the same batches
        dp = dist.get_world_size(self.runner.dp_group)
        self._loss_scale = len(batches) * dp / max(float(totals[0]), 1e-12)
        self._totals = totals[1:].tolist()
        for p in self.runner.parameters():
            p.grad = None
        loss = self.runner.train_step(batches)
        self._step_loss = float(loss)
        return loss

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        pass  # training_step zeroes the gradients right before the schedule runs

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        if gradient_clip_val:
            if gradient_clip_algorithm not in (None, "norm"):
                raise ConfigError(f"pipeline training clips by global norm only, not {gradient_clip_algorithm!r}")
            self.runner.clip_grad_norm_(float(gradient_clip_val))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._log_step(self._step_loss, self._totals, optimizer)

    def on_train_epoch_end(self) -> None:
        if self._pending:
            raise DataError(f"the epoch ended {len(self._pending)} micro-batches into a step of "
                            f"{self.runner.num_micro_batches}: the sampler must yield whole steps")
