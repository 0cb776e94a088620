"""LoRA against full fine-tuning on one process: trainable parameters, AdamW state and step time.

The same model (``--model``, seeded), the same packed micro-batch, ``--steps`` AdamW steps after one
warm-up step, in one run: full fine-tuning (every part trains) as the baseline, then ``model/adapter=lora``
with ``--rank`` on every linear layer of the LLM's decoder layers. Printed per variant: trainable
parameters, the AdamW state's bytes after the steps, the median step time (forward, backward, optimizer)
and the loss after the last step.

    python scripts/bench_lora.py                          # internvl_100m, CPU
    python scripts/bench_lora.py --model tiny --steps 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnibal_pl.conf import preset  # noqa: E402
from omnibal_pl.model import VLM, VLMConfig, dummy_batch  # noqa: E402
from omnibal_pl.train.objective import micro_batch_objective  # noqa: E402


def run(cfg: VLMConfig, steps: int, tiles: int, tokens: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = VLM(cfg)
    batch = dummy_batch(cfg, [tokens // 2 - tiles * cfg.tokens_per_tile // 2] * 2, [tiles // 2, tiles - tiles // 2],
                        seed=1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times, loss = [], float("nan")
    for step in range(steps + 1):
        start = time.perf_counter()
        objective = micro_batch_objective(model(batch), batch, cfg)
        opt.zero_grad(set_to_none=True)
        (objective.value / objective.weight).backward()
        opt.step()
        if step:  # the first step is warm-up
            times.append(time.perf_counter() - start)
        loss = (objective.loss_sum / objective.weight).item()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {"trainable": sum(p.numel() for p in params), "state_mb": state / 2**20,
            "step_s": statistics.median(times), "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="internvl_100m")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tiles", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = preset("model", args.model)
    data["attention_backend"] = "sdpa"
    variants = {"full fine-tuning (baseline)": data,
                f"lora r={args.rank} (llm attn + mlp)": {**data, "adapter": {"kind": "lora", "r": args.rank,
                                                                               "alpha": 2.0 * args.rank}}}
    print(f"{args.model}: {args.tiles} tiles, {args.tokens} tokens, {args.steps} steps, {args.threads} threads")
    print(f"{'variant':34} {'trainable':>12} {'AdamW state MiB':>16} {'step s (median)':>16} {'loss':>8}")
    for name, cfg in variants.items():
        r = run(VLMConfig.from_dict(cfg), args.steps, args.tiles, args.tokens)
        print(f"{name:34} {r['trainable']:>12,} {r['state_mb']:>16.1f} {r['step_s']:>16.3f} {r['loss']:>8.4f}")


if __name__ == "__main__":
    main()
