"""Synthetic VLM-shaped cost profiles, for tests and for trying the planner without a model."""
from __future__ import annotations

import numpy as np

from omnibal_pl.plan.costs import BlockCost, CostProfile

GIB = 1 << 30


def _block(name: str, kind: str, fwd: float, act: float, params: float, rng: np.random.Generator,
           jitter: float) -> BlockCost:
    """One block: backward ~2x forward; attention recompute ~a quarter of forward and frees ~60% of the
    activations; full recompute costs one forward and keeps ~5%. ``act`` and ``params`` in GiB."""
    f = fwd * (1 + jitter * rng.uniform(-1, 1))
    a = act * (1 + jitter * rng.uniform(-1, 1))
    attention_share = 0.6 if kind in ("vision_block", "llm_layer") else 0.0
    return BlockCost(
        name=name, kind=kind, forward_s=f, backward_s=2 * f,
        act_none_bytes=int(a * GIB), act_attention_bytes=int(a * (1 - attention_share) * GIB),
        act_full_bytes=int(a * 0.05 * GIB),
        recompute_attention_s=0.25 * f if attention_share else 0.0, recompute_full_s=f,
        param_bytes=int(params * GIB), grad_opt_bytes=int(params * 6 * GIB),
    )


def synthetic_profile(vision_blocks: int, llm_layers: int, seed: int = 0, jitter: float = 0.2,
                      vision_cost: float = 0.6) -> CostProfile:
    """A profile shaped like a VLM: vision embed, ``vision_blocks`` ViT blocks, projector, LLM embed,
    ``llm_layers`` decoder layers, LLM head. A ViT block costs ``vision_cost`` of an LLM layer's time
    (10 ms forward); every time and size varies by up to ``jitter`` (relative), seeded."""
    rng = np.random.default_rng(seed)
    blocks = [_block("vision.embed", "vision_embed", 0.002, 0.3, 0.01, rng, jitter)]
    blocks += [_block(f"vision.blocks.{i}", "vision_block", 0.010 * vision_cost, 0.8, 0.2, rng, jitter)
               for i in range(vision_blocks)]
    blocks.append(_block("projector", "projector", 0.001, 0.1, 0.05, rng, jitter))
    blocks.append(_block("llm.embed", "llm_embed", 0.0005, 0.05, 0.3, rng, jitter))
    blocks += [_block(f"llm.layers.{i}", "llm_layer", 0.010, 1.0, 0.4, rng, jitter) for i in range(llm_layers)]
    blocks.append(_block("llm.head", "llm_head", 0.006, 1.5, 0.3, rng, jitter))
    return CostProfile(blocks=blocks, model=f"synthetic_v{vision_blocks}_l{llm_layers}", device="synthetic",
                       micro_batch={"tiles": 8, "tokens": 4096, "dtype": "bfloat16"}, source="synthetic")
