import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from omnibal_pl.data import TilingConfig, count_tiles, tile_grid, tile_image
from omnibal_pl.data.tiling import CLIP_MEAN, IMAGENET_MEAN, IMAGENET_STD
from omnibal_pl.errors import ConfigError

CFG = TilingConfig(mode="internvl", image_size=448, min_tiles=1, max_tiles=6)


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


def test_llava_pads_to_square_with_the_mean_colour():
    cfg = TilingConfig(mode="llava", image_size=28, max_tiles=1, use_thumbnail=False)
    img = Image.new("RGB", (100, 20), (255, 0, 0))
    tiles = tile_image(img, cfg)
    assert tiles.shape == (1, 3, 28, 28) and count_tiles(100, 20, cfg) == 1
    # the padding rows are the mean colour: normalised to about 0 (the mean is rounded to a byte)
    assert tiles[0, :, :5, :].abs().max() < 0.02
    # the red band in the middle: red channel high, others low
    assert tiles[0, 0, 14, 14] > 1.5 and tiles[0, 1, 14, 14] < -1.5
    assert np.allclose(cfg.mean, CLIP_MEAN)


def test_bad_config():
    with pytest.raises(ConfigError, match="mode"):
        TilingConfig(mode="nope")
    with pytest.raises(ConfigError, match="min_tiles"):
        TilingConfig(min_tiles=5, max_tiles=2)
