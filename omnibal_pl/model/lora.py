"""LoRA: low-rank adapters on chosen linear layers, the rest of the model frozen (``model/adapter=lora``).

A targeted ``nn.Linear`` becomes a :class:`LoRALinear`: the same module (``weight`` and ``bias`` keep
their names and stay frozen) plus two trainable matrices, ``lora_a`` [r, in] and ``lora_b`` [out, r], so

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T.

``lora_b`` starts at zero: the adapted model starts exactly as the base model.

Why our own layer and not PEFT's: PEFT moves a wrapped layer's weight to ``<name>.base_layer.weight``
and its adapters to ``<name>.lora_A.default.weight``. Everything here is keyed by the model's own
parameter names: the Hugging Face mapping (:mod:`omnibal_pl.model.hf_loading`), pipeline stages built on
the meta device and filled by name (:mod:`omnibal_pl.parallel.stage`), distributed checkpoints of any
layout, the plan's block check. With this layer the base names do not change, and because the adapters are
installed by ``VLM(cfg)`` itself, every way of building the model (one process, each pipeline stage,
FSDP2-sharded stages) gets them without a wrapping step.

:func:`merge_lora` folds the updates into the base weights (for export: afterwards the model is a plain
:class:`~omnibal_pl.model.VLM` with the base names); :func:`trainable_state_dict` is what a LoRA checkpoint
holds.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math

import torch
import torch.nn.functional as F
from torch import nn

from omnibal_pl.errors import ConfigError
from omnibal_pl.model.config import AdapterConfig

ADAPTER_PARAMS = ("lora_a", "lora_b")


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus the low-rank update (see the module docstring); ``scale`` = alpha / r."""

    def __init__(self, in_features: int, out_features: int, bias: bool, r: int, scale: float, dropout: float,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.scale = scale
        self.lora_a = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_adapter()

    @classmethod
    def wrap(cls, linear: nn.Linear, r: int, scale: float, dropout: float) -> "LoRALinear":
        """A :class:`LoRALinear` sharing ``linear``'s weight and bias (same tensors, frozen), adapters fresh."""
        w = linear.weight
        with torch.device("meta"):  # no second copy of the weight is ever allocated
            new = cls(linear.in_features, linear.out_features, linear.bias is not None, r, scale, dropout, dtype=w.dtype)
        new.weight, new.bias = linear.weight, linear.bias
        new.lora_a = nn.Parameter(torch.empty(r, linear.in_features, device=w.device, dtype=w.dtype))
        new.lora_b = nn.Parameter(torch.empty(linear.out_features, r, device=w.device, dtype=w.dtype))
        new.reset_adapter()
        return new

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """A as ``nn.Linear`` initialises its weight (Kaiming-uniform), B = 0: the update starts at zero."""
        if self.lora_a.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
            nn.init.zeros_(self.lora_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)
        return F.linear(x, self.weight, self.bias) + self.scale * update

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` whose weight is ``W + scale * B A`` (computed in float32), bias shared."""
        delta = self.scale * (self.lora_b.float() @ self.lora_a.float())
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        out.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype), requires_grad=False)
        out.bias = self.bias
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.lora_a.shape[0]}, scale={self.scale:g}"


def is_adapter_param(name: str) -> bool:
    """Whether a parameter name is a LoRA matrix (``...lora_a`` / ``...lora_b``)."""
    return name.rsplit(".", 1)[-1] in ADAPTER_PARAMS


def _matching(names: list[str], patterns: list[str]) -> dict[str, list[str]]:
    return {p: [n for n in names if fnmatch.fnmatchcase(n, p)] for p in patterns}


def apply_lora(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Put adapters on the linear layers ``cfg.targets`` names; freeze every parameter except the adapters,
    those ``cfg.trainable`` names and Dynamic-LLaVA's predictors (``.sparsifier.``: new, they have nothing to
    keep). Returns the adapted module names. Raises :class:`ConfigError` for a pattern that matches nothing
    (a typo would otherwise train nothing there, silently)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)]
    hits = _matching(linears, cfg.targets)
    empty = [p for p, found in hits.items() if not found]
    if empty:
        raise ConfigError(f"adapter.targets {empty} match no linear layer; names look like 'llm.layers.0.attn.q', "
                          f"'llm.layers.0.mlp.gate', 'vision.blocks.0.attn.qkv' (this model has {len(linears)})")
    targets = sorted({n for found in hits.values() for n in found})
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear.wrap(getattr(parent, child), cfg.r, cfg.scale, cfg.dropout))
    params = [n for n, _ in model.named_parameters()]
    empty = [p for p, found in _matching(params, cfg.trainable).items() if not found]
    if empty:
        raise ConfigError(f"adapter.trainable {empty} match no parameter; names look like 'projector.*' or "
                          f"'llm.head.*'")
    keep = {n for found in _matching(params, cfg.trainable).values() for n in found} | {n for n in params if ".sparsifier." in n}
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_param(name) or name in keep)
    return targets


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place: each :class:`LoRALinear` becomes a plain
    ``nn.Linear`` with ``W + (alpha / r) B A`` under the same name, and a model config's ``adapter`` is set
    to ``none``. The result computes what the adapted model computes (eval mode, up to rounding) and has
    exactly the base model's parameter names, so :func:`~omnibal_pl.model.hf_loading.to_hf_state_dict`
    exports it. Every parameter is left frozen. Returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.merged())
    cfg = getattr(model, "cfg", None)
    if cfg is not None and dataclasses.is_dataclass(cfg) and hasattr(cfg, "adapter"):
        model.cfg = dataclasses.replace(cfg, adapter=AdapterConfig())
    return model


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (``requires_grad``), by name: what a LoRA checkpoint holds."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
