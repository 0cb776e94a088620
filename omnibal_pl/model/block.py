"""The calling convention shared by every block, and per-block activation recomputation.

Every block of :meth:`omnibal_pl.model.VLM.blocks` is called as ``block(x, batch) -> Tensor``: ``x``
is the one tensor that crosses a pipeline-stage boundary, ``batch`` the micro-batch's
:class:`~omnibal_pl.batch.PackedBatch` (every stage has it).

Transformer blocks derive from :class:`TransformerBlock` and carry ``recompute``:
``none`` keeps all activations, ``full`` recomputes the whole block in backward
(``torch.utils.checkpoint``, non-reentrant), ``attention`` recomputes only the attention core
(softmax(QK^T)V), the part whose activations grow with sequence length.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from omnibal_pl.batch import PackedBatch
from omnibal_pl.errors import ConfigError

RECOMPUTE_MODES = ("none", "attention", "full")  # from least to most recomputed (the planner indexes them)


class TransformerBlock(nn.Module):
    """Base of vision blocks and decoder layers: subclasses implement :meth:`compute`."""

    def __init__(self) -> None:
        super().__init__()
        self._recompute = "none"

    @property
    def recompute(self) -> str:
        """One of :data:`RECOMPUTE_MODES`."""
        return self._recompute

    @recompute.setter
    def recompute(self, mode: str) -> None:
        if mode not in RECOMPUTE_MODES:
            raise ConfigError(f"recompute mode {mode!r} is unknown; use one of {RECOMPUTE_MODES}")
        self._recompute = mode

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        if self._recompute == "full" and torch.is_grad_enabled():
            return checkpoint(self.compute, x, batch, use_reentrant=False)
        return self.compute(x, batch)

    def compute(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        raise NotImplementedError

    def attention_core(self, fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
        """``fn(*args)``, recomputed in backward when ``recompute == "attention"``."""
        if self._recompute == "attention" and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)
