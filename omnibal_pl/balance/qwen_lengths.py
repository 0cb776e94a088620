"""A seeded Qwen2-VL / Qwen2.5-VL style length table: what the balance sees when the vision unit is a merge block.

For Qwen's dynamic resolution the vision work of a sample is its merge blocks (2 x 2 patches of 14 px, one LLM
token each), :func:`omnibal_pl.image_grid.image_tokens` per image, so ``vit`` takes hundreds of distinct values
instead of InternVL's ~13 tile counts. The image sizes follow a mix meant to resemble today's fine-tuning data:

============  ======  ==================================================================================
kind          share   images
============  ======  ==================================================================================
text          15%     none (one dummy merge block, ``image_flag`` 0, as every text-only row carries)
photo         55%     one VQA / caption photo: long side log-uniform in 300..1500 px, aspect ratio one of
                      1:1, 4:3, 3:2, 16:9 (landscape 70% of the time, portrait otherwise)
document      20%     one screen (1280x720 .. 2560x1440, or a 1170x2532 phone) or page (aspect 1.29 / 1.41,
                      long side 1400..3500 px): mostly at ``max_pixels``
multi-image   10%     2..4 photos, long side 300..1000 px
============  ======  ==================================================================================

Text tokens (prompt + answer, the chat template included) are log-normal: median 80 for photos, 200 for
documents and multi-image samples, 400 for text-only samples (sigma 1, clipped to 8..4096). ``tokens`` = text +
image tokens. Rows carry their kind as ``source``.
"""
from __future__ import annotations

import numpy as np

from omnibal_pl.image_grid import MAX_PIXELS, MIN_PIXELS, image_tokens
from omnibal_pl.lengths import LengthTable

KINDS = ("text", "photo", "document", "multi_image")
KIND_SHARES = (0.15, 0.55, 0.20, 0.10)
TEXT_MEDIAN = {"text": 300, "photo": 60, "document": 150, "multi_image": 150}
PHOTO_ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9)
SCREENS = ((1280, 720), (1366, 768), (1920, 1080), (2560, 1440), (1170, 2532))  # (width, height) px
PAGE_ASPECTS = (11 / 8.5, 297 / 210)  # US letter, A4 (height / width)


def qwen_style_lengths(samples: int, seed: int = 0, max_pixels: int = MAX_PIXELS,
                       min_pixels: int = MIN_PIXELS) -> LengthTable:
    """``samples`` rows of the mix above; ``vit`` in merge blocks under Qwen's resize rule with these pixel limits
    (Qwen's defaults: up to 1280 blocks per image; ``28 * 28 * 576`` gives up to 576)."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(len(KINDS), size=samples, p=KIND_SHARES)
    images = np.where(kind == KINDS.index("multi_image"), rng.integers(2, 5, samples), (kind != 0).astype(np.int64))
    owner = np.repeat(np.arange(samples), images)  # sample of each image
    image_kind = kind[owner]
    heights, widths = _photo_sizes(rng, len(owner), np.where(image_kind == KINDS.index("photo"), 1500, 1000))
    docs = np.flatnonzero(image_kind == KINDS.index("document"))
    heights[docs], widths[docs] = _document_sizes(rng, len(docs))
    blocks = _blocks(heights, widths, min_pixels, max_pixels)
    vit = np.bincount(owner, weights=blocks, minlength=samples).astype(np.int64)
    median = np.array([TEXT_MEDIAN[k] for k in KINDS])[kind]
    text = np.clip(np.round(median * rng.lognormal(0.0, 0.75, samples)), 8, 2048).astype(np.int64)
    image_flag = vit.copy()
    text_only = images == 0
    vit[text_only] = 1  # the dummy merge block of a text-only row
    return LengthTable.from_arrays(vit, text + image_flag, image_flag, kind, KINDS)


def _photo_sizes(rng: np.random.Generator, n: int, longest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(heights, widths) px of ``n`` photos: long side log-uniform in 300..``longest``, a common aspect ratio."""
    long_side = np.exp(rng.uniform(np.log(300), np.log(longest), n))
    short_side = long_side / rng.choice(PHOTO_ASPECTS, n)
    landscape = rng.random(n) < 0.7
    heights = np.where(landscape, short_side, long_side)
    widths = np.where(landscape, long_side, short_side)
    return np.round(heights).astype(np.int64), np.round(widths).astype(np.int64)


def _document_sizes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(heights, widths) px of ``n`` screens (half) and pages (half)."""
    screen = np.array(SCREENS)[rng.integers(0, len(SCREENS), n)]
    page_height = rng.uniform(1400, 3500, n)
    page_width = page_height / rng.choice(PAGE_ASPECTS, n)
    is_screen = rng.random(n) < 0.5
    heights = np.where(is_screen, screen[:, 1], np.round(page_height))
    widths = np.where(is_screen, screen[:, 0], np.round(page_width))
    return heights.astype(np.int64), widths.astype(np.int64)


def _blocks(heights: np.ndarray, widths: np.ndarray, min_pixels: int, max_pixels: int) -> np.ndarray:
    """Merge blocks of each image by Qwen's own rule, computed once per distinct size."""
    keys, inverse = np.unique(heights * (1 << 20) + widths, return_inverse=True)
    per_size = np.array([image_tokens(int(k >> 20), int(k & ((1 << 20) - 1)), min_pixels=min_pixels,
                                      max_pixels=max_pixels) for k in keys], np.int64)
    return per_size[inverse.reshape(-1)]
