"""Dynamic-LLaVA sparsification on a ~100M-parameter LLaVA-like model: off vs on, in one run and one table.

Measures (CPU by default, CUDA with --device cuda), at the published keep rates (vision 0.2, output text 0.5):
- training step (forward + backward of LM loss, plus the keep-rate loss when on) on one packed micro-batch
  of two samples with one image each: the cost of the predictors and the masked eager attention path in
  layers >= sparse_layer (nothing is removed in training), beside the analytic FLOPs;
- prefill time and LLM FLOPs of one prompt (576 image tokens, the top int(576 * 0.2) = 115 kept);
- decode tokens/s and the KV cache at the end of generation; decoding FLOPs with the KV cache and without it
  (the original's second mode: every step reruns prompt + answer, the dropped tokens removed from
  sparse_layer on), and the time of decoding without cache;
- batched decoding: ``--batch`` prompts decoded together (per-sample cache lengths) against the same
  prompts one at a time, in new tokens per second.
Off and on runs alternate and the best of ``--reps`` counts, so load from other processes hits both alike.
The predictors are untrained here. The vision predictor's top-k keeps exactly the published count whatever
its scores; the output-text predictor decides per token, so its keep bias is calibrated on the dense run's
decoded tokens to keep about half of them (the published 0.5); the admitted count is printed.

    .venv/bin/python scripts/bench_sparsify.py [--reps 2] [--new-tokens 32] [--batch 4] [--device cpu] [--threads 1]

On a CPU shared with other jobs, ``--threads 1`` gives steadier figures than torch's default thread count.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from typing import Callable

import torch

from omnibal_pl.batch import PackedBatch
from omnibal_pl.model import VLM, VLMConfig, dummy_batch
from omnibal_pl.model.flops import train_flops
from omnibal_pl.model.generate import GenerationResult, generate, generate_batch
from omnibal_pl.model.sparsify import (
    DROP, KEEP, SparsifyConfig, keep_rate_loss, masked_attention_cost, predictor_flops, split_output,
)

# LLaVA-1.5 shapes scaled down: 336 px tile -> 576 image tokens, Vicuna-like LLM of 8 layers x 768
CONFIG = {
    "name": "llava_100m", "image_context_id": 32000, "attention_backend": "auto",
    "vision": {"image_size": 336, "patch_size": 14, "width": 256, "depth": 4, "heads": 4, "mlp_dim": 1024,
               "norm": "layernorm", "act": "quick_gelu", "layerscale": False, "patch_bias": False,
               "embed_norm": True, "select_layer": -2},
    "projector": {"kind": "mlp2x_gelu"},
    "llm": {"vocab_size": 32064, "hidden": 768, "layers": 8, "heads": 12, "kv_heads": 12, "intermediate": 2048},
}
ANSWERS = (80, 60)  # answer tokens of the two training samples (>= output_text_len_for_training = 50)


def best_seconds(fns: list[Callable[[], object]], reps: int, sync: Callable[[], None]) -> list[float]:
    """Fastest wall seconds of each of ``fns`` over ``reps`` rounds (one call of each per round, in turn),
    after one warm-up call of each."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def training_batch(cfg: VLMConfig, device: torch.device) -> PackedBatch:
    """Two samples with one image each; only the last ``ANSWERS[k]`` tokens of sample k are supervised."""
    batch = dummy_batch(cfg, [120, 100], [1, 1], seed=1)
    prompt = torch.zeros_like(batch.labels, dtype=torch.bool)
    for s, e, answer in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist(), ANSWERS):
        prompt[0, s:e - answer] = True
    return dataclasses.replace(batch, labels=batch.labels.masked_fill(prompt, -100)).to(device)


