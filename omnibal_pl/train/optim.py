"""The optimizer of a run: AdamW parameter groups per model part and the warmup + cosine schedule.

Parts: ``vision``, ``projector``, ``llm`` and Dynamic-LLaVA's ``predictors``, each with its own learning
rate; no weight decay on norms, biases, layer scales and embeddings; frozen parts get
``requires_grad = False`` and no group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from omnibal_pl.errors import ConfigError
from omnibal_pl.model.sparsify import SparsifyConfig

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


def build_optimizer(named: Iterable[tuple[str, nn.Parameter]], optim: OptimConfig, sparsify: SparsifyConfig,
                    total_steps: int, shard_group: dist.ProcessGroup | None = None, allow_frozen: bool = False
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``named`` (model names, each parameter once) and its per-step warmup + cosine schedule
    over ``total_steps`` optimizer steps. With ``shard_group`` (ZeRO 1) the AdamW state is partitioned over
    that group by ``ZeroRedundancyOptimizer``: each rank updates its parameters and broadcasts them.

    ``named`` without a trainable parameter is an error, unless ``allow_frozen`` (a pipeline rank whose stages
    are all frozen, e.g. the vision stages under LoRA on the LLM): then the optimizer has one empty group."""
    groups = param_groups(named, optim, sparsify.predictor_lr, sparsify.predictor_weight_decay)
    if not groups and allow_frozen:
        groups = [{"name": "frozen", "params": [], "lr": optim.lr, "weight_decay": 0.0}]
    if not groups:
        raise ConfigError("optim.freeze (or model.adapter) leaves no trainable parameter; unfreeze a part")
    if shard_group is None:
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, betas=tuple(optim.betas), eps=optim.eps)
    else:
        opt = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, process_group=shard_group,
                                      betas=tuple(optim.betas), eps=optim.eps)
    total = max(1, int(total_steps))
    warmup = int(optim.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, total, warmup, optim.min_lr_ratio))
    return opt, sched
