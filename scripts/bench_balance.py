"""Benchmark of the grouping algorithms on the real statistics and on a 1.2M-sample resample.

    .venv/bin/python scripts/bench_balance.py [--data ../shared/data/omnibal_lengths] [--big 1200000]
        [--time-model time_model.json] [--micro-batches 1] [--time-dps 8 32 64]

For each data set: caps searched once on the 70k real set (ISF: the published search; balanced: ours; the
packers take balanced's token cap), then every algorithm grouped at DP=8 with ``--micro-batches`` groups
per rank per step (DistTrain's LPT deal only differs from random with more than one), plus the pure-Python
ISF reference on the same input (its groups must equal the C++ ones). Prints one table per data set and the
C++/Python ISF speed ratio. Times are single-threaded wall clock on this machine.

With ``--time-model`` (a fitted micro-batch time model, e.g. from ``bench_train.py --save-time-model``):
every row also reports the modelled rank-time balance (time dist ratio, max/mean rank time), a
``balanced (fitted)`` row forms its steps on that model, and a last table gives max/mean modelled rank
time of every algorithm on the real statistics at each DP of ``--time-dps``. ``--flops-model PRESET``
instead fits the time model to a model preset's training FLOPs (``omnibal_pl.model.flops.train_flops``) of
random micro-batches of the real statistics: a noise-free stand-in for measured times, in units of
1e15 FLOPs; written to ``--time-model`` when both are given.

``--qwen N`` (default 1.2M; 0 skips) adds Qwen2-VL-style tables (vision in merge blocks,
``omnibal_pl/balance/qwen_lengths.py``) at Qwen's default max_pixels and at ``28*28*576``: caps searched on 70k
rows of each, then ``balanced`` (quantum from the data), ISF with the same caps (its published search cannot
step merge blocks), LLaMA-Factory's knapsack and random on N rows, after the tile tables of the same run.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from omnibal_pl.balance import (BalanceConfig, TimeModel, arrange, balance_metrics, fit_time_model, group_samples,
                                isf_reference, resolve_caps)
from omnibal_pl.balance.cost import steps_weight
from omnibal_pl.balance.qwen_lengths import qwen_style_lengths
from omnibal_pl.balance.search import resolve_shape
from omnibal_pl.image_grid import MAX_PIXELS
from omnibal_pl.lengths import LengthTable, load_lengths

COLUMNS = (("seconds", "time s", "{:.3f}"), ("groups", "groups", "{:,}"), ("avg_group_size", "per group", "{:.2f}"),
           ("samples_lost", "lost", "{:,}"), ("vit_dist_ratio", "vit dist", "{:.4f}"),
           ("llm_dist_ratio", "llm dist", "{:.4f}"), ("pad_ratio", "pad", "{:.4f}"), ("vit_fill", "vit fill", "{:.3f}"),
           ("token_fill", "tok fill", "{:.3f}"), ("groups_vs_lower_bound", "grp/LB", "{:.4f}"),
           ("time_dist_ratio", "t dist", "{:.4f}"), ("max_mean_time", "t max/mn", "{:.4f}"))


def timed(fn, repeats: int = 1):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def row(name: str, table: LengthTable, cfg: BalanceConfig, repeats: int, model: TimeModel | None = None) -> dict:
    """Grouping time (best of ``repeats``) and the metrics; modelled rank times under ``model`` when given."""
    grouping, seconds = timed(lambda: group_samples(table, cfg), repeats)
    grouping, steps = arrange(table, grouping, cfg, time_model=steps_weight(cfg, model))
    m = balance_metrics(table, grouping, steps, model)
    m.update(name=name, seconds=seconds)
    return m


def algorithms(isf: BalanceConfig, bal: BalanceConfig, base: BalanceConfig) -> list[tuple[str, BalanceConfig]]:
    """The compared settings: ours (counts, and fitted when ``base`` names a model), ISF both ways, the baselines."""
    fitted = base.time_model is not None
    rows = [("balanced (ours, C++)", bal)]
    if fitted:
        rows.append(("balanced (ours, fitted)", replace(bal, cost="fitted")))
    packers = replace(base, token_cap=bal.token_cap)
    return rows + [
        ("isf (C++, Megatron steps)", isf),
        ("isf (C++, matched steps)", replace(isf, step_order="matched")),
        ("disttrain (LPT)", replace(base, algorithm="disttrain", cost="fitted" if fitted else "counts")),
        ("llamafactory (knapsack)", replace(packers, algorithm="llamafactory")),
        ("swift (binpacking)", replace(packers, algorithm="swift")),
        ("random", replace(base, algorithm="random")),
        ("length_grouped", replace(base, algorithm="length_grouped")),
    ]


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'algorithm':<28}" + "".join(f"{label:>10}" for _, label, _ in COLUMNS))
    for r in rows:
        print(f"{r['name']:<28}" + "".join(f"{fmt.format(r[k]) if k in r else '-':>10}" for k, _, fmt in COLUMNS))


def bench(table: LengthTable, title: str, isf: BalanceConfig, bal: BalanceConfig, base: BalanceConfig,
          python_reference: bool, model: TimeModel | None) -> None:
    repeats = 3 if len(table) < 200_000 else 1
    rows = [row(name, table, cfg, repeats, model) for name, cfg in algorithms(isf, bal, base)]
    if python_reference:
        ref, seconds = timed(lambda: isf_reference(table.vit.tolist(), table.tokens.tolist(), isf.vit_cap,
                                                   isf.token_cap, isf.token_cap - 128, isf.iterations, isf.seed))
        cpp = group_samples(table, isf)
        same = [cpp.group(k).tolist() for k in range(len(cpp))] == ref
        isf_row = next(r for r in rows if r["name"].startswith("isf (C++, Megatron"))
        rows.append({**isf_row, "name": "isf (Python reference)", "seconds": seconds})
        print_table(title, rows)
        print(f"C++ ISF vs Python reference: {seconds / isf_row['seconds']:.0f}x faster, identical groups: {same}")
    else:
        print_table(title, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/omnibal_lengths"))
    parser.add_argument("--big", type=int, default=1_200_000, help="size of the resample (0: skip)")
    parser.add_argument("--dp", type=int, default=8)
    parser.add_argument("--samples-per-group", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--micro-batches", type=int, default=1, help="groups per DP rank per step")
    parser.add_argument("--time-model", type=Path, default=None, help="fitted micro-batch time model (JSON)")
    parser.add_argument("--time-dps", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--flops-model", default=None, help="fit the time model to this preset's FLOPs")
    parser.add_argument("--qwen", type=int, default=1_200_000, help="rows of the Qwen-style tables (0: skip)")
    args = parser.parse_args()

    table = load_lengths(sorted(Path(args.data).glob("*.json")))
    if args.flops_model:
        model = flops_time_model(table, args.flops_model)
        args.time_model = args.time_model or Path(tempfile.mkdtemp()) / "flops_time_model.json"
        model.save(args.time_model)
        print(f"time model fitted to {args.flops_model} training FLOPs (1e15 per unit): "
              + ", ".join(f"{c:.3g}" for c in model.coefficients) + " (tiles, tokens, tokens^2, samples)")
    else:
        model = TimeModel.load(args.time_model) if args.time_model else None

    print(f"real statistics: {len(table):,} samples, {table.total_vit:,} tiles, {table.total_tokens:,} tokens "
          f"from {len(table.sources)} files; DP={args.dp}, {args.micro_batches} group(s) per rank per step")
    base = BalanceConfig(dp=args.dp, samples_per_group=args.samples_per_group, seed=args.seed,
                         micro_batches=args.micro_batches, time_model=str(args.time_model) if model else None)
    isf_caps = resolve_caps(table, replace(base, algorithm="isf"))
    bal_caps = resolve_caps(table, base)
    print(f"argument search: isf (published procedure) {isf_caps.seconds:.2f} s -> vit {isf_caps.vit_cap}, "
          f"tokens {isf_caps.token_cap}; balanced {bal_caps.seconds:.2f} s -> vit {bal_caps.vit_cap}, "
          f"tokens {bal_caps.token_cap}  (published search: 22.8 s)")
    isf = replace(base, algorithm="isf", vit_cap=isf_caps.vit_cap, token_cap=isf_caps.token_cap)
    bal = replace(base, vit_cap=bal_caps.vit_cap, token_cap=bal_caps.token_cap)
    bench(table, f"four real files ({len(table):,} samples)", isf, bal, base, python_reference=True, model=model)
    if args.big:
        big = table.resample(args.big, seed=args.seed)
        bench(big, f"seeded resample ({len(big):,} samples), same caps", isf, bal, base, python_reference=True,
              model=model)
    if model is not None:
        time_by_dp(table, isf, bal, base, model, args.time_dps)
    default = replace(isf, vit_cap=9, token_cap=4096)
    d = row("isf at published defaults 9/4096", table, default, 1)
    print_table("published defaults (reference: 43,904 groups, vit dist 0.293, llm dist 0.328)", [d])
    if args.qwen:
        for max_pixels in (MAX_PIXELS, 28 * 28 * 576):
            bench_qwen(args.qwen, max_pixels, base)


def bench_qwen(n: int, max_pixels: int, base: BalanceConfig) -> None:
    """Grouping of a Qwen-style table of ``n`` rows (vision in merge blocks) with caps searched on 70k rows."""
    search_table = qwen_style_lengths(70_000, seed=base.seed, max_pixels=max_pixels)
    start = time.perf_counter()
    bal, _ = resolve_shape(search_table, base)
    searched = time.perf_counter() - start
    table = qwen_style_lengths(n, seed=base.seed + 1, max_pixels=max_pixels)
    print(f"\nQwen-style table, max_pixels {max_pixels:,} ({max_pixels // 784} blocks per image at most): "
          f"{len(table):,} samples, {len(np.unique(table.vit)):,} distinct merge-block counts, mean "
          f"{table.total_vit / len(table):.0f}; balanced search on 70k rows {searched:.2f} s -> vit {bal.vit_cap} "
          f"blocks, tokens {bal.token_cap}, quantum {bal.vit_quantum}")
    configs = [("balanced (ours, C++)", bal),
               ("isf (C++, same caps, matched)", replace(bal, algorithm="isf", step_order="matched")),
               ("llamafactory (knapsack)", replace(base, algorithm="llamafactory", token_cap=bal.token_cap)),
               ("random", replace(base, algorithm="random"))]
    print_table(f"Qwen-style, {len(table):,} samples, DP={base.dp}", [row(name, table, cfg, 1) for name, cfg in configs])


def flops_time_model(table: LengthTable, preset_name: str, groups: int = 400, seed: int = 0) -> TimeModel:
    """The time model fitted to ``preset_name``'s training FLOPs of random groups (1 .. 8 samples) of ``table``."""
    from omnibal_pl.conf import preset
    from omnibal_pl.model import VLMConfig
    from omnibal_pl.model.flops import train_flops

    cfg = VLMConfig.from_dict(preset("model", preset_name))
    rng = np.random.default_rng(seed)
    features, flops = [], []
    for _ in range(groups):
        rows = rng.integers(0, len(table), int(rng.integers(1, 9)))
        lengths = table.tokens[rows].astype(np.int64)
        features.append([table.vit[rows].sum(), lengths.sum(), (lengths**2).sum(), len(rows)])
        flops.append(train_flops(cfg, int(table.vit[rows].sum()), lengths.tolist()) / 1e15)
    return fit_time_model(np.array(features, float), np.array(flops))


def time_by_dp(table: LengthTable, isf: BalanceConfig, bal: BalanceConfig, base: BalanceConfig, model: TimeModel,
               dps: list[int]) -> None:
    """Max/mean modelled rank time per step of every algorithm at each DP (caps as searched for DP=8)."""
    print(f"\nmodelled max/mean rank time per step, real statistics ({base.micro_batches} group(s) per rank per step)")
    print(f"{'algorithm':<28}" + "".join(f"{'DP ' + str(dp):>10}" for dp in dps))
    for name, cfg in algorithms(isf, bal, base):
        cells = [row(name, table, replace(cfg, dp=dp), 1, model)["max_mean_time"] for dp in dps]
        print(f"{name:<28}" + "".join(f"{c:>10.4f}" for c in cells))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
