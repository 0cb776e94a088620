"""Qwen2-VL / Qwen2.5-VL image preprocessing: one image -> its patch rows and its (t, h, w) patch grid.

As Qwen's image processor does it: the image is resized (PIL's bicubic on 8-bit RGB,
:mod:`~omnibal_pl.data.resample`) to the size of :func:`~omnibal_pl.image_grid.resized_size` (sides multiples
of one merge block, pixels within ``[min_pixels, max_pixels]``), scaled to [0, 1] and normalised (Qwen: the
OpenAI CLIP mean and std); the still image is repeated to ``TEMPORAL_PATCH`` frames; each ``patch x patch``
patch becomes one row of ``3 * TEMPORAL_PATCH * patch * patch`` values (channel, frame, row, column), the
``SPATIAL_MERGE^2`` patches of a merge block consecutive, blocks row-major (the layout
:mod:`omnibal_pl.qwen_batch` describes).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from omnibal_pl.data.resample import resize_rgb
from omnibal_pl.image_grid import resized_size
from omnibal_pl.qwen_batch import Grid

SPATIAL_MERGE = 2  # patches per merge-block side: one merge block = one LLM token (every Qwen2/2.5-VL model)
TEMPORAL_PATCH = 2  # frames per patch; a still image is its frame twice


def patch_dim(patch: int) -> int:
    """Values per patch row: 3 channels x ``TEMPORAL_PATCH`` frames x ``patch`` x ``patch`` px."""
    return 3 * TEMPORAL_PATCH * patch * patch


def qwen_patches(image: Image.Image, patch: int, min_pixels: int, max_pixels: int, mean: Sequence[float],
                 std: Sequence[float], resizer: str) -> tuple[torch.Tensor, Grid]:
    """Patch rows float32 [h * w, patch_dim(patch)] of ``image`` and its grid (1, h, w) in ``patch`` px patches,
    normalised per channel with ``mean`` and ``std``; ``resizer``: :func:`~omnibal_pl.data.resample.resize_rgb`'s."""
    height, width = resized_size(image.height, image.width, patch * SPATIAL_MERGE, min_pixels, max_pixels)
    resized = resize_rgb(image.convert("RGB"), width, height, resizer)  # [3, H, W]
    x = resized.permute(1, 2, 0).numpy().astype(np.float32) / 255.0  # [H, W, 3]
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    gh, gw, m = height // patch, width // patch, SPATIAL_MERGE
    x = x.reshape(gh // m, m, patch, gw // m, m, patch, 3)  # block row, row in block, px row, block col, col, px col, c
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # blocks row-major, patches in a block, then channel, px row, px col
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], TEMPORAL_PATCH, patch, patch))
    return torch.from_numpy(np.ascontiguousarray(x).reshape(gh * gw, patch_dim(patch))), (1, gh, gw)
