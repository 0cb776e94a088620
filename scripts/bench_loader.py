"""Loader benchmark: samples/s of one loader process on InternVL-format JPEGs, the fast path against today's
and against InternVL's own preprocessing, on the same files in the same run.

    .venv/bin/python scripts/bench_loader.py [--images 40] [--repeats 3] [--sides 300 1600]

``--sides``: the range of the JPEGs' sides in px; 300-1600 are the images of bench_data.py (mostly upscaled to
their grid, where reduced decoding cannot help), 1600-4000 camera-sized photos (decoded at 1/2 or 1/4 scale).

Rows (each the median of ``--repeats`` passes over the images, one process = one loader worker; with
``--baseline-tree DIR``, a checkout of an earlier commit, first that code's dataset with the before settings,
timed in a child process on the same files, and the ratios against it):
- ``dataset, float32 full decode``: ``InternVLDataset[i]`` as before (full JPEG decode, tiles normalised to
  float32 on the CPU), tokenisation included;
- ``dataset, uint8 reduced decode``: the same with ``tiling.reduced_decode=true``, ``tiling.resize=torch`` and
  ``tiling.pixels=uint8`` (JPEG decoded at the scale its tiles need, resized by torch's bicubic, tiles left uint8
  for the device to normalise);
- ``pixels only``: the image -> tiles step alone for ours (both settings) and for InternVL's preprocessing as its
  training code does it (full decode, ``dynamic_preprocess`` resize and crops, then per tile torchvision's
  ``Resize`` + ``ToTensor`` + ``Normalize``, reimplemented here with PIL and numpy since torchvision is absent).
Then the share of the fast path's time the bicubic resize to the tile grid takes alone (torch's, and PIL's for
comparison), and what the fast path changes: the mean and largest difference of its tiles from a full decode
with PIL's resize (0-255 levels), and the device-side normalisation against the CPU's (float32 and bf16).
torch runs on one thread throughout, as in a loader worker.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# only what an earlier checkout also has at module level: --baseline-tree runs this file against one
from omnibal_pl.data import InternVLDataset, TemplateConfig, TilingConfig
from omnibal_pl.data.tiling import tile_grid, tile_image

TEMPLATE = TemplateConfig(name="internlm2-chat", tokens_per_tile=256, image_context_token="<IMG_CONTEXT>")
BEFORE = TilingConfig(mode="internvl", image_size=448, max_tiles=6)


def internvl_preprocess(path: Path, size: int = 448, max_num: int = 6) -> torch.Tensor:
    """InternVL's ``load_image``: RGB decode, ``dynamic_preprocess`` (grid by aspect ratio, bicubic resize, row-major
    crops, a thumbnail), then per tile ``Resize((size, size), BICUBIC)``, ``ToTensor``, ``Normalize`` (ImageNet)."""
    image = Image.open(path).convert("RGB")
    cols, rows = tile_grid(image.width, image.height, BEFORE)  # the same grid rule; its cost is negligible
    resized = image.resize((cols * size, rows * size), Image.BICUBIC)
    tiles = [resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(rows) for c in range(cols)]
    if len(tiles) > 1:
        tiles.append(image.resize((size, size), Image.BICUBIC))
    mean = np.asarray((0.485, 0.456, 0.406), np.float32)[:, None, None]
    std = np.asarray((0.229, 0.224, 0.225), np.float32)[:, None, None]
    out = []
    for tile in tiles:
        tile = tile.resize((size, size), Image.BICUBIC)
        x = np.asarray(tile, dtype=np.float32).transpose(2, 0, 1) / 255.0  # ToTensor
        out.append(torch.from_numpy((x - mean) / std))  # Normalize
    return torch.stack(out)


def per_second(fn, n: int, repeats: int) -> float:
    """Median items/s of ``repeats`` passes of ``fn(i)`` for i < n (one pass first to warm the file cache)."""
    for i in range(n):
        fn(i)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sides", type=int, nargs=2, default=(300, 1600))
    parser.add_argument("--baseline-tree", default=None,
                        help="a checkout of an earlier commit (its C++ core built): its dataset, before settings, as a row")
    parser.add_argument("--child-rate", nargs=2, default=None, help=argparse.SUPPRESS)  # META TOKENIZER
    args = parser.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker's setting: one loader process is one core
    if args.child_rate:  # the baseline tree's dataset, in the process --baseline-tree started
        print(per_second(InternVLDataset(*args.child_rate, TEMPLATE, BEFORE).__getitem__, args.images, args.repeats))
        return
    from bench_data import write_image_dataset  # this folder: python scripts/bench_loader.py
    from omnibal_pl.data.resample import resize_rgb
    from omnibal_pl.data.tiling import decode
    from omnibal_pl.pixels import normalise

    fast_cfg = TilingConfig(mode="internvl", image_size=448, max_tiles=6, reduced_decode=True, resize="torch",
                            pixels="uint8")
    with tempfile.TemporaryDirectory() as tmp:
        meta, tok = write_image_dataset(Path(tmp), args.images, seed=0, sides=tuple(args.sides))
        paths = sorted((Path(tmp) / "images").glob("*.jpg"))
        before = InternVLDataset(meta, tok, TEMPLATE, BEFORE)
        fast = InternVLDataset(meta, tok, TEMPLATE, fast_cfg)
        n, r = args.images, args.repeats
        rows = [
            ("dataset, float32 full decode (before)", per_second(lambda i: before[i], n, r)),
            ("dataset, uint8 reduced decode (now)", per_second(lambda i: fast[i], n, r)),
            ("pixels only: InternVL preprocessing", per_second(lambda i: internvl_preprocess(paths[i]), n, r)),
            ("pixels only: ours before", per_second(lambda i: tile_image(Image.open(paths[i]), BEFORE), n, r)),
            ("pixels only: ours now", per_second(lambda i: tile_image(Image.open(paths[i]), fast_cfg), n, r)),
        ]
        if args.baseline_tree:
            child = subprocess.run([sys.executable, __file__, "--child-rate", str(meta), str(tok), "--images", str(n),
                                    "--repeats", str(r)], env={**os.environ, "PYTHONPATH": args.baseline_tree},
                                   capture_output=True, text=True, check=True)
            rows.insert(0, (f"dataset at {Path(args.baseline_tree).name} (float32, full)", float(child.stdout.split()[-1])))
        decoded = [decode(Image.open(p), fast_cfg) for p in paths]
        for image in decoded:
            image.load()
        grids = [tile_grid(*Image.open(p).size, fast_cfg) for p in paths]
        size = fast_cfg.image_size
        resize_only = {resizer: per_second(lambda i: resize_rgb(decoded[i], grids[i][0] * size, grids[i][1] * size,
                                                                resizer), n, r) for resizer in ("torch", "pil")}
        print(f"{args.images} JPEGs of {args.sides[0]}-{args.sides[1]} px (InternVL dynamic tiling, 448 px, up to 6 tiles + thumbnail), "
              f"one process, median of {args.repeats}")
        print(f"{'path':<42}{'samples/s':>10}{'vs before':>11}{'vs InternVL':>13}")
        base, internvl = rows[0][1], next(rate for name, rate in rows if "InternVL" in name)
        now = next(rate for name, rate in rows if name.startswith("dataset, uint8"))
        for name, rate in rows:
            print(f"{name:<42}{rate:>10.1f}{rate / base:>10.2f}x{rate / internvl:>12.2f}x")
        print(f"of which the bicubic resize to the tile grid alone (decoded image given): torch {resize_only['torch']:.1f} /s, "
              f"{now / resize_only['torch']:.0%} of the fast path's time (PIL's: {resize_only['pil']:.1f} /s)")
        diffs, worst = [], 0
        for path in paths:
            full = tile_image(Image.open(path), TilingConfig(**{**vars(fast_cfg), "reduced_decode": False, "resize": "pil"})).int()
            reduced = tile_image(Image.open(path), fast_cfg).int()
            diffs.append((full - reduced).abs().float().mean().item())
            worst = max(worst, int((full - reduced).abs().max()))
        print(f"\nfast path vs full decode and PIL's resize, tiles in 0-255 levels: mean |diff| {statistics.mean(diffs):.2f}, "
              f"largest {worst}")
        tiles = tile_image(Image.open(paths[0]), fast_cfg)
        cpu = tile_image(Image.open(paths[0]), TilingConfig(**{**vars(fast_cfg), "pixels": "float32"}))
        on_device = normalise(tiles, BEFORE.mean, BEFORE.std)  # what the vision embedding runs (CPU here)
        print(f"device-side normalisation vs CPU: float32 max |diff| {(on_device - cpu).abs().max().item():.2e}, "
              f"bf16 max |diff| {(on_device.bfloat16().float() - cpu.bfloat16().float()).abs().max().item():.2e}")
        start = time.perf_counter()
        for _ in range(20):
            normalise(tiles, BEFORE.mean, BEFORE.std)
        print(f"normalising one sample's {len(tiles)} tiles: {(time.perf_counter() - start) / 20 * 1e3:.1f} ms on this CPU "
              "(the work the loader no longer does)")


if __name__ == "__main__":
    main()
