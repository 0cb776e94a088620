"""Sequence packing on vs off: ms per sample of forward + backward, by tiles per sample, on one process and at
simulated DP = 4.

    .venv/bin/python scripts/bench_packing.py [--tiles 1 2 4 8 12 16 20] [--budget 16384] [--steps 3]
        [--reps 2] [--dp 4] [--device cpu] [--threads N]

Model: the ``tiny`` preset with 448 px tiles, so every tile is 256 LLM tokens (InternVL's 448 px tile after
pixel shuffle): rows of 1 .. 20 tiles are 256 .. 5,120 image tokens per sample, plus its text. Text lengths
are drawn from the real statistics' image samples (``--data``; the embedded generator when absent); the
``mixed`` row draws whole samples (tiles and text) from them.

A micro-batch holds as many samples as fit ``--budget`` tokens on average, and at least two: with one sample
there is nothing to pack, and on and off would run the same batch. The same samples run both ways:

- packing on: one varlen sequence, each sample its own attention segment (the project's collate);
- packing off: a padded batch: every sample padded to the micro-batch's longest, each padded row one causal
  segment (the padding is computed, as in a padded ``[B, L_max]`` batch; under causal attention it does not
  change the real tokens). Both run the same kernels, so the difference is the padding's work.

One process: ms per sample = mean micro-batch time / samples. Simulated DP = ``--dp``: each rank runs its
own micro-batch (different samples), a step waits for the slowest rank: ms per sample = mean step time /
samples of the step. Timing: each micro-batch runs ``--reps`` times, the fastest counts; the runs go round
a step's micro-batches (``bench_train.time_ranks``), so a slow spell of the machine does not fall on one only.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch

from omnibal_pl.batch import IGNORE_INDEX, PackedBatch
from omnibal_pl.conf import preset
from omnibal_pl.data.collate import PackingCollate
from omnibal_pl.data.datasets import Sample
from omnibal_pl.data.synthetic import SyntheticDataset
from omnibal_pl.data.synthetic_lengths import synthetic_lengths
from omnibal_pl.lengths import LengthTable, load_lengths
from omnibal_pl.model import VLM, VLMConfig
from bench_train import time_ranks  # this folder: python scripts/bench_packing.py

TILE_SIZE = 448  # px: 256 LLM tokens per tile


def model_config() -> VLMConfig:
    raw = preset("model", "tiny")
    raw["vision"]["image_size"] = TILE_SIZE
    return VLMConfig.from_dict(raw)


def real_statistics(data: Path) -> LengthTable:
    files = sorted(data.glob("*.json"))
    return load_lengths(files) if files else synthetic_lengths(20000, seed=0)


def row_table(stats: LengthTable, tiles: int | None, n: int, tokens_per_tile: int, seed: int) -> LengthTable:
    """``n`` samples of ``tiles`` tiles with text drawn from the real image samples; ``None``: real samples."""
    rng = np.random.default_rng(seed)
    with_image = np.flatnonzero(stats.image_flag > 0)
    rows = rng.choice(with_image if tiles else len(stats), size=n)
    text = np.maximum(stats.tokens[rows] - stats.image_flag[rows] * 256, 1)  # the statistics count 256 per tile
    vit = np.full(n, tiles) if tiles else stats.vit[rows]
    flag = np.full(n, tiles) if tiles else stats.image_flag[rows]
    return LengthTable.from_arrays(vit, flag * tokens_per_tile + text, flag)


def padded(sample: Sample, length: int) -> Sample:
    """``sample`` with padding tokens (no loss) appended up to ``length``: one row of a padded batch."""
    pad = length - sample.num_tokens
    return Sample(torch.cat([sample.input_ids, sample.input_ids.new_zeros(pad)]),
                  torch.cat([sample.labels, sample.labels.new_full((pad,), IGNORE_INDEX)]),
                  sample.pixel_values, sample.image_flags, sample.sample_id)


def micro_batch(samples: list[Sample], packed: bool, cfg: VLMConfig) -> PackedBatch:
    if not packed:
        longest = max(s.num_tokens for s in samples)
        samples = [padded(s, longest) for s in samples]
    tokens, tiles = sum(s.num_tokens for s in samples), sum(s.num_tiles for s in samples)
    return PackingCollate(tokens, tiles, "none", image_context_id=cfg.image_context_id)(samples)


def measure_row(model: VLM, cfg: VLMConfig, stats: LengthTable, tiles: int | None, args: argparse.Namespace,
                device: torch.device) -> dict:
    probe = row_table(stats, tiles, 4096, cfg.tokens_per_tile, seed=0)
    per_mb = max(2, int(args.budget // probe.tokens.mean()))
    n = per_mb * args.dp * args.steps
    table = row_table(stats, tiles, n, cfg.tokens_per_tile, seed=1)
    data = SyntheticDataset(table, cfg.llm.vocab_size, TILE_SIZE, cfg.tokens_per_tile, cfg.image_context_id)
    groups = np.arange(n).reshape(args.steps, args.dp, per_mb)
    out = {"tiles": tiles or "mixed", "samples": per_mb}
    for packed in (True, False):
        key = "on" if packed else "off"
        ranks = [[min(runs) for runs in time_ranks(model, [micro_batch([data[int(i)] for i in g], packed, cfg)
                                                           for g in step], device, args.reps)]
                 for step in groups]  # [step][rank] seconds, each micro-batch's fastest run
        out[f"{key}_one"] = 1e3 * statistics.mean(t for step in ranks for t in step) / per_mb
        out[f"{key}_dp"] = 1e3 * statistics.mean(max(step) for step in ranks) / (per_mb * args.dp)
        out[f"{key}_tokens"] = micro_batch([data[int(i)] for i in groups[0, 0]], packed, cfg).input_ids.shape[1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16, 20])
    parser.add_argument("--budget", type=int, default=16384, help="mean tokens per micro-batch")
    parser.add_argument("--steps", type=int, default=3, help="steps (micro-batches per rank) per row")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--dp", type=int, default=4)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/omnibal_lengths")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = model_config()
    torch.manual_seed(0)
    model = VLM(cfg).to(device)
    stats = real_statistics(args.data)
    print(f"model: tiny with {TILE_SIZE} px tiles ({cfg.tokens_per_tile} tokens/tile, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), {device.type}; micro-batches of "
          f"~{args.budget} tokens; {args.steps} steps; DP={args.dp} simulated; ms per sample, fastest of {args.reps}")
    rows = []
    for tiles in [*args.tiles, None]:
        rows.append(measure_row(model, cfg, stats, tiles, args, device))
        if len(rows) == 1:  # the first row also warmed the allocator: measure it again
            rows[0] = measure_row(model, cfg, stats, tiles, args, device)
    print(f"{'tiles':>6}{'img tok':>9}{'smp/mb':>8}{'L on':>8}{'L off':>8}{'off ms':>9}{'on ms':>9}{'off/on':>8}"
          f"{'DP off':>9}{'DP on':>9}{'off/on':>8}")
    for r in rows:
        image_tokens = r["tiles"] * cfg.tokens_per_tile if r["tiles"] != "mixed" else "-"
        print(f"{r['tiles']!s:>6}{image_tokens!s:>9}{r['samples']:>8}{r['on_tokens']:>8}{r['off_tokens']:>8}"
              f"{r['off_one']:>9.2f}{r['on_one']:>9.2f}{r['off_one'] / r['on_one']:>8.2f}"
              f"{r['off_dp']:>9.2f}{r['on_dp']:>9.2f}{r['off_dp'] / r['on_dp']:>8.2f}")


if __name__ == "__main__":
    main()
