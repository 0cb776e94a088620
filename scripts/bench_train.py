"""Training throughput at simulated DP: the slowest rank sets the step time, so balance is speed.

    .venv/bin/python scripts/bench_train.py [--models tiny internvl_100m] [--steps 4] [--dp 8]

For each model and sampler (``balanced``, ``isf``, ``random``), one process plays all DP ranks: each
step, every rank's micro-batch (from its own ``OmniBalDataModule``, exactly as in training) really runs
forward + backward in turn and is timed; the step's time is the slowest rank's (what a synchronous
data-parallel step waits for), the ideal is the mean rank's (perfect balance of the same work).
Printed per sampler: mean step time, the ideal, idle fraction (1 - ideal / step), LLM tokens and
samples per step, throughput of the whole simulated DP group in tokens/s and samples/s, and the
speedup over ``random`` in samples/s, i.e. in epoch time (samplers put different amounts of work in a
step, so step times alone do not compare). The ideal (mean-rank time) is the limit balance can reach.

Timing: each micro-batch runs ``--reps`` times and its fastest run counts; on a shared machine that is
the least disturbed one (the median still carries other processes' load).

Data: the synthetic dataset shaped by the embedded real-statistics generator, text scaled by
``--text-scale`` (CPU budget), image tokens = tiles x the model's tokens per tile. Every sampler packs
with ``pad_to=multiple`` (varlen attention over the real tokens), so step times differ only by how the
work is spread. On CUDA (``--device cuda``): bf16 autocast and the fastest attention backend.
"""
from __future__ import annotations

import argparse
import time

import torch

from omnibal_pl.balance import BalanceConfig
from omnibal_pl.data import ModelSpec, OmniBalDataModule, prepare_training_data
from omnibal_pl.batch import PackedBatch
from omnibal_pl.conf import preset
from omnibal_pl.data.datamodule import PackingConfig
from omnibal_pl.model import VLM, VLMConfig
from omnibal_pl.train.objective import packed_loss_sum

ALGORITHMS = ("balanced", "isf", "random")


def load_model_config(name: str) -> VLMConfig:
    return VLMConfig.from_dict(preset("model", name))


def rank_batches(cfg: VLMConfig, algorithm: str, args: argparse.Namespace) -> list[list[PackedBatch]]:
    """``[step][rank]`` packed micro-batches of the first ``args.steps`` steps, one DataModule per DP rank."""
    dataset = {"name": "synthetic", "kind": "synthetic", "paths": [], "text_scale": args.text_scale, "seed": 0,
               "generator": {"samples": args.samples, "seed": 0, "max_tokens": None}}
    balance = BalanceConfig(algorithm=algorithm, dp=args.dp, samples_per_group=args.samples_per_group)
    spec = ModelSpec(cfg.llm.vocab_size, cfg.vision.image_size, cfg.tokens_per_tile, cfg.image_context_id)
    packing = PackingConfig(pad_to="multiple", multiple=64, loss_weighting="square")
    data = prepare_training_data(dataset, balance, spec)  # caps resolved once for args.dp ranks
    per_rank = []
    for rank in range(args.dp):
        dm = OmniBalDataModule(data, packing, dp_rank=rank)
        dm.setup("fit")
        loader = iter(dm.train_dataloader())
        per_rank.append([next(loader) for _ in range(args.steps)])
    return [list(step) for step in zip(*per_rank)]


def time_micro_batch(model: VLM, batch: PackedBatch, device: torch.device, reps: int) -> float:
    """Seconds of forward + loss + backward of one micro-batch: the fastest of ``reps`` runs."""
    batch = batch.to(device)
    times = []
    for _ in range(reps):
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss_sum, weight = packed_loss_sum(model(batch), batch)
        (loss_sum / weight.clamp(min=1)).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> None:
    cfg = load_model_config(name)
    torch.manual_seed(0)
    model = VLM(cfg).to(device)
    params = sum(p.numel() for p in model.parameters())
    data = {algo: rank_batches(cfg, algo, args) for algo in args.algorithms}
    warm = data[args.algorithms[0]][0][0]
    time_micro_batch(model, warm, device, reps=2)  # allocator and kernel warm-up
    rows = {}
    for algo, steps in data.items():
        step_s, ideal_s, tokens, samples = 0.0, 0.0, 0, 0
        for step in steps:
            ranks = [time_micro_batch(model, b, device, args.reps) for b in step]
            step_s += max(ranks)
            ideal_s += sum(ranks) / len(ranks)
            tokens += sum(b.num_tokens for b in step)
            samples += sum(b.num_samples for b in step)
        rows[algo] = (step_s, ideal_s, tokens, samples)
    n = args.steps
    base = rows["random"][3] / rows["random"][0] if "random" in rows else None
    print(f"\n{name}: {params / 1e6:.1f}M parameters, {cfg.tokens_per_tile} tokens/tile, DP={args.dp} simulated, "
          f"{n} steps, {device.type}")
    print(f"{'sampler':<10}{'step s':>9}{'ideal s':>9}{'idle':>7}{'tok/step':>10}{'smp/step':>10}"
          f"{'tokens/s':>10}{'ideal':>10}{'samples/s':>11}{'vs random':>11}")
    for algo, (step, ideal, tokens, samples) in rows.items():
        speedup = f"{samples / step / base:.2f}x" if base else "-"
        print(f"{algo:<10}{step / n:>9.3f}{ideal / n:>9.3f}{1 - ideal / step:>7.1%}{tokens / n:>10,.0f}"
              f"{samples / n:>10.1f}{tokens / step:>10,.0f}{tokens / ideal:>10,.0f}{samples / step:>11.1f}{speedup:>11}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "internvl_100m"])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--dp", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="steps measured per sampler")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per micro-batch (the fastest counts)")
    parser.add_argument("--samples", type=int, default=20000, help="synthetic samples (embedded statistics)")
    parser.add_argument("--samples-per-group", type=int, default=2)
    parser.add_argument("--text-scale", type=float, default=0.25)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for name in args.models:
        bench_model(name, args, device)


if __name__ == "__main__":
    main()
