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
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from omnibal_pl.balance.metrics import dist_ratio
from omnibal_pl.data.batch import PackedBatch
from omnibal_pl.errors import ConfigError
from omnibal_pl.model import VLM, VLMConfig, load_hf_weights
from omnibal_pl.model.flops import train_flops
from omnibal_pl.model.sparsify import keep_rate_loss, split_output

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


def param_groups(model: nn.Module, optim: OptimConfig, predictor_lr: float, predictor_weight_decay: float) -> list[dict]:
    """AdamW groups keyed by (part, decay); freezes the parts in ``optim.freeze``."""
    lrs = {"vision": optim.vision_lr or optim.lr, "projector": optim.projector_lr or optim.lr, "llm": optim.lr,
           "predictors": predictor_lr}
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
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


def packed_loss_sum(logits: torch.Tensor, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_t w_t * CE_t, sum_t w_t) over next-token predictions of a packed micro-batch.

    Labels are aligned with ``input_ids``; position t predicts label t + 1. Every sample starts with an
    unsupervised token, so no prediction crosses a sample boundary.
    """
    labels = batch.labels[:, 1:]
    weights = batch.loss_weight[:, 1:].float() * (labels != IGNORE_INDEX)
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
        self.save_hyperparameters({"model": self.model_cfg.to_dict(), "optim": vars(self.optim),
                                   "peak_tflops": peak_tflops, "seed": seed, "init_from": init_from})
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.model = VLM(self.model_cfg)
        if init_from is not None:
            load_hf_weights(self.model, init_from)
        self._step = {"loss": 0.0, "weight": 0.0, "tokens": 0, "samples": 0, "tiles": 0, "flops": 0.0, "aux": 0.0}
        self._step_start: float | None = None
        self.losses: list[float] = []  # global loss of every optimizer step of this process's fit

    # ------------------------------------------------------------------ training
    def forward(self, batch: PackedBatch) -> torch.Tensor:
        return self.model(batch)

    def training_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor:
        if self._step_start is None:
            self._step_start = time.perf_counter()
        out = self.model(batch)
        logits, keep = split_output(out, self.model_cfg.sparsify)
        loss_sum, weight = packed_loss_sum(logits, batch)
        loss = loss_sum / LOSS_SCALE
        if keep is not None:
            # The keep-rate penalty is per micro-batch; weighting it by the micro-batch's share of the
            # step's supervised weight (~ weight / W) makes the step-end scaling by 1 / W cancel out.
            aux = keep_rate_loss(keep, batch, self.model_cfg.sparsify, self.model_cfg.image_context_id)
            loss = loss + aux.loss * weight.detach() / LOSS_SCALE
            self._step["aux"] += float(aux.loss.detach())
        seqlens = torch.diff(batch.cu_seqlens).tolist()
        s = self._step
        s["loss"] += float(loss_sum.detach())
        s["weight"] += float(weight.detach())
        s["tokens"] += batch.num_tokens
        s["samples"] += batch.num_samples
        s["tiles"] += batch.num_tiles
        s["flops"] += train_flops(self.model_cfg, int(batch.pixel_values.shape[0]), seqlens)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        s = self._step
        stats = torch.tensor([s["loss"], s["weight"], s["tokens"], s["samples"], s["tiles"], s["flops"]],
                             dtype=torch.float64, device=self.device)
        stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        total_weight = float(stats[1])
        dp = self.trainer.world_size
        accumulate = self.trainer.accumulate_grad_batches
        scale = LOSS_SCALE * accumulate * dp / max(total_weight, 1e-12)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        loss = float(stats[0]) / max(total_weight, 1e-12)
        self.losses.append(loss)
        now = time.perf_counter()
        seconds = max(now - (self._step_start or now), 1e-9)
        metrics = {"train/loss": loss, "train/tokens_per_s": float(stats[2]) / seconds,
                   "train/samples_per_s": float(stats[3]) / seconds, "train/tiles_per_s": float(stats[4]) / seconds,
                   "train/step_s": seconds, "train/lr": optimizer.param_groups[-1]["lr"]}
        if self.peak_tflops:
            metrics["train/mfu"] = float(stats[5]) / seconds / (self.peak_tflops * 1e12 * dp)
        if s["aux"]:
            metrics["train/keep_rate_loss"] = s["aux"] / accumulate
        metrics.update(self._balance_metrics())
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, rank_zero_only=True)
        self.log("loss", loss, on_step=True, prog_bar=True, logger=False, rank_zero_only=True)
        self._step = {k: 0.0 if isinstance(v, float) else 0 for k, v in s.items()}
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
        groups = param_groups(self.model, self.optim, sp.predictor_lr, sp.predictor_weight_decay)
        if not groups:
            raise ConfigError("optim.freeze leaves no trainable parameter; unfreeze a part")
        opt = torch.optim.AdamW(groups, betas=tuple(self.optim.betas), eps=self.optim.eps)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.optim.warmup_ratio * total)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, total, warmup, self.optim.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
