"""How tiles travel from the loader to the model: normalised float32, or raw 8-bit RGB normalised on the device.

A loader that keeps tiles ``uint8`` moves a quarter of the bytes through worker queues, pinned memory and
the host-to-device copy, and leaves the normalisation to the device, where it costs nothing noticeable.
:func:`normalise` is the one normalisation both sides run (the CPU one for float32 tiles, the model's
vision embedding for ``uint8`` ones), so the two give the same float32 values.
"""
from __future__ import annotations

from typing import Sequence

import torch

PixelNorm = tuple[tuple[float, float, float], tuple[float, float, float]]  # (mean, std) per RGB channel, in [0, 1] units


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """float32 ``(pixels / 255 - mean) / std`` of ``uint8`` tiles ``[..., 3, H, W]``, on their device, computed as
    one multiply-add ``pixels * (1 / (255 std)) + (-mean / std)`` (within an ulp of the three-step form)."""
    shape = (3, 1, 1)
    m = torch.tensor(mean, dtype=torch.float64).view(shape)
    s = torch.tensor(std, dtype=torch.float64).view(shape)
    scale, shift = (1.0 / (255.0 * s)).float().to(pixels.device), (-m / s).float().to(pixels.device)
    return torch.addcmul(shift, pixels.to(torch.float32), scale)
