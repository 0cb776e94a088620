"""The fast loader path: JPEGs decoded only as large as their tiles need (``tiling.reduced_decode``), tiles kept
``uint8`` (``tiling.pixels``) and normalised by the model on the device, with the same values as the CPU's."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from omnibal_pl.data import TilingConfig
from omnibal_pl.data.tiling import decode, decode_size, tile_image
from omnibal_pl.errors import ConfigError
from omnibal_pl.model import VLM
from omnibal_pl.pixels import normalise
from tests.helpers import model_config


def photo(path, width: int, height: int, fmt: str = "JPEG"):
    """A smooth colour photo-like image (gradients and a few shapes), saved as ``fmt``."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1).astype(np.uint8)
    pixels[height // 4 : height // 2, width // 3 : width // 2] = (250, 20, 40)
    Image.fromarray(pixels).save(path, fmt, quality=92) if fmt == "JPEG" else Image.fromarray(pixels).save(path, fmt)
    return path


def test_normalise_is_the_usual_formula():
    """ImageNet's and CLIP's constants in turn, the second ImageNet call from a list: each call uses its own
    norm's factors (they are built once per norm and device)."""
    raw = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(3, 16, 16)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    clip = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    for mean, std in (imagenet, clip, [list(imagenet[0]), list(imagenet[1])]):
        m, s = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in (mean, std))
        got = normalise(raw, mean, std)
        assert got.dtype == torch.float32 and torch.allclose(got.double(), (raw.double() / 255 - m) / s, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode, size", [("internvl", 56), ("llava", 56)])
def test_uint8_tiles_normalised_on_the_device_equal_the_cpus_float_tiles(tmp_path, mode, size):
    image = photo(tmp_path / "a.png", 150, 100, "PNG")
    as_float = TilingConfig(mode=mode, image_size=size, max_tiles=6)
    as_uint8 = dataclasses.replace(as_float, pixels="uint8")
    raw = tile_image(Image.open(image), as_uint8)
    assert raw.dtype == torch.uint8 and as_uint8.pixel_norm == (as_float.mean, as_float.std)
    expected = tile_image(Image.open(image), as_float)
    assert torch.equal(normalise(raw, *as_uint8.pixel_norm), expected)
    if mode == "internvl":  # ImageNet's constants, not CLIP's
        assert as_uint8.pixel_norm[0] == (0.485, 0.456, 0.406)


def test_the_vision_embedding_normalises_uint8_tiles():
    from omnibal_pl.data.synthetic import SyntheticDataset
    from omnibal_pl.data.synthetic_lengths import synthetic_lengths
    from omnibal_pl.data.collate import PackingCollate

    cfg = model_config("tiny")
    gen = torch.Generator().manual_seed(0)
    lengths = synthetic_lengths(8, seed=0)
    data = SyntheticDataset(lengths, cfg.llm.vocab_size, cfg.vision.image_size, cfg.tokens_per_tile, cfg.image_context_id)
    batch = PackingCollate(token_cap=4096, vit_cap=64, pad_to="none")([data[0], data[1]])
    raw = torch.randint(0, 256, batch.pixel_values.shape, dtype=torch.uint8, generator=gen)
    norm = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    floats = dataclasses.replace(batch, pixel_values=normalise(raw, *norm))
    raws = dataclasses.replace(batch, pixel_values=raw, pixel_norm=norm)
    torch.manual_seed(0)
    model = VLM(cfg).eval()
    with torch.no_grad():
        assert torch.equal(model(raws), model(floats))
        with pytest.raises(ValueError, match="uint8 pixel_values without the batch's pixel_norm"):
            model(dataclasses.replace(raws, pixel_norm=None))


@pytest.mark.parametrize("mode, size, width, height, decoded", [
    ("internvl", 448, 3000, 1500, (1500, 750)),  # 2:1 -> a 2 x 1 grid of 448 px: 896 x 448 needed, so half scale
    ("internvl", 448, 4000, 4000, (1000, 1000)),  # 1:1 -> a 2 x 2 grid: 896 x 896, so a quarter (not the thumbnail's eighth)
    ("llava", 336, 3000, 1500, (375, 188)),  # padded to a square of 336 px: 336 x 168 of it is the image, so an eighth
])
def test_reduced_decode_decodes_only_what_the_tiles_need(tmp_path, mode, size, width, height, decoded):
    path = photo(tmp_path / "big.jpg", width, height)
    cfg = TilingConfig(mode=mode, image_size=size, max_tiles=6, reduced_decode=True, pixels="uint8")
    need = decode_size(width, height, cfg)
    image = decode(Image.open(path), cfg)
    assert image.size == decoded and image.width >= need[0] and image.height >= need[1]
    full = tile_image(Image.open(path), dataclasses.replace(cfg, reduced_decode=False)).int()
    fast = tile_image(Image.open(path), cfg).int()
    assert full.shape == fast.shape
    diff = (full - fast).abs().float()  # levels of 0-255; a hard edge rings differently, the rest hardly moves
    assert diff.mean() < 1.0 and (diff > 8).float().mean() < 0.02


def test_reduced_decode_leaves_small_jpegs_and_other_formats_whole(tmp_path):
    cfg = TilingConfig(mode="internvl", image_size=448, max_tiles=6, reduced_decode=True)
    assert decode(Image.open(photo(tmp_path / "small.jpg", 700, 500)), cfg).size == (700, 500)  # grid wants more
    assert decode(Image.open(photo(tmp_path / "big.png", 2400, 1800, "PNG")), cfg).size == (2400, 1800)


def test_pixel_settings_are_checked():
    with pytest.raises(ConfigError, match="tiling.pixels='int8'"):
        TilingConfig(pixels="int8")
    with pytest.raises(ConfigError, match="mode qwen resizes the whole image to its own grid"):
        TilingConfig(mode="qwen", image_size=28, pixels="uint8")


def test_a_run_on_uint8_tiles_trains_exactly_as_on_float_tiles(tmp_path):
    """``omnibal-train`` on the same LLaVA data (PNGs: decoded whole either way) with tiles normalised by the loader
    and with uint8 tiles normalised by the model: the same loss at every step, bit for bit."""
    from omnibal_pl.cli.train import train
    from tests.helpers import cfg_of, llava_records, losses_in, make_tokenizer, write_jsonl

    root = tmp_path / "data"
    annotation = write_jsonl(root / "train.jsonl", llava_records(root) * 3)
    common = ["dataset=llava", f"dataset.annotation={annotation}", f"dataset.image_root={root}",
              f"dataset.tokenizer={make_tokenizer(tmp_path / 'tok')}", "dataset.template.tokens_per_tile=4",
              "dataset.tiling.image_size=56", "model.image_context_id=8", "balance.dp=1", "balance.vit_cap=2",
              "balance.token_cap=160", "trainer.max_steps=6", "trainer.enable_progress_bar=false",
              "trainer.log_every_n_steps=1"]
    train(cfg_of(*common, "dataset.tiling.pixels=float32", "dataset.tiling.reduced_decode=false", f"run_dir={tmp_path / 'float'}"))
    train(cfg_of(*common, f"run_dir={tmp_path / 'uint8'}"))  # the preset's default: uint8, reduced decode
    as_float, as_uint8 = losses_in(tmp_path / "float"), losses_in(tmp_path / "uint8")
    assert len(as_float) == 6 and as_uint8 == as_float
