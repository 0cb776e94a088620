"""Memory balance benchmark (CPU, gloo): what each rank holds at every built ZeRO level, measured on the real
runtime beside the memory model's prediction, with the step time and the loss after a few steps.

For ``tiny`` and ``internvl_100m`` at pp 1 and 2 with dp 2 and ZeRO 0 to 3, every rank builds its
stages of a uniform plan with :func:`omnibal_pl.parallel.build_pipeline`, trains ``--steps`` AdamW steps on
fixed micro-batches and reports the bytes it holds in parameters, gradients and optimizer state (local
shards) after the last step. The prediction is :func:`omnibal_pl.plan.costs.training_static_bytes`
summed over the stage's blocks at the same level (fp32 parameters, as CPU and bf16-mixed runs keep
them). It is the planner's figure for the step, so at ZeRO 2 it counts whole parameters, which FSDP2
holds only from forward to backward: between steps they are sharded as at ZeRO 3, and the measured
bytes are lower by the parameters' (dp - 1) / dp. The loss after the last step must be equal across ZeRO
levels (same data, same seed). Activation memory is not measured here.

    python scripts/bench_memory.py                     # both models
    python scripts/bench_memory.py --models tiny --steps 3
    python scripts/bench_memory.py --cross-entropy     # the loss alone: chunked vs plain fp32 upcast

``--cross-entropy`` measures the loss's forward + backward on bf16 logits [1, L, vocab] in a fresh process
per variant, as the growth of the process's peak resident memory (``ru_maxrss``) over the logits and
their gradient: the chunked loss of :mod:`omnibal_pl.train.objective` against the plain
``F.cross_entropy(logits.float())`` it replaced, same loss value.
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
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.optim import ZeroRedundancyOptimizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnibal_pl.conf import preset  # noqa: E402
from omnibal_pl.model import VLMConfig, dummy_batch  # noqa: E402
from omnibal_pl.parallel import build_mesh, build_pipeline, initial_state_dict  # noqa: E402
from omnibal_pl.parallel.dcp import state_holder  # noqa: E402
from omnibal_pl.parallel.sharding import local_tensor  # noqa: E402
from omnibal_pl.plan import uniform_plan  # noqa: E402
from omnibal_pl.plan.cost_model import block_parameters  # noqa: E402
from omnibal_pl.plan.costs import ZeroSharding, training_static_bytes  # noqa: E402
from omnibal_pl.train.objective import packed_loss_sum  # noqa: E402

MIB = 2**20
DP = 2
VIT_CAP, TOKEN_CAP = 2, 128


def loss_fn(logits: torch.Tensor, batch) -> torch.Tensor:
    loss_sum, weight = packed_loss_sum(logits, batch)
    return loss_sum / weight.clamp(min=1)


def micro_batches(cfg: VLMConfig, count: int, offset: int) -> list:
    tokens = max(1, (TOKEN_CAP - cfg.tokens_per_tile) // 2 - 1)
    return [dummy_batch(cfg, [tokens, tokens], [1, 0], token_cap=TOKEN_CAP, vit_cap=VIT_CAP, seed=offset + k)
            for k in range(count)]


def predicted_bytes(cfg: VLMConfig, stage_blocks: list[str], zero: int) -> int:
    """The memory model's parameter + gradient + AdamW bytes of one rank holding these blocks."""
    params = dict(block_parameters(cfg))
    return sum(sum(training_static_bytes(params[n], 4, ZeroSharding(zero, DP))) for n in stage_blocks)


