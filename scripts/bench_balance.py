"""Benchmark of the grouping algorithms on the real statistics and on a 1.2M-sample resample.

    .venv/bin/python scripts/bench_balance.py [--data ../shared/data/omnibal_lengths] [--big 1200000]

For each data set: caps searched once on the 70k real set (ISF: the published search; balanced: ours),
then every algorithm grouped at DP=8 with one group per rank per step, plus the pure-Python ISF
reference on the same input (its groups must equal the C++ ones). Prints one table per data set and the
C++/Python ISF speed ratio. Times are single-threaded wall clock on this machine.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from omnibal_pl.balance import BalanceConfig, balance_metrics, form_steps, group_samples, isf_reference, resolve_caps
from omnibal_pl.lengths import LengthTable, load_lengths

COLUMNS = (("seconds", "time s", "{:.3f}"), ("groups", "groups", "{:,}"), ("avg_group_size", "per group", "{:.2f}"),
           ("samples_lost", "lost", "{:,}"), ("vit_dist_ratio", "vit dist", "{:.4f}"),
           ("llm_dist_ratio", "llm dist", "{:.4f}"), ("pad_ratio", "pad", "{:.4f}"), ("vit_fill", "vit fill", "{:.3f}"),
           ("token_fill", "tok fill", "{:.3f}"), ("groups_vs_lower_bound", "grp/LB", "{:.4f}"))


def timed(fn, repeats: int = 1):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def row(name: str, table: LengthTable, cfg: BalanceConfig, repeats: int) -> dict:
    grouping, seconds = timed(lambda: group_samples(table, cfg), repeats)
    steps = form_steps(*grouping.sums(table), cfg.dp, 1, cfg.resolved_step_order, cfg.seed)
    m = balance_metrics(table, grouping, steps)
    m.update(name=name, seconds=seconds)
    return m


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'algorithm':<28}" + "".join(f"{label:>10}" for _, label, _ in COLUMNS))
    for r in rows:
        print(f"{r['name']:<28}" + "".join(f"{fmt.format(r[k]) if k in r else '-':>10}" for k, _, fmt in COLUMNS))


def bench(table: LengthTable, title: str, isf: BalanceConfig, bal: BalanceConfig, base: BalanceConfig,
          python_reference: bool) -> None:
    repeats = 3 if len(table) < 200_000 else 1
    rows = [
        row("balanced (ours, C++)", table, bal, repeats),
        row("isf (C++, Megatron steps)", table, isf, repeats),
        row("isf (C++, matched steps)", table, replace(isf, step_order="matched"), repeats),
        row("random", table, replace(base, algorithm="random"), repeats),
        row("length_grouped", table, replace(base, algorithm="length_grouped"), repeats),
    ]
    if python_reference:
        ref, seconds = timed(lambda: isf_reference(table.vit.tolist(), table.tokens.tolist(), isf.vit_cap,
                                                   isf.token_cap, isf.token_cap - 128, isf.iterations, isf.seed))
        cpp = group_samples(table, isf)
        same = [cpp.group(k).tolist() for k in range(len(cpp))] == ref
        rows.append({**rows[1], "name": "isf (Python reference)", "seconds": seconds})
        print_table(title, rows)
        print(f"C++ ISF vs Python reference: {seconds / rows[1]['seconds']:.0f}x faster, identical groups: {same}")
    else:
        print_table(title, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/omnibal_lengths"))
    parser.add_argument("--big", type=int, default=1_200_000, help="size of the resample (0: skip)")
    parser.add_argument("--dp", type=int, default=8)
    parser.add_argument("--samples-per-group", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    table = load_lengths(sorted(Path(args.data).glob("*.json")))
    print(f"real statistics: {len(table):,} samples, {table.total_vit:,} tiles, {table.total_tokens:,} tokens "
          f"from {len(table.sources)} files; DP={args.dp}, one group per rank per step")
    base = BalanceConfig(dp=args.dp, samples_per_group=args.samples_per_group, seed=args.seed)
    isf_caps = resolve_caps(table, replace(base, algorithm="isf"))
    bal_caps = resolve_caps(table, base)
    print(f"argument search: isf (published procedure) {isf_caps.seconds:.2f} s -> vit {isf_caps.vit_cap}, "
          f"tokens {isf_caps.token_cap}; balanced {bal_caps.seconds:.2f} s -> vit {bal_caps.vit_cap}, "
          f"tokens {bal_caps.token_cap}  (published search: 22.8 s)")
    isf = replace(base, algorithm="isf", vit_cap=isf_caps.vit_cap, token_cap=isf_caps.token_cap)
    bal = replace(base, vit_cap=bal_caps.vit_cap, token_cap=bal_caps.token_cap)
    bench(table, f"four real files ({len(table):,} samples)", isf, bal, base, python_reference=True)
    if args.big:
        big = table.resample(args.big, seed=args.seed)
        bench(big, f"seeded resample ({len(big):,} samples), same caps", isf, bal, base, python_reference=True)
    default = replace(isf, vit_cap=9, token_cap=4096)
    d = row("isf at published defaults 9/4096", table, default, 1)
    print_table("published defaults (reference: 43,904 groups, vit dist 0.293, llm dist 0.328)", [d])


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
