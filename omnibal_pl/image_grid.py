"""Qwen2-VL / Qwen2.5-VL dynamic resolution: the patch grid and LLM token count of an image from its size.

Qwen's image processor resizes each image to sides that are multiples of ``patch * merge`` (28 px),
keeping the aspect ratio as closely as it can, with the pixel count inside ``[min_pixels, max_pixels]``;
the image then has ``(h / 14) x (w / 14)`` patches and ``(h / 28) x (w / 28)`` LLM tokens. Standard library
only (floor 0): the statistics (from image headers), the balance and the model all compute the same counts.
"""
from __future__ import annotations

import math

from omnibal_pl.errors import DataError

MIN_PIXELS = 56 * 56  # Qwen's processor defaults
MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT = 200


def resized_size(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) in px after Qwen's resize rule (``smart_resize``): multiples of ``factor``, nearest
    to the original (Python's round half to even, as Qwen), scaled into ``[min_pixels, max_pixels]``.

    Raises :class:`DataError` for an empty image or one more than 200 times longer than wide (Qwen refuses it).
    """
    if height < 1 or width < 1:
        raise DataError(f"image of {width} x {height} px has no pixels")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise DataError(f"image of {width} x {height} px: aspect ratio {max(height, width) / min(height, width):.0f} "
                        f"exceeds Qwen's limit of {MAX_ASPECT}; crop or drop it")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def image_grid(height: int, width: int, patch_size: int = 14, spatial_merge: int = 2, min_pixels: int = MIN_PIXELS,
               max_pixels: int = MAX_PIXELS) -> tuple[int, int, int]:
    """The (t, h, w) patch grid of a still image of ``height`` x ``width`` px (Qwen's ``image_grid_thw``)."""
    h, w = resized_size(height, width, patch_size * spatial_merge, min_pixels, max_pixels)
    return 1, h // patch_size, w // patch_size


def image_tokens(height: int, width: int, patch_size: int = 14, spatial_merge: int = 2, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> int:
    """LLM tokens (= merge blocks, the model's "tiles") of one still image."""
    t, h, w = image_grid(height, width, patch_size, spatial_merge, min_pixels, max_pixels)
    return t * h * w // spatial_merge**2
