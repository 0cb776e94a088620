"""Pipeline step time on CPU (gloo): the planner's searched partition vs the uniform split, measured
beside the simulator's prediction for both.

    .venv/bin/python scripts/bench_pipeline.py                  # PP=2, 8 micro-batches, 1F1B
    .venv/bin/python scripts/bench_pipeline.py --steps 10 --threads 1

The model is tiny-but-not-trivial and deliberately heterogeneous (a ViT with cheap wide-patch blocks,
an LLM with heavier layers and a large-vocabulary head), so block counts and block costs disagree.
Steps: profile every block here (the planner's ``profile`` source, one thread per process as the
pipeline ranks run), search the partition (:func:`omnibal_pl.plan.search_partition`), score the uniform
split (equal block counts, DeepSpeed's ``uniform``) with the same simulator, then time both layouts
with the real runtime: ``pp`` gloo processes, :func:`omnibal_pl.parallel.build_pipeline`, one
``train_step`` + SGD step per step; the step time is the slowest rank's median over the timed steps.
The simulator assumes no cost between stages (``hop_s = 0`` on one machine); the gloo send/recv cost
shows up in the prediction error.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnibal_pl.conf import preset  # noqa: E402
from omnibal_pl.model import VLMConfig, dummy_batch  # noqa: E402
from omnibal_pl.train.objective import packed_loss_sum  # noqa: E402
from omnibal_pl.plan import evaluate_partition, plan_from_partition, planning_inputs, search_partition  # noqa: E402
from omnibal_pl.parallel import build_mesh, build_pipeline, initial_state_dict  # noqa: E402
from omnibal_pl.plan import Plan  # noqa: E402



def bench_model() -> VLMConfig:
    """tiny.yaml scaled up: 4 ViT blocks (112 px tiles), 6 LLM layers, 8k vocabulary."""
    data = preset("model", "tiny")
    data["name"] = "bench_pipeline"
    data["vision"].update(image_size=112, width=128, depth=4, heads=4, mlp_dim=512)
    data["llm"].update(vocab_size=8192, hidden=256, layers=6, heads=8, kv_heads=4, intermediate=1024)
    return VLMConfig.from_dict(data)


def micro_batches(cfg: VLMConfig, m: int, tiles: int, tokens: int, samples: int) -> list:
    """``m`` micro-batches of ``samples`` samples, each padded to the caps (the shape the plan assumes)."""
    per_tiles = max(1, tiles // samples)
    text = max(1, (tokens - samples * per_tiles * cfg.tokens_per_tile) // samples - 1)
    return [dummy_batch(cfg, [text] * samples, [per_tiles] * samples, token_cap=tokens, vit_cap=tiles, seed=k)
            for k in range(m)]


def loss_fn(logits: torch.Tensor, batch) -> torch.Tensor:
    loss_sum, weight = packed_loss_sum(logits, batch)
    return loss_sum / weight.clamp(min=1)


def _worker(rank: int, world: int, port: int, out: str, cfg: VLMConfig, plan: Plan, shape: tuple[int, int, int],
            steps: int, warmup: int, threads: int) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        mesh, _ = build_mesh(world)
        runner = build_pipeline(cfg, plan, mesh, initial_state_dict(cfg, 0), loss_fn)
        opt = torch.optim.SGD(list(runner.parameters()), lr=1e-3)
        batches = micro_batches(cfg, plan.micro_batches, *shape)
        times = []
        for step in range(warmup + steps):
            dist.barrier()
            start = time.perf_counter()
            opt.zero_grad()
            runner.train_step(batches)
            opt.step()
            elapsed = torch.tensor(time.perf_counter() - start)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank is done
            if step >= warmup:
                times.append(float(elapsed))
        if rank == 0:
            torch.save(times, out)
    finally:
        dist.destroy_process_group()


def measure(cfg: VLMConfig, plan: Plan, shape: tuple[int, int, int], steps: int, warmup: int, threads: int) -> list[float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        mp.start_processes(_worker, args=(plan.pp, port, out, cfg, plan, shape, steps, warmup, threads), nprocs=plan.pp,
                           start_method="spawn", join=True)
        return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--vit-cap", type=int, default=8, help="tiles per micro-batch")
    parser.add_argument("--token-cap", type=int, default=768, help="tokens per micro-batch")
    parser.add_argument("--samples", type=int, default=4, help="samples per micro-batch")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per layout")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (profile and ranks)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = bench_model()
    inputs = planning_inputs(cfg, args.pp, args.micro_batches, args.vit_cap, args.token_cap, device="local",
                             source="profile", samples=args.samples, precision="32-true")
    profile, config = inputs.profile, inputs.config
    blocks = [(b.name, b.forward_s + b.backward_s) for b in profile.blocks]
    print(f"model {cfg.name}: {len(blocks)} blocks; profiled forward+backward per block (ms):")
    print("  " + ", ".join(f"{n} {t * 1e3:.1f}" for n, t in blocks))
    n, pp = len(blocks), args.pp
    uniform_bounds = [k * (n // pp) + min(k, n % pp) for k in range(pp + 1)]
    scored = {"searched": search_partition(profile, config), "uniform": evaluate_partition(profile, config, uniform_bounds)}
    shape = (args.vit_cap, args.token_cap, args.samples)
    rows = []
    for name, part in scored.items():
        plan = plan_from_partition(cfg, inputs, part)
        times = measure(cfg, plan, shape, args.steps, args.warmup, args.threads)
        measured = statistics.median(times)
        rows.append((name, [len(s) for s in plan.stages], plan.predicted_step_s, measured, min(times), max(times)))
    print(f"\nPP={pp}, {args.micro_batches} micro-batches of {args.vit_cap} tiles / {args.token_cap} tokens, 1F1B, "
          f"gloo on CPU, {args.threads} thread(s) per rank, median of {args.steps} steps")
    print(f"{'layout':<10}{'blocks/stage':<14}{'predicted s':>12}{'measured s':>12}{'(min-max)':>18}{'error %':>9}")
    for name, sizes, pred, meas, lo, hi in rows:
        print(f"{name:<10}{str(sizes):<14}{pred:>12.4f}{meas:>12.4f}{f'({lo:.4f}-{hi:.4f})':>18}"
              f"{100 * (pred - meas) / meas:>+9.1f}")
    (_, _, pred_s, meas_s, _, _), (_, _, pred_u, meas_u, _, _) = rows
    print(f"\nsearched vs uniform: measured {meas_u / meas_s:.2f}x faster, predicted {pred_u / pred_s:.2f}x")


if __name__ == "__main__":
    main()