def train_step(model: VLM, batch: PackedBatch) -> None:
    """Forward and backward of the LM loss (+ the keep-rate loss when sparsified); gradients dropped."""
    model.train()
    logits, keep = split_output(model(batch), model.cfg.sparsify)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), batch.input_ids[0, 1:])
    if keep is not None:
        loss = loss + keep_rate_loss(keep, batch, model.cfg.sparsify, model.cfg.image_context_id).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def calibrate_output_predictor(model: VLM, prompt: PackedBatch, tokens: list[int]) -> None:
    """Shift the output-text predictor's keep bias by the median keep margin of ``tokens`` (a dense run's
    answer to ``prompt``), so that it admits about half of them to the cache of layers >= sparse_layer."""
    cut = model.llm.layers[str(model.cfg.sparsify.sparse_layer)]
    ids = torch.cat([prompt.input_ids, torch.tensor([tokens], device=prompt.input_ids.device)], dim=1)
    n = ids.shape[1]
    full = dataclasses.replace(prompt, input_ids=ids, labels=torch.full_like(ids, -100),
                               position_ids=torch.arange(n, device=ids.device)[None],
                               cu_seqlens=torch.tensor([0, n], dtype=torch.int32, device=ids.device),
                               max_seqlen=n, loss_weight=torch.zeros(1, n, device=ids.device))
    entering: list[torch.Tensor] = []
    hook = cut.register_forward_pre_hook(lambda layer, args: entering.append(args[0][0, prompt.input_ids.shape[1]:]))
    try:
        with torch.no_grad():
            model.eval()(full)
    finally:
        hook.remove()
    predictor = cut.sparsifier.output_text
    with torch.no_grad():
        logits = predictor(entering[0])
        predictor.net[-1].bias[KEEP] -= (logits[:, KEEP] - logits[:, DROP]).median()


