"""Scale of the balance core: grouping and step forming of millions of samples at DP up to 1,024; the sampler's
memory per rank and its cost per step.

    .venv/bin/python scripts/bench_scale.py [--sizes 1200000 10000000] [--dp 1024] [--vit-cap 18] [--token-cap 5280]
        [--step-ms 10]

Samples are resampled (seeded, with replacement) from the four real statistics files. Each phase runs in a
fresh process, so its peak memory is its own: ``peak MB`` = the process's peak resident set minus its resident
set just before the phase (the length table already loaded). Phases:

- ``group``: ``group_samples`` with ``balanced`` at fixed caps (what ``omnibal-balance`` reports as
  ``seconds_grouping``); baseline in the same run: ``random`` (a permutation cut into 4-sample groups);
- ``steps``: ``arrange_steps`` (matched) of those groups into steps of ``dp`` ranks;
- ``fitted``: the same under ``cost=fitted`` (``arrange`` with :data:`SCALE_TIME_MODEL`): groups sorted by modelled
  seconds, then samples exchanged between the ranks of every step (``balance.exchange_sweeps``, default 8);
- ``sampler``: what one DP rank of a ``dp``-rank run does: ``BalancedSampler.arrangement`` (grouping + steps
  of the epoch) and then the whole epoch of its ``BalancedBatchSampler``; per-step cost = that iteration's
  time / steps. Baseline: torch's ``BatchSampler(DistributedSampler)`` over the same samples for the same
  rank, 4 samples per batch;
- ``next_epoch``: the same rank trains epoch 0 (each step simulated by ``--step-ms`` of sleep, while epoch 1's
  arrangement is built in the background), then epoch 1: per-step cost = the time spent inside the batch
  sampler over epoch 1 (its start included) / its steps, what the training loop waits for.

Times are single runs, one thread: wall clock and the phase's CPU time (user + system; on a loaded
shared machine the CPU time is the steadier figure).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from pathlib import Path


DATA = Path(__file__).resolve().parents[2] / "shared/data/omnibal_lengths"
# the shape of bench_train's internvl_100m fit on CPU (s per tile, token, squared length, sample)
SCALE_TIME_MODEL = [0.24, 2.9e-3, 5.6e-6, 0.165]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sampler_seconds(batches) -> tuple[float, int]:
    """Seconds spent inside ``next()`` of a batch sampler over one epoch (its start included), and its items."""
    it, spent, count = iter(batches), 0.0, 0
    while True:
        start = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            return spent + time.perf_counter() - start, count
        spent += time.perf_counter() - start
        count += 1


def phase(name: str, n: int, dp: int, vit_cap: int, token_cap: int, step_ms: float, out: mp.Queue) -> None:
    from omnibal_pl.balance import BalanceConfig, TimeModel, arrange, arrange_steps, group_samples
    from omnibal_pl.balance.sampler import BalancedBatchSampler, BalancedSampler
    from omnibal_pl.lengths import load_lengths

    table = load_lengths(sorted(DATA.glob("*.json"))).resample(n, seed=0)
    cfg = BalanceConfig(dp=dp, vit_cap=vit_cap, token_cap=token_cap)
    grouping = group_samples(table, cfg) if name in ("steps", "fitted") else None
    before, cpu = rss_mb(), cpu_seconds()
    start = time.perf_counter()
    extra = {}
    if name == "group":
        groups = len(group_samples(table, cfg))
        extra = {"groups": groups}
    elif name == "random":
        group_samples(table, BalanceConfig(algorithm="random", dp=dp))
    elif name == "steps":
        extra = {"steps": arrange_steps(table, grouping, cfg).num_steps}
    elif name == "fitted":
        extra = {"steps": arrange(table, grouping, cfg, time_model=TimeModel(SCALE_TIME_MODEL))[1].num_steps}
    elif name == "sampler":
        sampler = BalancedSampler(table, cfg, dp_rank=dp - 1, dp_size=dp)
        steps = sampler.arrangement(0).steps.num_steps
        built = time.perf_counter()
        count = sum(1 for _ in BalancedBatchSampler(sampler))
        extra = {"build_s": built - start, "per_step_ms": 1e3 * (time.perf_counter() - built) / count, "steps": steps}
    elif name == "next_epoch":
        sampler = BalancedSampler(table, cfg, dp_rank=dp - 1, dp_size=dp)
        for _ in BalancedBatchSampler(sampler):
            time.sleep(step_ms / 1e3)  # a training step; epoch 1 is built meanwhile
        sampler.set_epoch(1)
        start, cpu = time.perf_counter(), cpu_seconds()  # the phase reports epoch 1 alone
        spent, count = sampler_seconds(BalancedBatchSampler(sampler))
        extra = {"per_step_ms": 1e3 * spent / count, "steps": count}
    elif name == "torch":
        import torch
        from torch.utils.data import BatchSampler, DistributedSampler

        sampler = DistributedSampler(range(n), num_replicas=dp, rank=dp - 1, shuffle=True, seed=0)
        count = sum(1 for _ in BatchSampler(sampler, 4, drop_last=False))
        extra = {"per_step_ms": 1e3 * (time.perf_counter() - start) / count, "torch": torch.__version__}
    out.put({"phase": name, "seconds": time.perf_counter() - start, "cpu_s": cpu_seconds() - cpu,
             "peak_mb": peak_mb() - before, **extra})


def run(name: str, n: int, args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=phase, args=(name, n, args.dp, args.vit_cap, args.token_cap, args.step_ms, out))
    p.start()
    result = out.get()
    p.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_200_000, 10_000_000])
    parser.add_argument("--dp", type=int, default=1024)
    parser.add_argument("--vit-cap", type=int, default=18)
    parser.add_argument("--token-cap", type=int, default=5280)
    parser.add_argument("--step-ms", type=float, default=10.0, help="simulated training step (next_epoch phase)")
    args = parser.parse_args()
    print(f"caps {args.vit_cap} tiles / {args.token_cap} tokens, DP={args.dp}; peak MB = phase's own peak RSS")
    print(f"{'samples':>12}{'phase':>12}{'seconds':>10}{'CPU s':>8}{'peak MB':>10}  detail")
    for n in args.sizes:
        for name in ("group", "random", "steps", "fitted", "sampler", "next_epoch", "torch"):
            r = run(name, n, args)
            detail = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                               if k not in ("phase", "seconds", "cpu_s", "peak_mb"))
            print(f"{n:>12,}{name:>12}{r['seconds']:>10.2f}{r['cpu_s']:>8.2f}{r['peak_mb']:>10.0f}  {detail}", flush=True)


if __name__ == "__main__":
    main()