def _worker(rank: int, world: int, port: int, out: str, cfg: VLMConfig, pp: int, zero: int, steps: int) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        mesh, dims = build_mesh(pp)
        m = 2 * pp
        plan = uniform_plan(cfg, pp, m, VIT_CAP, TOKEN_CAP, dp=DP, zero=zero)
        runner = build_pipeline(cfg, plan, mesh, initial_state_dict(cfg, 0), loss_fn)
        params = list(runner.parameters())
        opt = (ZeroRedundancyOptimizer(params, torch.optim.AdamW, process_group=runner.dp_group, lr=1e-3) if zero == 1
               else torch.optim.AdamW(params, lr=1e-3))
        times, loss = [], 0.0
        for step in range(steps):
            batches = micro_batches(cfg, DP * m, 100 * step)[dims.dp_rank * m:(dims.dp_rank + 1) * m]
            dist.barrier()
            start = time.perf_counter()
            opt.zero_grad()
            loss = float(runner.train_step(batches))
            opt.step()
            times.append(time.perf_counter() - start)
        parts = {"params": params, "grads": [p.grad for p in params if p.grad is not None],
                 "optimizer": [v for p in params for v in state_holder(opt).state.get(p, {}).values() if v.dim() > 0]}
        held = {k: sum(local_tensor(t).numel() * t.element_size() for t in ts) for k, ts in parts.items()}
        blocks = [n for s in plan.stages_of_rank(dims.pp_rank) for n in plan.stages[s]]
        torch.save({"rank": rank, "held": held, "predicted": predicted_bytes(cfg, blocks, zero),
                    "step_s": statistics.median(times[1:] or times), "loss": loss}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def measure(cfg: VLMConfig, pp: int, zero: int, steps: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = pp * DP
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, port, tmp, cfg, pp, zero, steps), nprocs=world, start_method="spawn",
                           join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


def _cross_entropy_peak(variant: str, tokens: int, vocab: int) -> None:
    """Child process: prints the peak RSS growth (MiB) of one loss forward + backward, and the loss."""
    import resource

    import torch.nn.functional as F

    from omnibal_pl.batch import PackedBatch

    torch.manual_seed(0)
    logits = torch.randn(1, tokens, vocab, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))
    batch = PackedBatch(input_ids=labels, labels=labels, position_ids=torch.arange(tokens)[None],
                        cu_seqlens=torch.tensor([0, tokens], dtype=torch.int32), max_seqlen=tokens,
                        pixel_values=torch.zeros(1, 3, 8, 8), image_flags=torch.zeros(1, dtype=torch.int64),
                        loss_weight=torch.ones(1, tokens), sample_ids=torch.zeros(1, dtype=torch.int64), num_samples=1)
    logits.grad = torch.zeros_like(logits)  # the gradient buffer both variants must fill: not counted
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if variant == "chunked":
        loss_sum, weight = packed_loss_sum(logits, batch)
    else:
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="none")
        loss_sum, weight = ce.sum(), torch.tensor(float(tokens - 1))
    (loss_sum / weight).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(f"{peak / 1024:.0f} {float(loss_sum / weight):.6f}")


def cross_entropy_table() -> None:
    import subprocess

    print(f"{'L x vocab':>16s} {'logits MiB':>10s} {'plain MiB':>10s} {'chunked MiB':>11s} {'ratio':>6s}  loss (equal)")
    for tokens, vocab in ((2048, 32000), (4096, 92544)):
        out = {}
        for variant in ("plain", "chunked"):
            res = subprocess.run([sys.executable, __file__, "--ce-child", variant, str(tokens), str(vocab)],
                                 capture_output=True, text=True, check=True)
            peak, loss = res.stdout.split()
            out[variant] = (float(peak), loss)
        logits_mib = tokens * vocab * 2 / MIB
        print(f"{f'{tokens} x {vocab}':>16s} {logits_mib:>10.0f} {out['plain'][0]:>10.0f} {out['chunked'][0]:>11.0f} "
              f"{out['chunked'][0] / out['plain'][0]:>6.2f}  {out['plain'][1]} / {out['chunked'][1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "internvl_100m"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cross-entropy", action="store_true", help="measure the loss alone (see the docstring)")
    parser.add_argument("--ce-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.ce_child:
        _cross_entropy_peak(args.ce_child[0], int(args.ce_child[1]), int(args.ce_child[2]))
        return
    if args.cross_entropy:
        cross_entropy_table()
        return
    print(f"dp={DP}, micro-batch {VIT_CAP} tiles x {TOKEN_CAP} tokens, AdamW fp32, gloo on CPU, {args.steps} steps; "
          "per rank: parameters + gradients + optimizer state (local shards)")
    print(f"{'model':15s} {'pp':>2s} {'zero':>4s} {'measured MiB':>12s} {'predicted MiB':>13s} {'error':>7s} "
          f"{'vs zero 0':>9s} {'step s':>7s} {'loss':>8s}")
    for name in args.models:
        cfg = VLMConfig.from_dict(preset("model", name))
        for pp in (1, 2):
            base = None
            for zero in (0, 1, 2, 3):
                ranks = measure(cfg, pp, zero, args.steps)
                worst = max(ranks, key=lambda r: sum(r["held"].values()))
                held, predicted = sum(worst["held"].values()), worst["predicted"]
                base = base or held
                print(f"{name:15s} {pp:>2d} {zero:>4d} {held / MIB:>12.2f} {predicted / MIB:>13.2f} "
                      f"{100 * (predicted - held) / held:>+6.1f}% {held / base:>9.3f} "
                      f"{max(r['step_s'] for r in ranks):>7.3f} {ranks[0]['loss']:>8.5f}")


if __name__ == "__main__":
    main()
