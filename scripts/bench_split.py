"""Does a micro-batch cost the sum of its parts? The same samples run as one micro-batch and as two.

    .venv/bin/python scripts/bench_split.py [--model internvl_100m] [--halves 1 2] [--pairs 4] [--reps 3]
        [--samples 96] [--text-scale 0.25] [--device cpu] [--threads N] [--allocator system|heap]

The time model ``balance.cost=fitted`` balances by (:class:`~omnibal_pl.balance.TimeModel`) is additive: a
micro-batch costs the sum of its samples' terms plus a fixed cost >= 0, so under it two micro-batches A and B never
cost less than the one micro-batch A + B. If the machine charges more per unit of work in a larger micro-batch (a
CPU's caches, say), A + B costs more than A and B apart, and a sampler of small micro-batches runs cheaper per
sample than the model prices it; where a fixed per-micro-batch cost dominates (kernel launches on a GPU), less.

For each ``--halves`` size h: ``--pairs`` pairs of disjoint random sets of h samples from bench_train's synthetic
data (``--samples``, ``--text-scale``), each pair run as A, B and A + B (packed as bench_train packs), the runs
going round the three ``--reps`` times, the fastest of each counting. Printed per pair: the seconds and
``merged / parts`` = t(A + B) / (t(A) + t(B)), the parts' sum being the baseline from the same runs; per size: the
median and spread over pairs. Above 1: merging costs more than its parts; below 1: a per-micro-batch cost saved.
``--allocator`` as in bench_train: ``heap`` keeps freed memory for reuse, so the two runs tell how much of a ratio
above 1 is glibc mapping large activations afresh on every run.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
import torch

from bench_train import (ALLOCATORS, bench_data, collate_ids, keep_freed_memory, load_model_config,  # this folder
                         time_micro_batch, time_ranks)
from omnibal_pl.errors import OmniBalError
from omnibal_pl.model import VLM


def pair_ids(population: int, half: int, pairs: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """``pairs`` pairs of disjoint sets of ``half`` sample indices below ``population`` (drawn without replacement
    within a pair)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(pairs):
        ids = rng.choice(population, size=2 * half, replace=False).tolist()
        out.append((ids[:half], ids[half:]))
    return out


def merged_over_parts(runs: list[list[float]]) -> float:
    """t(A + B) / (t(A) + t(B)) from the runs of ``[A, B, A + B]`` (seconds per run), each its fastest run."""
    a, b, merged = (min(r) for r in runs)
    return merged / (a + b)


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="internvl_100m")
    parser.add_argument("--halves", type=int, nargs="+", default=[1, 2], help="samples in each of the two parts")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per size")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per micro-batch (the fastest counts)")
    parser.add_argument("--samples", type=int, default=96, help="synthetic samples to draw from")
    parser.add_argument("--text-scale", type=float, default=0.25)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--allocator", choices=ALLOCATORS, default="system",
                        help="CPU memory: glibc's default, or heap: freed memory kept and reused")
    args = parser.parse_args()
    if args.allocator == "heap":
        try:
            keep_freed_memory()
        except OmniBalError as e:
            parser.exit(2, f"{parser.prog}: error: {e}\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_model_config(args.model)
    # bench_data reads the fields bench_train's arguments give it; a split run has one rank and no grouping
    data = bench_data(cfg, argparse.Namespace(samples=args.samples, text_scale=args.text_scale, dp=1))
    torch.manual_seed(0)
    model = VLM(cfg).to(device)
    time_micro_batch(model, collate_ids(data, [0]), device, reps=2)  # allocator and kernel warm-up
    print(f"{args.model} on {device.type}, {args.threads or torch.get_num_threads()} threads, {args.allocator} allocator; "
          f"fastest of {args.reps} runs; merged / parts = t(A + B) / (t(A) + t(B))")
    print(f"{'half':>5}{'pair':>5}{'tiles':>7}{'tokens':>8}{'A s':>8}{'B s':>8}{'A + B s':>9}{'merged / parts':>16}")
    for half in args.halves:
        ratios = []
        for i, (a, b) in enumerate(pair_ids(len(data.lengths), half, args.pairs, seed=half)):
            batches = [collate_ids(data, a), collate_ids(data, b), collate_ids(data, a + b)]
            runs = time_ranks(model, batches, device, args.reps)
            ratios.append(merged_over_parts(runs))
            merged = batches[2]
            print(f"{half:>5}{i:>5}{merged.pixel_values.shape[0]:>7}{merged.num_tokens:>8}"
                  + "".join(f"{min(r):>8.3f}" for r in runs[:2]) + f"{min(runs[2]):>9.3f}{ratios[-1]:>16.3f}")
        print(f"halves of {half}: merged / parts median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}) over {len(ratios)} pairs")


if __name__ == "__main__":
    main()
