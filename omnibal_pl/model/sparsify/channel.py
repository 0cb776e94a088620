"""The keep mask as one extra channel of the activations between LLM blocks (and pipeline stages).

From layer ``sparse_layer`` on, ``llm.layers.<i>`` outputs ``[1, L, hidden + 1]`` and ``llm.head``
outputs ``[1, L, vocab + 1]``: the last channel is the keep mask (0/1 values with straight-through
gradients). :func:`split_output` takes it off the model's output; :func:`boundary_width` gives the
width of the tensor leaving each block.
"""
from __future__ import annotations

import torch

from omnibal_pl.errors import ConfigError
from omnibal_pl.model.sparsify.config import SparsifyConfig


def split_output(out: torch.Tensor, cfg: SparsifyConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's output -> (logits [1, L, vocab], keep mask [1, L] or None when sparsification is off)."""
    if not cfg.enabled:
        return out, None
    return out[..., :-1], out[..., -1]


def boundary_width(name: str, hidden: int, vocab_size: int, cfg: SparsifyConfig) -> int:
    """Last-dim width of the tensor leaving block ``name`` of the LLM (``llm.embed``, ``llm.layers.<i>``,
    ``llm.head``): +1 channel (the keep mask) from layer ``sparse_layer`` on when enabled."""
    extra = int(cfg.enabled)
    if name == "llm.head":
        return vocab_size + extra
    if name.startswith("llm.layers."):
        return hidden + (extra if int(name.rsplit(".", 1)[1]) >= cfg.sparse_layer else 0)
    if name == "llm.embed":
        return hidden
    raise ConfigError(f"boundary_width: {name!r} is not an LLM block (llm.embed, llm.layers.<i>, llm.head)")
