"""Memory balance benchmark: the memory model against the runtime it describes, per ZeRO level and recompute
mode, and which published configs fit at which ZeRO level on 8 x 80 GB.

Default (CPU, gloo): for ``tiny`` and ``internvl_100m`` at pp 1 and 2 with dp 2, every ZeRO level 0-3
(recompute ``none``; at ZeRO 0 and 3 also ``attention`` and ``full``), the stages of a uniform split run
``--steps`` AdamW steps on the same micro-batches (:func:`omnibal_pl.train.trial.run_trials`). Per
pipeline rank (the larger DP replica) it prints the measured and predicted static bytes (parameters +
gradients + optimizer state, local shards, after the last step) and activation peak (saved-tensor
bytes over a step, :mod:`omnibal_pl.plan.saved_bytes`), the peak's error, static bytes against ZeRO 0,
the step time and the loss (equal across levels and modes: same data, same seed). The prediction is the
plan's (a profile of this machine, the schedule's in-flight counts, the ZeRO split). At ZeRO 2 the model
counts whole parameters, which FSDP2 holds from forward to backward only: between steps, where static
bytes are read, they are sharded as at ZeRO 3, so the measured bytes are lower by the parameters'
(dp - 1) / dp.

    python scripts/bench_memory.py                     # both models
    python scripts/bench_memory.py --models tiny --steps 2
    python scripts/bench_memory.py --published         # the cost model's ZeRO fit table, 8 x H100 80 GB
    python scripts/bench_memory.py --cross-entropy     # the loss alone: chunked vs plain fp32 upcast

``--published``: for every published preset, pp in 1, 2, 4, 8 with dp = 8 / pp and ZeRO 0-3, whether a
searched plan fits 0.9 x 80 GiB per GPU under the cost model (bf16-mixed, AdamW), the predicted step and
the largest stage's memory, for a micro-batch of ``--vit-cap`` tiles and ``--token-cap`` tokens.

``--cross-entropy`` measures the loss's forward + backward on bf16 logits [1, L, vocab] in a fresh process
per variant, as the growth of the process's peak resident memory (``ru_maxrss``) over the logits and
their gradient: the chunked loss of :mod:`omnibal_pl.train.objective` against the plain
``F.cross_entropy(logits.float())`` it replaced, same loss value.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnibal_pl.batch import MicroBatchShape  # noqa: E402
from omnibal_pl.conf import preset  # noqa: E402
from omnibal_pl.errors import PlanError  # noqa: E402
from omnibal_pl.model import VLMConfig  # noqa: E402
from omnibal_pl.plan.cost_model import block_parameters  # noqa: E402
from omnibal_pl.plan.make import plan_from_partition, planning_inputs  # noqa: E402
from omnibal_pl.plan.partition import evaluate_partition, search_partition  # noqa: E402
from omnibal_pl.plan.plan import even_bounds  # noqa: E402
from omnibal_pl.plan.profiler import profile_batch  # noqa: E402
from omnibal_pl.train.objective import packed_loss_sum  # noqa: E402
from omnibal_pl.train.trial import run_trials  # noqa: E402

MIB, GIB = 2**20, 2**30
DP = 2
SHAPE = MicroBatchShape(vit_cap=2, token_cap=128, samples=2)
PUBLISHED = ("internvl2_5_1b", "internvl2_2b", "qwen2_5_vl_3b", "llava_1_5_7b", "qwen2_5_vl_7b", "internvl2_8b",
             "internvl3_8b", "internvl_chat_v1_5")


def runtime_table(names: list[str], steps: int, cache: str) -> None:
    print(f"dp={DP}, micro-batch {SHAPE.vit_cap} tiles x {SHAPE.token_cap} tokens, 2 x pp micro-batches per step, "
          f"AdamW fp32, gloo on CPU, {steps} measured steps; per pipeline rank (MiB): static = parameters + gradients + "
          "optimizer state, act = activation peak")
    print(f"{'model':14s} {'pp':>2s} {'zero':>4s} {'recompute':>9s} {'rank':>4s} {'static':>8s} {'pred':>8s} "
          f"{'act':>8s} {'pred':>8s} {'peak err':>8s} {'vs zero 0':>9s} {'step s':>7s} {'loss':>8s}")
    for name in names:
        cfg = VLMConfig.from_dict(preset("model", name))
        for pp in (1, 2):
            m = 2 * pp
            bounds = even_bounds(len(cfg.block_names()), pp)
            batches = [[profile_batch(cfg, SHAPE, seed=100 * d + k) for k in range(m)] for d in range(DP)]
            base: dict[int, float] = {}
            for zero in (0, 1, 2, 3):
                inputs = planning_inputs(cfg, pp, m, SHAPE.vit_cap, SHAPE.token_cap, dp=DP, device="local",
                                         source="profile", profile_cache=cache, samples=SHAPE.samples, zero=zero,
                                         precision="32-true")
                modes = ("none", "attention", "full") if zero in (0, 3) else ("none",)
                plans = [plan_from_partition(cfg, inputs, evaluate_partition(inputs.profile, inputs.config, bounds, mode),
                                             zero) for mode in modes]
                for mode, trial in zip(modes, run_trials(cfg, plans, batches, steps=steps)):
                    notes = trial.plan.notes
                    for rank in range(pp):
                        static, act = trial.pp_rank_static(rank), trial.pp_rank_activations(rank)
                        p_static, p_act = notes["stage_static_bytes"][rank], notes["stage_activation_bytes"][rank]
                        base.setdefault(rank, static)
                        err = (p_static + p_act) / (static + act) - 1
                        print(f"{name:14s} {pp:>2d} {zero:>4d} {mode:>9s} {rank:>4d} {static / MIB:>8.2f} "
                              f"{p_static / MIB:>8.2f} {act / MIB:>8.2f} {p_act / MIB:>8.2f} {100 * err:>+7.1f}% "
                              f"{static / base[rank]:>9.3f} {trial.step_s:>7.3f} {trial.ranks[0].loss:>8.5f}")


def published_table(vit_cap: int, token_cap: int, micro_batches: int) -> None:
    print(f"cost model, h100_80gb (budget 0.9 x 80 GiB per GPU), 8 GPUs = pp x dp, bf16-mixed AdamW, micro-batch "
          f"{vit_cap} tiles x {token_cap} tokens, {micro_batches} micro-batches per step and DP rank")
    print(f"{'model':20s} {'params B':>8s} {'pp':>2s} {'dp':>2s} " + " ".join(f"{f'zero {z}':>16s}" for z in range(4)))
    for name in PUBLISHED:
        cfg = VLMConfig.from_dict(preset("model", name))
        params = sum(p for _, p in block_parameters(cfg))
        for pp in (1, 2, 4, 8):
            dp = 8 // pp
            cells = []
            for zero in range(4):
                inputs = planning_inputs(cfg, pp, max(micro_batches, pp), vit_cap, token_cap, dp=dp, device="h100_80gb",
                                         source="cost_model", zero=zero, precision="bf16-mixed")
                try:
                    scored = search_partition(inputs.profile, inputs.config)
                except PlanError:
                    cells.append("no fit")
                    continue
                peak = max(s + n * a for s, n, a in
                           zip(scored.static_bytes, scored.sim.peak_in_flight, scored.activation_bytes))
                cells.append(f"{scored.step_s:.2f}s {peak / GIB:.0f}GiB")
            print(f"{name:20s} {params / 1e9:>8.2f} {pp:>2d} {dp:>2d} " + " ".join(f"{c:>16s}" for c in cells))


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
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--profile-cache", default="outputs/bench_memory/profiles")
    parser.add_argument("--published", action="store_true", help="the cost model's ZeRO fit table (see the docstring)")
    parser.add_argument("--vit-cap", type=int, default=16)
    parser.add_argument("--token-cap", type=int, default=8192)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--cross-entropy", action="store_true", help="measure the loss alone (see the docstring)")
    parser.add_argument("--ce-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.ce_child:
        _cross_entropy_peak(args.ce_child[0], int(args.ce_child[1]), int(args.ce_child[2]))
    elif args.cross_entropy:
        cross_entropy_table()
    elif args.published:
        published_table(args.vit_cap, args.token_cap, args.micro_batches)
    else:
        runtime_table(args.models, args.steps, args.profile_cache)


if __name__ == "__main__":
    main()
