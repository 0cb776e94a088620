"""The whole vision-language model as an ordered sequence of blocks.

Blocks, in order (see :mod:`omnibal_pl.model.block` for the calling convention):

============================  ===========================  ==================================
name                          x in                         out
============================  ===========================  ==================================
``vision.embed``              pixel_values [T, 3, H, W]    [T, P, width_v]
``vision.blocks.<i>``         [T, P, width_v]              [T, P, width_v]
``projector``                 [T, P, width_v]              [T, tokens_per_tile, hidden]
``llm.embed``                 [T, tokens_per_tile, hidden] [1, L, hidden] (image features in)
``llm.layers.<i>``            [1, L, hidden]               [1, L, hidden]
``llm.head``                  [1, L, hidden]               logits [1, L, vocab]
============================  ===========================  ==================================

A pipeline stage is a contiguous run of these blocks; only ``x`` crosses a stage boundary. Stage-local
models are made by deleting blocks (``del vlm.llm.layers["3"]`` or setting ``vlm.projector = None``):
parameter names never change, so checkpoints can be re-partitioned.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
from torch import nn

from omnibal_pl.batch import PackedBatch
from omnibal_pl.errors import ConfigError
from omnibal_pl.model.block import TransformerBlock
from omnibal_pl.model.config import VLMConfig
from omnibal_pl.model.llm import LanguageModel
from omnibal_pl.model.lora import apply_lora
from omnibal_pl.model.norms import RMSNorm
from omnibal_pl.model.projector import Projector
from omnibal_pl.model.qwen_vision import PatchMerger, QwenVisionEncoder
from omnibal_pl.model.sparsify import SparsifyConfig
from omnibal_pl.model.vision import VisionEncoder


class VLM(nn.Module):
    """Vision encoder -> projector -> LLM, built from a :class:`VLMConfig`."""

    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.vision.family == "vit":
            self.vision: nn.Module = VisionEncoder(cfg.vision)
            self.projector: nn.Module = Projector(cfg)
        else:  # Qwen2-VL / Qwen2.5-VL: dynamic-resolution patches, merged 2x2 into LLM tokens
            self.vision = QwenVisionEncoder(cfg.vision, cfg.attention_backend)
            self.projector = PatchMerger(cfg)
        self.llm = LanguageModel(cfg)
        self.init_weights()
        if cfg.adapter.enabled:  # after the base init: a seed gives the same base weights with or without LoRA
            apply_lora(self, cfg.adapter)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The present blocks in execution order, with their stable names."""
        out: list[tuple[str, nn.Module]] = []
        if self.vision is not None:
            if self.vision.embed is not None:
                out.append(("vision.embed", self.vision.embed))
            out += [(f"vision.blocks.{i}", b) for i, b in self.vision.blocks.items()]
        if self.projector is not None:
            out.append(("projector", self.projector))
        if self.llm is not None:
            if self.llm.embed is not None:
                out.append(("llm.embed", self.llm.embed))
            out += [(f"llm.layers.{i}", b) for i, b in self.llm.layers.items()]
            if self.llm.head is not None:
                out.append(("llm.head", self.llm.head))
        return out

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Logits [1, L, vocab] of the whole model (every block present, in order)."""
        x = batch.pixel_values
        for _, block in self.blocks():
            x = block(x, batch)
        return x

    def enable_sparsify(self, sparsify: SparsifyConfig) -> None:
        """Turn Dynamic-LLaVA sparsification on for a built (e.g. checkpoint-loaded) model: fresh predictors
        on layer ``sparsify.sparse_layer`` (same device and dtype), masked layers from it on."""
        if self.cfg.sparsify.enabled:
            raise ConfigError("enable_sparsify: sparsification is already on; build the model from a config instead")
        if not sparsify.enabled:
            raise ConfigError("enable_sparsify: the given SparsifyConfig has enabled: false")
        self.cfg = dataclasses.replace(self.cfg, sparsify=sparsify)
        self.llm.install_sparsifier(self.cfg)

    def set_recompute(self, mode: str, names: Iterable[str] | None = None) -> None:
        """Set ``recompute`` to ``mode`` on the named transformer blocks (all of them when ``names`` is None)."""
        blocks = {n: b for n, b in self.blocks() if isinstance(b, TransformerBlock)}
        names = list(blocks) if names is None else list(names)
        unknown = [n for n in names if n not in blocks]
        if unknown:
            raise ConfigError(
                f"recompute: {unknown} are not transformer blocks of this model; "
                f"valid names look like 'vision.blocks.0' or 'llm.layers.0' (present: {len(blocks)} blocks)"
            )
        for n in names:
            blocks[n].recompute = mode

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Fresh training init: normal(0, std) matrices and embeddings, zero biases, unit norms and scales."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.reset_parameters()
        for name, p in self.named_parameters():
            if name.endswith((".ls1", ".ls2")):
                nn.init.ones_(p)
            elif name.endswith((".cls", ".pos")):
                nn.init.normal_(p, std=std)
