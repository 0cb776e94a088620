"""Multimodal rotary positions (Qwen2-VL's M-RoPE): position ids (:mod:`omnibal_pl.qwen_batch`, where the data
pipeline builds them) and the rotation angles.

A token has three positions: temporal, height, width. Text tokens have the same value in all three
(consecutive, as in 1-D RoPE); the ``(h / m) * (w / m)`` tokens of an image (``m`` = spatial merge) sit
at ``(start, start + row, start + column)``, and the text after the image continues from
``start + max(h, w) / m``. The rotary frequencies are split into three sections: the first follows the
temporal position, the next the height, the last the width.

Packing: every sample's positions start at 0, as the 1-D ``position_ids`` of :class:`PackedBatch` do.
"""
from __future__ import annotations

from typing import Sequence

import torch

from omnibal_pl.qwen_batch import Grid, mrope_position_ids

__all__ = ["Grid", "mrope_cos_sin", "mrope_position_ids"]


def mrope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, section: Sequence[int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, head_dim] (float32) for positions [3, L]: frequency ``k`` of the ``head_dim / 2`` follows
    axis ``a`` when it lies in ``section[a]``; halves laid out as in HF's ``rotate_half``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids.float()[:, :, None] * inv_freq  # [3, L, head_dim / 2]
    angles = torch.cat([chunk[axis] for axis, chunk in enumerate(angles.split(list(section), dim=-1))], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()
