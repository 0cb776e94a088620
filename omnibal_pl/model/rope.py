"""Multimodal rotary positions (Qwen2-VL's M-RoPE): position ids and the rotation angles.

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

Grid = tuple[int, int, int]  # (t, h, w) in patches, as Qwen's image processor reports ``image_grid_thw``


def mrope_position_ids(input_ids: torch.Tensor, grids: Sequence[Grid], image_token_id: int,
                       spatial_merge: int) -> torch.Tensor:
    """M-RoPE positions [3, n] of one sample's ``input_ids`` [n], whose images (``grids``, in order) each
    occupy ``t * h * w / spatial_merge**2`` consecutive ``image_token_id`` tokens.

    Raises ``ValueError`` when the image tokens do not match the grids.
    """
    ids = input_ids.tolist()
    out: list[torch.Tensor] = []
    pos, i, images = 0, 0, iter(grids)
    while i < len(ids):
        if ids[i] != image_token_id:
            j = i
            while j < len(ids) and ids[j] != image_token_id:
                j += 1
            out.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos, i = pos + j - i, j
            continue
        t, h, w = next(images, (0, 0, 0))
        gh, gw = h // spatial_merge, w // spatial_merge
        n = t * gh * gw
        if n == 0 or ids[i:i + n] != [image_token_id] * n:
            raise ValueError(f"mrope_position_ids: image tokens at {i} do not match the image grids {list(grids)}")
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        out.append(torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + pos)
        pos, i = pos + max(gh, gw), i + n  # text after an image continues after its largest extent
    if next(images, None) is not None:
        raise ValueError(f"mrope_position_ids: {len(grids)} image grids but fewer images in the tokens")
    return torch.cat(out, dim=1) if out else torch.zeros(3, 0, dtype=torch.long)


def mrope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, section: Sequence[int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, head_dim] (float32) for positions [3, L]: frequency ``k`` of the ``head_dim / 2`` follows
    axis ``a`` when it lies in ``section[a]``; halves laid out as in HF's ``rotate_half``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids.float()[:, :, None] * inv_freq  # [3, L, head_dim / 2]
    angles = torch.cat([chunk[axis] for axis, chunk in enumerate(angles.split(list(section), dim=-1))], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()
