"""How tiles travel from the loader to the model: normalised float32, or raw 8-bit RGB normalised on the device.

A loader that keeps tiles ``uint8`` moves a quarter of the bytes through worker queues, pinned memory and
the host-to-device copy, and leaves the normalisation to the device, where it costs nothing noticeable.
:func:`normalise` is the one normalisation both sides run (the CPU one for float32 tiles, the model's
vision embedding for ``uint8`` ones), so the two give the same float32 values.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

PixelNorm = tuple[tuple[float, float, float], tuple[float, float, float]]  # (mean, std) per RGB channel, in [0, 1] units


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """float32 ``(pixels / 255 - mean) / std`` of ``uint8`` tiles ``[..., 3, H, W]``, on their device, computed as
    one multiply-add ``pixels * (1 / (255 std)) + (-mean / std)`` (within an ulp of the three-step form)."""
    scale, shift = _scale_shift(tuple(map(float, mean)), tuple(map(float, std)), pixels.device)
    return torch.addcmul(shift, pixels.to(torch.float32), scale)


@functools.lru_cache(maxsize=32)
def _scale_shift(mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The [3, 1, 1] float32 factors of :func:`normalise` on ``device``, built once per norm and device (building
    them copies two tensors to the device on every micro-batch)."""
    m = torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
    return (1.0 / (255.0 * s)).float().to(device), (-m / s).float().to(device)