def fastest_generations(models: list[VLM], prompt: PackedBatch, new_tokens: int, reps: int,
                        use_cache: bool = True) -> list[GenerationResult]:
    """Each model's fastest of ``reps`` greedy generations (one per model per round, in turn); warm them first."""
    best: list[GenerationResult | None] = [None] * len(models)
    for _ in range(reps):
        for i, model in enumerate(models):
            r = generate(model, prompt, new_tokens, use_cache=use_cache)
            if best[i] is None or r.prefill_seconds + r.decode_seconds < best[i].prefill_seconds + best[i].decode_seconds:
                best[i] = r
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=2, help="timed repetitions of each measurement (after a warm-up)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--batch", type=int, default=4, help="prompts of the batched-decoding measurement")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)

    off = VLM(VLMConfig.from_dict(CONFIG)).to(device)
    on = copy.deepcopy(off)
    on.enable_sparsify(SparsifyConfig(enabled=True))  # the published knobs
    cfg, sp = off.cfg, on.cfg.sparsify
    params = sum(p.numel() for p in off.parameters()) / 1e6
    predictor_params = sum(p.numel() for n, p in on.named_parameters() if ".sparsifier." in n) / 1e6

    batch = training_batch(cfg, device)
    train_s = best_seconds([lambda: train_step(off, batch), lambda: train_step(on, batch)], args.reps, sync)
    seqlens = torch.diff(batch.cu_seqlens).tolist()
    image = cfg.tokens_per_tile
    flops_off = train_flops(cfg, int(batch.pixel_values.shape[0]), seqlens)
    masked = masked_attention_cost(cfg.llm.heads, cfg.llm.head_dim, seqlens)
    flops_on = flops_off + 3 * ((cfg.llm.layers - sp.sparse_layer) * masked.extra_flops
                                + predictor_flops(cfg.llm.hidden, sp, [image, image], sum(ANSWERS)))

    prompt = dummy_batch(cfg, [40], [1], seed=2).to(device)
    warm = generate(off, prompt, args.new_tokens)
    calibrate_output_predictor(on, prompt, warm.tokens)
    generate(on, prompt, args.new_tokens)
    r_off, r_on = fastest_generations([off, on], prompt, args.new_tokens, args.reps)
    u_off, u_on = fastest_generations([off, on], prompt, args.new_tokens, args.reps, use_cache=False)
    prompts = [dummy_batch(cfg, [40 + 3 * k], [1], seed=2 + k).to(device) for k in range(args.batch)]
    new_tokens = args.batch * args.new_tokens  # no end token: every prompt generates them all
    batch_s = best_seconds([lambda: [generate(on, q, args.new_tokens) for q in prompts],
                            lambda: generate_batch(on, prompts, args.new_tokens)], args.reps, sync)

    print(f"model: {params:.0f}M parameters (+{predictor_params:.1f}M predictors), {cfg.llm.layers} LLM layers, "
          f"sparse_layer {sp.sparse_layer}, vision keep {sp.vision_keep_rate}, output-text keep {sp.output_text_keep_rate}; "
          f"device {device}, torch threads {torch.get_num_threads()}")
    print(f"train micro-batch: {batch.num_tokens} tokens in 2 samples ({cfg.tokens_per_tile} image tokens each, answers {ANSWERS}); "
          f"prompt: {r_off.prompt_tokens} tokens ({cfg.tokens_per_tile} image); {args.new_tokens} new tokens; "
          f"times: best of {args.reps} after a warm-up")
    rows = [
        ("train step (fwd+bwd) s", train_s[0], train_s[1]),
        ("train GFLOPs (analytic)", flops_off / 1e9, flops_on / 1e9),
        ("prefill s", r_off.prefill_seconds, r_on.prefill_seconds),
        ("prefill GFLOPs, LLM", r_off.prefill_flops / 1e9, r_on.prefill_flops / 1e9),
        ("prefill GFLOPs, predictors", 0.0, predictor_flops(cfg.llm.hidden, sp, [image], 0) / 1e9),
        (f"prompt tokens in layers >= {sp.sparse_layer}", r_off.prefill_kept, r_on.prefill_kept),
        ("decode tokens/s", r_off.decode_tokens_per_second, r_on.decode_tokens_per_second),
        (f"decoded tokens cached >= {sp.sparse_layer}", r_off.decoded_cached, r_on.decoded_cached),
        ("KV cache at end, MiB", r_off.kv_bytes / 2**20, r_on.kv_bytes / 2**20),
        ("decode GFLOPs, KV cache", r_off.decode_flops / 1e9, r_on.decode_flops / 1e9),
        ("decode GFLOPs, no KV cache", u_off.decode_flops / 1e9, u_on.decode_flops / 1e9),
        ("decode s, no KV cache", u_off.decode_seconds, u_on.decode_seconds),
    ]
    print(f"{'metric':<32}{'off':>12}{'on':>12}{'on/off':>10}")
    for name, a, b in rows:
        ratio = f"{b / a:>10.3f}" if a else f"{'-':>10}"
        print(f"{name:<32}{a:>12.4g}{b:>12.4g}{ratio}")
    print(f"train GFLOPs on = off + 3 x (masked attention path, +{masked.extra_flops / 1e9:.3g} GFLOPs forward in each of "
          f"{cfg.llm.layers - sp.sparse_layer} layers, {masked.saved_bytes / 2**20:.0f} MiB of float32 scores kept for backward "
          f"per layer + predictors); prefill s includes the vision encoder and, when on, the predictors; "
          f"decoded tokens admitted {r_on.decoded_cached}/{r_on.decoded}; without cache the same tokens: "
          f"{u_on.tokens == r_on.tokens and u_off.tokens == r_off.tokens}")
    print(f"sparsified model, {args.batch} prompts x {args.new_tokens} new tokens (prefill included): one at a time "
          f"{new_tokens / batch_s[0]:.1f} tokens/s, batched {new_tokens / batch_s[1]:.1f} tokens/s "
          f"({batch_s[0] / batch_s[1]:.2f}x)")


if __name__ == "__main__":
    main()
