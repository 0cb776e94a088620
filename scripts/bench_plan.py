"""Benchmark of the pipeline planner (issue 5): searched plan vs exact optimum vs baselines, search time,
and the Dynamic-LLaVA training/inference cost, all from the cost model on the H100 80GB preset.

    .venv/bin/python scripts/bench_plan.py [--micro-batches 8] [--dp 8] [--device h100_80gb]

Shapes: the balance core's caps (``balanced`` search, DP=``--dp``, 4 samples per micro-batch) on the four
real statistics files. The fp32 AdamW state is sharded over the DP ranks (ZeRO-1, as InternVL-Chat-V1.5
is trained); without that a 26B model does not fit 4 stages of 80 GB at all. Baselines run with global
full recomputation; "speedup" is the baseline's simulated step time over the searched plan's.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import time
from pathlib import Path


from omnibal_pl.balance import BalanceConfig, resolve_caps
from omnibal_pl.lengths import load_lengths
from omnibal_pl.model import VLMConfig
from omnibal_pl.batch import MicroBatchShape
from omnibal_pl.conf import preset
from omnibal_pl.plan import (PipelineConfig, exact_partition, make_plan, planning_inputs, search_partition)
from omnibal_pl.plan.cost_model import cost_model_profile, total_forward_flops
from omnibal_pl.plan.report import compare
from omnibal_pl.plan.synthetic import GIB, synthetic_profile

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "omnibal_lengths"


def load(name: str) -> VLMConfig:
    return VLMConfig.from_dict(preset("model", name))


def compare_models(vit_cap: int, token_cap: int, args: argparse.Namespace) -> None:
    print(f"\n## Searched vs exact vs baselines ({args.device}, {args.micro_batches} micro-batches, 1F1B, "
          f"dp={args.dp}, micro-batch {vit_cap} tiles x {token_cap} tokens)")
    head = (f"{'model':20s} {'pp':>2s} {'searched s':>10s} {'exact s':>9s} {'gap':>7s} {'vs uniform':>10s} "
            f"{'vs params':>10s} {'vs titan':>10s} {'search s':>8s} {'exact s':>8s}  recompute (attn/full of blocks)")
    print(head)
    for name, pp in (("internvl_chat_v1_5", 4), ("internvl2_8b", 2), ("internvl2_8b", 4), ("llava_1_5_7b", 2),
                     ("llava_1_5_7b", 4)):
        inputs = planning_inputs(load(name), pp, args.micro_batches, vit_cap, token_cap, dp=args.dp, device=args.device,
                                 zero=args.zero)
        start = time.perf_counter()
        searched = search_partition(inputs.profile, inputs.config)
        search_s = time.perf_counter() - start
        start = time.perf_counter()
        exact = exact_partition(inputs.profile, inputs.config, incumbent=searched)
        exact_s = time.perf_counter() - start
        rows = {r.name.split(" +")[0]: r for r in compare(inputs, searched)[3:]}

        def speedup(key: str) -> str:
            row = rows[key]
            return f"{row.scored.step_s / searched.step_s:9.3f}x" if row.scored else f"{'no fit':>10s}"

        gap = searched.step_s / exact.step_s - 1
        modes = searched.modes
        print(f"{name:20s} {pp:2d} {searched.step_s:10.4f} {exact.step_s:9.4f} {gap:7.2%} {speedup('uniform')} "
              f"{speedup('parameters')} {speedup('torchtitan')} {search_s:8.2f} {exact_s:8.2f}  "
              f"{modes.count('attention')}/{modes.count('full')} of {len(modes)}")
        for row in rows.values():
            if row.scored is None:
                print(f"{'':23s}{row.name}: {row.error}")


def search_time(args: argparse.Namespace, vit_cap: int, token_cap: int) -> None:
    print("\n## Search time, 8 stages")
    profile = synthetic_profile(30, 66, seed=0)
    config = PipelineConfig(pp=8, micro_batches=16, hop_s=1e-3, memory_budget_bytes=40 * GIB)
    start = time.perf_counter()
    search_partition(profile, config)
    print(f"synthetic, {len(profile.blocks)} blocks, 8 stages x 16 micro-batches, 40 GiB: {time.perf_counter() - start:.2f} s")
    inputs = planning_inputs(load("internvl_chat_v1_5"), 8, 16, vit_cap, token_cap, dp=args.dp, device=args.device,
                             zero=args.zero)
    start = time.perf_counter()
    search_partition(inputs.profile, inputs.config)
    print(f"internvl_chat_v1_5, {len(inputs.profile.blocks)} blocks, 8 stages x 16 micro-batches: "
          f"{time.perf_counter() - start:.2f} s")


def sparsify(args: argparse.Namespace, token_cap: int) -> None:
    off = load("llava_1_5_7b")
    on = dataclasses.replace(off, sparsify=dataclasses.replace(off.sparsify, enabled=True))
    tiles = 4  # LLaVA-1.5: one 576-token image per sample, 4 samples per micro-batch
    shape = MicroBatchShape(tiles, token_cap, 4)
    print(f"\n## Dynamic-LLaVA on llava_1_5_7b ({tiles} images x 576 tokens in {token_cap} tokens, {args.device}, "
          f"4 stages x {args.micro_batches} micro-batches)")
    print(f"{'sparsify':10s} {'train step s':>12s} {'prefill TFLOPs':>14s} {'prefill ms':>10s}")
    results = {}
    for cfg in (off, on):
        plan = make_plan(cfg, 4, args.micro_batches, tiles, token_cap, dp=args.dp, device=args.device,
                         zero=args.zero, samples=4)
        prefill = cost_model_profile(cfg, shape, args.device, phase="prefill")
        flops = total_forward_flops(cfg, shape, "prefill")
        seconds = sum(b.forward_s for b in prefill.blocks)
        results[cfg.sparsify.enabled] = (plan.predicted_step_s, flops, seconds)
        label = "dynamic" if cfg.sparsify.enabled else "off"
        print(f"{label:10s} {plan.predicted_step_s:12.4f} {flops / 1e12:14.2f} {seconds * 1e3:10.2f}")
    (t0, f0, s0), (t1, f1, s1) = results[False], results[True]
    print(f"training step {t1 / t0:.3f}x (masked eager attention, nothing removed); "
          f"prefill FLOPs {f1 / f0:.3f}x, prefill time {s1 / s0:.3f}x (kept image tokens from layer 2 on)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--dp", type=int, default=8)
    parser.add_argument("--zero", type=int, default=1, help="ZeRO level the memory model splits state by (1: optimizer over DP)")
    parser.add_argument("--device", default="h100_80gb")
    args = parser.parse_args()
    table = load_lengths(sorted(glob.glob(str(DATA / "*.json"))))
    caps = resolve_caps(table, BalanceConfig(dp=args.dp, samples_per_group=4))
    print(f"balance core caps on {len(table):,} real samples (dp={args.dp}, 4 per group): "
          f"{caps.vit_cap} tiles, {caps.token_cap} tokens ({caps.seconds:.1f} s)")
    compare_models(caps.vit_cap, caps.token_cap, args)
    search_time(args, caps.vit_cap, caps.token_cap)
    sparsify(args, caps.token_cap)


if __name__ == "__main__":
    main()
