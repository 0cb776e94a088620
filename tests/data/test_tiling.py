import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from omnibal_pl.data import TilingConfig, count_tiles, tile_grid, tile_image
from omnibal_pl.errors import ConfigError

CFG = TilingConfig(mode="internvl", image_size=448, min_tiles=1, max_tiles=6)
# the published normalisation constants, written out (not read from the module under test)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def pattern(width, height):
    """A deterministic RGB image with detail at every pixel (so resampling filters differ)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 37 + y * 11) % 256, (x * x + 3 * y) % 256, ((x ^ y) * 29) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def photo(width, height, seed=0):
    """A photograph-like RGB image: smooth colour fields from random 6 px blocks, bilinear (no hard 0-255 jumps)."""
    blocks = np.random.default_rng(seed).integers(0, 256, (height // 6 + 2, width // 6 + 2, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((width, height), Image.BILINEAR)


def to_bytes(tiles, mean, std):
    """Undoes the normalisation with the given constants: the 0..255 pixel values, int64 [t, H, W, 3]."""
    x = tiles.permute(0, 2, 3, 1).double() * torch.tensor(std, dtype=torch.float64) + torch.tensor(mean, dtype=torch.float64)
    return (x * 255).round().long()


@pytest.mark.parametrize(
    "size, grid",
    [
        ((448, 448), (1, 1)),  # square, too small to fill 2x2: tie resolved to the smaller grid
        ((1000, 1000), (2, 2)),  # square with pixels for 2x2: tie resolved to the larger grid
        ((1344, 448), (3, 1)),
        ((448, 1344), (1, 3)),
        ((900, 450), (2, 1)),
        ((4000, 100), (6, 1)),  # extreme aspect ratio: the widest grid allowed
    ],
)
def test_grid_choice(size, grid):
    assert tile_grid(*size, CFG) == grid


def test_grid_closest_aspect_ratio():
    # 4:3 = 1.333: candidates 1 (1:1, 2:2), 1.5 (3:2), 2 ... -> 3:2 is closest (diff 0.167 < 0.333)
    assert tile_grid(800, 600, CFG) == (3, 2)
    assert count_tiles(800, 600, CFG) == 7  # 6 tiles + thumbnail


def test_single_tile_has_no_thumbnail_and_min_tiles_is_honoured():
    assert count_tiles(448, 448, CFG) == 1
    cfg = TilingConfig(image_size=448, min_tiles=2, max_tiles=6)
    cols, rows = tile_grid(448, 448, cfg)
    assert cols * rows >= 2
    assert count_tiles(448, 448, TilingConfig(image_size=448, max_tiles=6, use_thumbnail=False)) == 1
    assert count_tiles(1000, 1000, TilingConfig(image_size=448, max_tiles=6, use_thumbnail=False)) == 4


def test_multi_image_shares_max_tiles():
    assert CFG.tile_range(2) == (1, 3)
    assert CFG.tile_range(10) == (1, 1)
    assert count_tiles(4000, 100, CFG, num_images=2) == 4  # 3x1 + thumbnail
    assert count_tiles(4000, 100, CFG, num_images=6) == 1


@settings(max_examples=60, deadline=None)
@given(w=st.integers(1, 300), h=st.integers(1, 300), max_tiles=st.integers(1, 8), n_images=st.integers(1, 3))
def test_count_tiles_matches_tile_image(w, h, max_tiles, n_images):
    cfg = TilingConfig(mode="internvl", image_size=14, min_tiles=1, max_tiles=max_tiles)
    tiles = tile_image(Image.new("RGB", (w, h), (10, 20, 30)), cfg, n_images)
    assert tiles.shape == (count_tiles(w, h, cfg, n_images), 3, 14, 14)
    assert tiles.dtype == torch.float32
    assert tiles.shape[0] <= max(1, max_tiles // n_images) + 1


def test_tiles_are_cut_row_major_and_normalised():
    # left half black, right half white, 2x1 grid -> tile 0 black, tile 1 white, then the thumbnail
    img = Image.new("RGB", (56, 28), (0, 0, 0))
    img.paste((255, 255, 255), (28, 0, 56, 28))
    cfg = TilingConfig(mode="internvl", image_size=28, max_tiles=4)
    tiles = tile_image(img, cfg)
    assert tiles.shape[0] == 3
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(tiles[0, :, 5:20, 5:20], (-mean / std).expand(3, 15, 15))
    torch.testing.assert_close(tiles[1, :, 5:20, 5:20], ((1 - mean) / std).expand(3, 15, 15))
    assert tiles[2, :, :, :10].mean() < 0 < tiles[2, :, :, -10:].mean()  # thumbnail: dark left, bright right


def test_internvl_tiles_are_bicubic_and_imagenet_normalised():
    # InternVL's dynamic_preprocess on a 23x17 image, 8 px tiles, max 6: 3x2 grid of the image resized
    # (bicubic) to 24x16, then the bicubic 8x8 thumbnail; values below from PIL, per tile
    tiles = tile_image(pattern(23, 17), TilingConfig(mode="internvl", image_size=8, max_tiles=6))
    assert tiles.shape == (7, 3, 8, 8) and tiles.dtype == torch.float32
    pixels = to_bytes(tiles, IMAGENET_MEAN, IMAGENET_STD)
    assert [int(p.sum()) for p in pixels] == [15916, 23428, 23644, 18740, 25212, 23221, 21715]
    assert pixels[0, 0, :, 0].tolist() == [0, 35, 70, 106, 141, 177, 230, 61]  # bilinear: 1, 36, 71, 107, ...
    assert pixels[6, 0, :, 1].tolist() == [3, 16, 47, 93, 167, 126, 68, 187]
    # red in the first row: 0 and 35 -> (v / 255 - mean) / std
    assert tiles[0, 0, 0, 0].item() == pytest.approx(-0.485 / 0.229, abs=1e-6)
    assert tiles[0, 0, 0, 1].item() == pytest.approx((35 / 255 - 0.485) / 0.229, abs=1e-6)


def test_llava_tile_is_padded_bicubic_and_clip_normalised():
    # LLaVA: expand2square with the CLIP mean as bytes (122, 116, 104), then bicubic to 8x8; values from PIL
    tiles = tile_image(pattern(23, 17), TilingConfig(mode="llava", image_size=8, max_tiles=1, use_thumbnail=False))
    pixels = to_bytes(tiles, CLIP_MEAN, CLIP_STD)
    assert tiles.shape == (1, 3, 8, 8) and int(pixels.sum()) == 21755
    assert pixels[0, 0, :, 0].tolist() == [116, 123, 120, 119, 124, 118, 124, 120]
    assert pixels[0, 4, :, 2].tolist() == [85, 116, 115, 40, 135, 173, 151, 93]
    assert tiles[0, 0, 0, 0].item() == pytest.approx((116 / 255 - 0.48145466) / 0.26862954, abs=1e-6)


@pytest.mark.parametrize(
    "size, min_tiles, max_tiles, images, grid, tiles",
    [
        ((500, 500), 1, 6, 1, (1, 1), 1),  # tie 1x1 / 2x2: 250,000 px < half of 2x2's 802,816
        ((1000, 400), 4, 12, 3, (4, 1), 5),  # tie 4x1 / 2x2 (aspect 2.5): 4x1 comes first in InternVL's order
        ((1200, 480), 4, 12, 3, (2, 2), 5),  # same tie, enough pixels: the later 2x2 wins
        ((1000, 400), 5, 12, 3, (1, 1), 1),  # min 5 > 12 // 3: no grid in range, one tile (no thumbnail)
    ],
)
def test_grid_choice_as_internvl(size, min_tiles, max_tiles, images, grid, tiles):
    cfg = TilingConfig(image_size=448, min_tiles=min_tiles, max_tiles=max_tiles)
    assert tile_grid(*size, cfg, images) == grid
    assert count_tiles(*size, cfg, images) == tiles


def test_llava_pads_to_square_with_the_mean_colour():
    cfg = TilingConfig(mode="llava", image_size=28, max_tiles=1, use_thumbnail=False)
    img = Image.new("RGB", (100, 20), (255, 0, 0))
    tiles = tile_image(img, cfg)
    assert tiles.shape == (1, 3, 28, 28) and count_tiles(100, 20, cfg) == 1
    # the padding rows are the mean colour: normalised to about 0 (the mean is rounded to a byte)
    assert tiles[0, :, :5, :].abs().max() < 0.02
    # the red band in the middle: red channel high, others low
    assert tiles[0, 0, 14, 14] > 1.5 and tiles[0, 1, 14, 14] < -1.5
    assert cfg.mean == CLIP_MEAN and cfg.std == CLIP_STD


def assert_within_rounding(ours, reference):
    """Bytes as PIL's bicubic makes them up to the rounding resample.py documents: no value more than 2 levels off,
    under 0.25 levels on average (torch's bicubic without antialiasing, or its antialiased bilinear, is 5-31 levels
    off at worst and 0.6-4 on average on these images)."""
    diff = (ours.long() - reference.long()).abs()
    assert diff.max() <= 2 and diff.double().mean() < 0.25, (int(diff.max()), diff.double().mean().item())


@pytest.mark.parametrize("size, to", [((300, 170), (168, 84)), ((300, 170), (900, 500)), ((1200, 700), (448, 448)),
                                      ((61, 1000), (28, 224)), ((700, 500), (896, 448))])
def test_both_resizers_are_pils_bicubic(size, to):
    """A photograph-like image shrunk (by up to 4.5x), enlarged, and both at once: ``pil`` gives PIL's bytes, ``torch``
    them within rounding, both as [3, H, W]."""
    from omnibal_pl.data.resample import resize_rgb

    image = photo(*size)
    reference = torch.from_numpy(np.array(image.resize(to, Image.BICUBIC))).permute(2, 0, 1)
    exact, fast = resize_rgb(image, *to, "pil"), resize_rgb(image, *to, "torch")
    for ours in (exact, fast):
        assert ours.shape == (3, to[1], to[0]) and ours.dtype == torch.uint8 and ours.is_contiguous()
    assert torch.equal(exact, reference)
    assert_within_rounding(fast, reference)


@pytest.mark.parametrize("mode, size", [("internvl", (700, 500)), ("internvl", (1300, 420)), ("llava", (500, 300))])
def test_torch_resize_makes_the_same_tiles_within_rounding(mode, size):
    """``tiling.resize=torch``: every tile (grid, thumbnail, padded square) as ``pil`` makes it, up to rounding."""
    cfg = TilingConfig(mode=mode, image_size=112, max_tiles=6, pixels="uint8")
    exact = tile_image(photo(*size), cfg)
    fast = tile_image(photo(*size), TilingConfig(**{**vars(cfg), "resize": "torch"}))
    assert fast.shape == exact.shape and fast.dtype == torch.uint8 and (mode == "llava" or len(exact) > 2)
    for ours, reference in zip(fast, exact):
        assert_within_rounding(ours, reference)


def test_bad_config():
    with pytest.raises(ConfigError, match="mode"):
        TilingConfig(mode="nope")
    with pytest.raises(ConfigError, match="tiling.resize='cv2'"):
        TilingConfig(resize="cv2")
    with pytest.raises(ConfigError, match="min_tiles"):
        TilingConfig(min_tiles=5, max_tiles=2)
