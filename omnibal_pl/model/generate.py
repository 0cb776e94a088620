"""Autoregressive generation with a KV cache for one prompt, with Dynamic-LLaVA's inference-time removal.

- Prefill (:func:`prefill`): the prompt runs through the LLM once, every layer's K/V cached. With
  sparsification, the predictors read the hidden states entering layer ``sparse_layer`` (eval-mode
  decisions: the top ``int(n_image * vision_keep_rate)`` image tokens by score, likewise instruction
  tokens when that predictor is on) and the dropped tokens are physically removed: layers >= ``sparse_layer``
  compute and cache only the kept tokens, which keep their original position ids.
- Decoding (:func:`generate`): each new token runs through every layer attending to the cache and itself;
  its K/V enter the cache of layers >= ``sparse_layer`` only if the output-text predictor keeps it.

FLOPs and KV bytes are counted analytically from the token counts per layer (:func:`prefill_flops`,
:func:`kv_cache_bytes`), with the dense (unsparsified) counterparts from the same run.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from omnibal_pl.batch import PackedBatch
from omnibal_pl.errors import DataError
from omnibal_pl.model.config import LLMConfig
from omnibal_pl.model.llm import DecoderLayer, apply_rope, rope_cos_sin
from omnibal_pl.batch import IGNORE_INDEX
from omnibal_pl.model.vlm import VLM


def prefill_flops(llm: LLMConfig, tokens_per_layer: Sequence[int]) -> float:
    """Forward FLOPs of a prompt's prefill: each decoder layer's projections and causal attention over the
    tokens it sees (``tokens_per_layer[i]``), plus the output head on the last token. Not counted: the vision
    encoder and projector (the same with and without sparsification) and the predictors
    (:func:`omnibal_pl.model.sparsify.predictor_flops`: < 0.5% of LLaVA-1.5-7B's sparsified prefill, but a
    large share for small LLMs, as the predictors' width does not scale with the model)."""
    hd = llm.head_dim
    per_token = 2 * (llm.hidden * hd * (2 * llm.heads + 2 * llm.kv_heads) + 3 * llm.hidden * llm.intermediate)
    attention = sum(4.0 * llm.heads * hd * n * (n + 1) / 2 for n in tokens_per_layer)
    return float(per_token * sum(tokens_per_layer) + attention + 2 * llm.hidden * llm.vocab_size)


def kv_cache_bytes(llm: LLMConfig, tokens_per_layer: Sequence[int], element_size: int) -> int:
    """Bytes of a KV cache holding ``tokens_per_layer[i]`` tokens in layer i."""
    return int(sum(tokens_per_layer) * 2 * llm.kv_heads * llm.head_dim * element_size)


@dataclass
class KVCache:
    """Per-layer keys and values [n_i, kv_heads, head_dim]; layers may hold different tokens."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def lengths(self) -> list[int]:
        return [k.shape[0] for k in self.keys]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


@dataclass
class Prefill:
    """Result of :func:`prefill`: ``hidden`` [1, n_kept, hidden] leaving the last layer, ``kept`` [n_kept]
    indices of the prompt tokens that reached it, the filled ``cache``, ``tokens_per_layer`` and the
    ``sparsify`` switch that was used."""

    hidden: torch.Tensor
    kept: torch.Tensor
    cache: KVCache
    tokens_per_layer: list[int]
    sparsify: bool


@dataclass
class GenerationResult:
    """Generated ``tokens`` (the end token excluded) and what the run cost.

    ``prompt_tokens``: tokens of the prompt; ``prefill_kept``: prompt tokens that reached the last layer;
    ``prefill_flops`` / ``prefill_flops_dense``: this run's prefill and the dense one's (same prompt);
    ``kv_bytes`` / ``kv_bytes_dense``: the cache at its peak (the end) and a dense cache of the same tokens;
    ``decoded_cached``: decoded tokens whose K/V entered the sparsified layers (``decoded`` fed in all);
    ``prefill_seconds``, ``decode_seconds``: wall times.
    """

    tokens: list[int]
    prompt_tokens: int
    prefill_kept: int
    prefill_flops: float
    prefill_flops_dense: float
    kv_bytes: int
    kv_bytes_dense: int
    decoded: int
    decoded_cached: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decoded / self.decode_seconds if self.decode_seconds > 0 else 0.0


def _layer_step(layer: DecoderLayer, h: torch.Tensor, pos: torch.Tensor, cache: KVCache, i: int, admit: bool) -> torch.Tensor:
    """One decoder layer over ``h`` [1, n, hidden] at positions ``pos`` [n] against cache layer ``i``.

    ``n > 1`` only for prefill (empty cache, causal); ``n == 1`` attends to the cache and itself. The new
    K/V are appended to the cache when ``admit``.
    """
    attn, cfg, n = layer.attn, layer.attn.cfg, h.shape[1]
    x = layer.attn_norm(h)
    q = attn.q(x).view(n, cfg.heads, cfg.head_dim)
    k = attn.k(x).view(n, cfg.kv_heads, cfg.head_dim)
    v = attn.v(x).view(n, cfg.kv_heads, cfg.head_dim)
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys, values = torch.cat([cache.keys[i], k]), torch.cat([cache.values[i], v])
    assert n == 1 or cache.keys[i].shape[0] == 0, "a multi-token step is a prefill and needs an empty cache"
    out = F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                                         is_causal=n > 1, enable_gqa=cfg.heads != cfg.kv_heads)
    if admit:
        cache.keys[i], cache.values[i] = keys, values
    h = h + attn.o(out.transpose(0, 1).reshape(1, n, -1))
    return h + layer.mlp(layer.mlp_norm(h))


def _check_prompt(model: VLM, batch: PackedBatch) -> None:
    missing = [name for name in ("llm.embed", "llm.head") if name not in dict(model.blocks())]
    if missing or len(model.llm.layers) != model.cfg.llm.layers:
        raise DataError("generate: needs the whole model; this one is a pipeline stage (blocks were deleted)")
    bounds = batch.cu_seqlens.tolist()
    if batch.num_samples != 1 or bounds != [0, batch.input_ids.shape[1]]:
        raise DataError(f"generate: wants one unpadded prompt (num_samples 1, cu_seqlens [0, L]), got "
                        f"{batch.num_samples} samples with cu_seqlens {bounds}; build the batch without a token cap")


@torch.no_grad()
def prefill(model: VLM, batch: PackedBatch, sparsify: bool = True) -> Prefill:
    """Run a one-sample prompt through the model, filling a KV cache (see the module docstring).

    The prompt's labels are ignored (a prompt has no answer). ``sparsify=False`` runs dense even when the
    model has predictors. The model is used in eval mode.
    """
    _check_prompt(model, batch)
    batch = dataclasses.replace(batch, labels=torch.full_like(batch.labels, IGNORE_INDEX))
    was_training = model.training
    model.eval()
    try:
        return _prefill(model, batch, sparsify)
    finally:
        model.train(was_training)


def _prefill(model: VLM, batch: PackedBatch, sparsify: bool) -> Prefill:
    x = batch.pixel_values
    for name, block in model.blocks():
        x = block(x, batch)
        if name == "llm.embed":
            break
    sparse = model.cfg.sparsify
    cut = sparse.sparse_layer if sparsify and sparse.enabled else None
    layers = list(model.llm.layers.values())
    cache = KVCache([x.new_empty(0, model.cfg.llm.kv_heads, model.cfg.llm.head_dim) for _ in layers],
                    [x.new_empty(0, model.cfg.llm.kv_heads, model.cfg.llm.head_dim) for _ in layers])
    pos = batch.position_ids[0]
    kept = torch.arange(x.shape[1], device=x.device)
    tokens_per_layer = []
    for i, layer in enumerate(layers):
        if i == cut:
            kept = (layer.sparsifier(x, batch) > 0.5).nonzero().flatten()
            x, pos = x[:, kept], pos[kept]
        x = _layer_step(layer, x, pos, cache, i, admit=True)
        tokens_per_layer.append(x.shape[1])
    return Prefill(x, kept, cache, tokens_per_layer, cut is not None)


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """Greedy (``temperature <= 0``) or sampled next token from logits [vocab]."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = (logits.float() / temperature).softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate(model: VLM, batch: PackedBatch, max_new_tokens: int, temperature: float = 0.0,
             eos_token_id: int | None = None, sparsify: bool = True,
             generator: torch.Generator | None = None) -> GenerationResult:
    """Answer one prompt: up to ``max_new_tokens`` tokens, stopping after ``eos_token_id`` (excluded).

    ``temperature`` 0 is greedy, > 0 samples from ``softmax(logits / temperature)`` with ``generator``.
    ``sparsify`` uses the model's predictors when it has them (prefill removal, decoding cache admission).
    """
    llm, cfg = model.llm, model.cfg.llm
    start = time.perf_counter()
    pre = prefill(model, batch, sparsify)
    logits = llm.head.out(llm.head.norm(pre.hidden[:, -1]))[0]
    token = _pick(logits, temperature, generator)
    prefill_seconds = time.perf_counter() - start

    start = time.perf_counter()
    cut = model.cfg.sparsify.sparse_layer if pre.sparsify else None
    layers = list(llm.layers.values())
    position = int(batch.position_ids[0, -1]) + 1
    tokens, decoded, cached = [], 0, 0
    while token != eos_token_id and len(tokens) < max_new_tokens:
        tokens.append(token)
        if len(tokens) == max_new_tokens:
            break
        h = llm.embed.tok(torch.tensor([[token]], device=pre.hidden.device))
        pos = torch.tensor([position], device=h.device)
        admit = True
        for i, layer in enumerate(layers):
            if i == cut:
                admit = layer.sparsifier.keep_new_token(h[0, 0])
            h = _layer_step(layer, h, pos, pre.cache, i, admit)
        decoded, cached, position = decoded + 1, cached + int(admit), position + 1
        token = _pick(llm.head.out(llm.head.norm(h[:, -1]))[0], temperature, generator)
    decode_seconds = time.perf_counter() - start

    prompt = batch.input_ids.shape[1]
    element = pre.hidden.element_size()
    return GenerationResult(
        tokens=tokens,
        prompt_tokens=prompt,
        prefill_kept=pre.tokens_per_layer[-1],
        prefill_flops=prefill_flops(cfg, pre.tokens_per_layer),
        prefill_flops_dense=prefill_flops(cfg, [prompt] * cfg.layers),
        kv_bytes=pre.cache.nbytes(),
        kv_bytes_dense=kv_cache_bytes(cfg, [prompt + decoded] * cfg.layers, element),
        decoded=decoded,
        decoded_cached=cached,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
    )
