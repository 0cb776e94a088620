"""Image preprocessing: InternVL dynamic tiling, LLaVA-1.5 pad-to-square and Qwen2-VL's patches, all normalised.

A *tile* is one ``image_size x image_size`` crop that goes through the vision encoder. The number of
tiles depends only on the image's (width, height), so :func:`count_tiles` answers it from the file
header alone (``PIL.Image.open(path).size``); :func:`tile_image` produces exactly that many tiles.

- ``internvl``: pick the grid (cols x rows) whose aspect ratio is closest to the image's among all grids
  with ``min_tiles..max_tiles`` tiles; on a tie the later grid wins when the image has more than half
  its pixels (InternVL's rule); with no grid in the range (``min_tiles`` above a multi-image sample's
  share of ``max_tiles``) the image is one tile, as in InternVL. The image is resized (PIL's bicubic,
  :mod:`~omnibal_pl.data.resample`) to the grid and cut into tiles row by row, then a thumbnail of the whole
  image is appended when the grid has more than one tile.
- ``llava``: pad the image to a square with the mean colour, resize to ``image_size``: one tile.
- ``qwen`` (Qwen2-VL / Qwen2.5-VL, :mod:`omnibal_pl.data.qwen_pixels`): the image keeps its own resolution
  (resized to multiples of one merge block, ``min_pixels..max_pixels``) and becomes patches of
  ``image_size / 2`` px; a "tile" is one merge block of ``2 x 2`` patches (one LLM token), so the tiles of
  an image are ``[blocks, 4, 3 * 2 * patch^2]`` and their count is :func:`~omnibal_pl.image_grid.image_tokens`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from PIL import Image

from omnibal_pl.data.qwen_pixels import SPATIAL_MERGE, patch_dim, qwen_patches
from omnibal_pl.data.resample import RESIZERS, resize_rgb
from omnibal_pl.errors import ConfigError
from omnibal_pl.image_grid import MAX_PIXELS, MIN_PIXELS, image_grid, image_tokens, resized_size
from omnibal_pl.pixels import PixelNorm, normalise
from omnibal_pl.qwen_batch import Grid

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_MODES = ("internvl", "llava", "qwen")
PIXEL_TYPES = ("float32", "uint8")


@dataclass
class TilingConfig:
    """How images become tiles.

    ``mode``: ``internvl`` (dynamic tiles, ImageNet normalisation), ``llava`` (one padded tile, CLIP
    normalisation) or ``qwen`` (patches at the image's own resolution, CLIP normalisation). ``image_size``: tile
    side in pixels (448 for InternVL, 336 for LLaVA-1.5; ``qwen``: one merge block, 28 = 2 patches of 14 px).
    ``min_tiles``/``max_tiles``: tile-count range of the grid (``internvl`` only); a sample with ``k``
    images gives each a grid of ``min_tiles..max(1, max_tiles // k)`` tiles, as InternVL does (an empty
    range means one tile).
    ``use_thumbnail``: append a whole-image thumbnail tile when the grid has more than one tile.
    ``min_pixels``/``max_pixels``: the pixel range an image is resized into (``qwen`` only; Qwen's defaults).
    ``reduced_decode``: decode a JPEG at the smallest of 1/1, 1/2, 1/4, 1/8 scale that still covers what its
    tiles need (the decoder's own DCT scaling, :func:`decode_size`), then resize; a few times faster on large
    photos, pixels within a few levels of a full decode. ``resize``: ``pil`` (PIL's bicubic, byte-exact with the
    reference processors) or ``torch`` (the same filter in torch, 4-5x faster, within 2 levels of PIL's on photos;
    :mod:`~omnibal_pl.data.resample`). ``pixels``: ``float32`` (normalised here) or ``uint8``
    (raw RGB, normalised on the device by the model, :mod:`omnibal_pl.pixels`; ``internvl`` and ``llava`` modes).
    """

    mode: str = "internvl"
    image_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 6
    use_thumbnail: bool = True
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    reduced_decode: bool = False
    resize: str = "pil"
    pixels: str = "float32"

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ConfigError(f"tiling.mode={self.mode!r}: expected one of {_MODES}")
        if self.image_size < 1:
            raise ConfigError(f"tiling.image_size={self.image_size}: must be >= 1 pixel")
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ConfigError(f"tiling: need 1 <= min_tiles <= max_tiles, got {self.min_tiles}..{self.max_tiles}")
        if self.mode == "qwen" and self.image_size % SPATIAL_MERGE:
            raise ConfigError(f"tiling.image_size={self.image_size}: in mode qwen a tile is one merge block of "
                              f"{SPATIAL_MERGE} x {SPATIAL_MERGE} patches (28 px for 14 px patches)")
        if self.resize not in RESIZERS:
            raise ConfigError(f"tiling.resize={self.resize!r}: expected one of {RESIZERS}")
        if self.pixels not in PIXEL_TYPES:
            raise ConfigError(f"tiling.pixels={self.pixels!r}: expected one of {PIXEL_TYPES}")
        if self.mode == "qwen" and (self.pixels != "float32" or self.reduced_decode):
            raise ConfigError("tiling.pixels=uint8 / tiling.reduced_decode: mode qwen resizes the whole image to its own "
                              "grid and leaves the loader normalised; use pixels: float32, reduced_decode: false")
        if self.mode == "qwen" and not 0 < self.min_pixels <= self.max_pixels:
            raise ConfigError(f"tiling: need 0 < min_pixels <= max_pixels, got {self.min_pixels}..{self.max_pixels}")

    @property
    def mean(self) -> tuple[float, float, float]:
        return IMAGENET_MEAN if self.mode == "internvl" else CLIP_MEAN  # Qwen's processors use CLIP's too

    @property
    def std(self) -> tuple[float, float, float]:
        return IMAGENET_STD if self.mode == "internvl" else CLIP_STD

    def tile_range(self, num_images: int) -> tuple[int, int]:
        """(min, max) tiles of one image's grid in a sample with ``num_images`` images (may be empty)."""
        return self.min_tiles, max(1, self.max_tiles // max(1, num_images))

    @property
    def pixel_norm(self) -> PixelNorm | None:
        """(mean, std) the model normalises ``uint8`` tiles with; None when the tiles leave here normalised."""
        return (self.mean, self.std) if self.pixels == "uint8" else None

    @property
    def patch_size(self) -> int:
        """``qwen``: the side of one patch in pixels."""
        return self.image_size // SPATIAL_MERGE


@lru_cache(maxsize=None)
def _candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) with min_tiles <= cols*rows <= max_tiles, fewest tiles first.

    Grids with the same tile count keep the order of a Python set built as InternVL builds it (by
    ``n``, then cols, then rows): that order decides which of two equally close grids wins a tie.
    """
    grids = {(c, r) for n in range(min_tiles, max_tiles + 1) for c in range(1, n + 1) for r in range(1, n + 1)
             if min_tiles <= c * r <= max_tiles}
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def tile_grid(width: int, height: int, cfg: TilingConfig, num_images: int = 1) -> tuple[int, int]:
    """The (cols, rows) grid for an image of ``width x height`` pixels (``(1, 1)`` in ``llava`` and ``qwen`` mode)."""
    if cfg.mode != "internvl":
        return 1, 1
    lo, hi = cfg.tile_range(num_images)
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in _candidate_grids(lo, hi):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * cfg.image_size**2 * cols * rows:
            # same aspect ratio, bigger grid: worth it only if the image has the pixels to fill it
            best = (cols, rows)
    return best


def count_tiles(width: int, height: int, cfg: TilingConfig, num_images: int = 1) -> int:
    """Tiles :func:`tile_image` makes for an image of this size, without touching pixels."""
    if cfg.mode == "qwen":
        return image_tokens(height, width, cfg.patch_size, SPATIAL_MERGE, cfg.min_pixels, cfg.max_pixels)
    cols, rows = tile_grid(width, height, cfg, num_images)
    n = cols * rows
    return n + 1 if n > 1 and cfg.use_thumbnail else n


def patch_grid(width: int, height: int, cfg: TilingConfig) -> Grid | None:
    """The (t, h, w) patch grid of an image of this size in ``qwen`` mode (its patches are the rows of its
    tiles, in order); None in the tiling modes."""
    if cfg.mode != "qwen":
        return None
    return image_grid(height, width, cfg.patch_size, SPATIAL_MERGE, cfg.min_pixels, cfg.max_pixels)


def decode_size(width: int, height: int, cfg: TilingConfig, num_images: int = 1) -> tuple[int, int]:
    """(width, height) in px the image is resized to before tiles are cut: the grid (``internvl``), the image's
    share of the padded square (``llava``) or Qwen's resized size. A decode at least this large loses nothing."""
    s = cfg.image_size
    if cfg.mode == "qwen":
        h, w = resized_size(height, width, cfg.patch_size * SPATIAL_MERGE, cfg.min_pixels, cfg.max_pixels)
        return w, h
    if cfg.mode == "llava":
        side = max(width, height)
        return math.ceil(width * s / side), math.ceil(height * s / side)
    cols, rows = tile_grid(width, height, cfg, num_images)
    return cols * s, rows * s


def decode(image: Image.Image, cfg: TilingConfig, num_images: int = 1) -> Image.Image:
    """``image`` (opened, not yet loaded) decoded to RGB; under ``reduced_decode`` a JPEG only at the scale
    :func:`decode_size` needs (so the resize after it still only shrinks)."""
    if cfg.reduced_decode and image.format == "JPEG":
        image.draft("RGB", decode_size(image.width, image.height, cfg, num_images))
    return image if image.mode == "RGB" else image.convert("RGB")


def tile_image(image: Image.Image, cfg: TilingConfig, num_images: int = 1) -> torch.Tensor:
    """Normalised tiles of one image: float32 ``[count_tiles(...), 3, image_size, image_size]``; in ``qwen`` mode
    its merge blocks ``[count_tiles(...), 4, 3 * 2 * patch^2]``. ``uint8`` RGB tiles under ``pixels: uint8``.
    ``image`` may be opened and not yet loaded (:func:`decode` then decodes it as ``reduced_decode`` says); the
    grid follows its size as opened (the file's, which the statistics read), not the reduced decode's."""
    width, height = image.size
    image = decode(image, cfg, num_images)
    s = cfg.image_size
    if cfg.mode == "qwen":
        patches, _ = qwen_patches(image, cfg.patch_size, cfg.min_pixels, cfg.max_pixels, cfg.mean, cfg.std, cfg.resize)
        return patches.view(-1, SPATIAL_MERGE**2, patches.shape[1])
    if cfg.mode == "llava":
        return _as_tiles(resize_rgb(_pad_to_square(image, cfg.mean), s, s, cfg.resize)[None], cfg)
    cols, rows = tile_grid(width, height, cfg, num_images)
    grid = resize_rgb(image, cols * s, rows * s, cfg.resize)  # [3, rows * s, cols * s]
    n = rows * cols
    thumbnail = n > 1 and cfg.use_thumbnail
    tiles = torch.empty(n + thumbnail, 3, s, s, dtype=torch.uint8)
    # the grid's tiles, row-major, in one copy: [3, rows, s, cols, s] -> [rows, cols, 3, s, s]
    tiles[:n].view(rows, cols, 3, s, s).copy_(grid.view(3, rows, s, cols, s).permute(1, 3, 0, 2, 4))
    if thumbnail:
        tiles[n] = resize_rgb(image, s, s, cfg.resize)
    return _as_tiles(tiles, cfg)


def dummy_tiles(n: int, cfg: TilingConfig) -> torch.Tensor:
    """``n`` zero tiles ``[n, 3, image_size, image_size]`` (text-only samples, padding); ``qwen``: ``n`` zero
    merge blocks."""
    if cfg.mode == "qwen":
        return torch.zeros(n, SPATIAL_MERGE**2, patch_dim(cfg.patch_size))
    return torch.zeros(n, 3, cfg.image_size, cfg.image_size, dtype=getattr(torch, cfg.pixels))


def _pad_to_square(image: Image.Image, mean: tuple[float, float, float]) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def _as_tiles(tiles: torch.Tensor, cfg: TilingConfig) -> torch.Tensor:
    """RGB tiles ``[t, 3, H, W]`` (contiguous ``uint8``) as the loader hands them on: ``uint8``, or normalised float32
    (the same :func:`normalise` the model runs on ``uint8`` tiles)."""
    return tiles if cfg.pixels == "uint8" else normalise(tiles, cfg.mean, cfg.std)
