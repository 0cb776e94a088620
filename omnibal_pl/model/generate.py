"""Autoregressive generation for a batch of prompts, with Dynamic-LLaVA's inference-time removal.

- Prefill (:func:`prefill`): each prompt runs through the LLM once, every layer's K/V cached. With
  sparsification, the predictors read the hidden states entering layer ``sparse_layer`` (eval-mode
  decisions: the top ``int(n_image * vision_keep_rate)`` image tokens by score, likewise instruction
  tokens when that predictor is on) and the dropped tokens are physically removed: layers >= ``sparse_layer``
  compute and cache only the kept tokens, which keep their original position ids.
- Decoding with a KV cache (:func:`generate_batch`, the default): the prompts' caches sit in one padded
  buffer per layer with per-sample lengths (:class:`BatchKVCache`); each step runs one new token of every
  sample through every layer at once, each attending to its own sample's cached tokens and itself. A new
  token's K/V enter the cache of layers >= ``sparse_layer`` only if the output-text predictor, reading the
  hidden state entering ``sparse_layer``, admits it (:meth:`Sparsifier.keep_new_tokens`); other layers
  always cache it.
- Decoding without a KV cache (``use_cache=False``, the original's second mode): each step reruns the
  prompt and the tokens generated so far; at ``sparse_layer`` the prompt's dropped tokens and the generated
  tokens the predictor does not admit are removed, the newest token always stays (it is the query). Each
  token sees the same keys as in cached decoding, so the two modes pick the same tokens.

With the vision predictor on, a prompt without image tokens admits every decoded token (the original
sparsifies text only where the vision predictor ran; see :func:`~omnibal_pl.model.sparsify.sparsified_spans`).

FLOPs and KV bytes are counted analytically from the token counts per layer (:func:`prefill_flops`,
:func:`decode_step_flops`, :func:`kv_cache_bytes`), with the dense (unsparsified) counterparts from the
same run.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from omnibal_pl.batch import IGNORE_INDEX, PackedBatch
from omnibal_pl.errors import DataError
from omnibal_pl.model.config import LLMConfig
from omnibal_pl.model.llm import DecoderLayer, apply_rope, rope_cos_sin
from omnibal_pl.model.vlm import VLM


def _token_flops(llm: LLMConfig) -> int:
    """Forward FLOPs of one token through one decoder layer's projections and MLP (2 per multiply-add)."""
    return 2 * (llm.hidden * llm.head_dim * (2 * llm.heads + 2 * llm.kv_heads) + 3 * llm.hidden * llm.intermediate)


def prefill_flops(llm: LLMConfig, tokens_per_layer: Sequence[int]) -> float:
    """Forward FLOPs of a prompt's prefill: each decoder layer's projections and causal attention over the
    tokens it sees (``tokens_per_layer[i]``), plus the output head on the last token. Not counted: the vision
    encoder and projector (the same with and without sparsification) and the predictors
    (:func:`omnibal_pl.model.sparsify.predictor_flops`: < 0.5% of LLaVA-1.5-7B's sparsified prefill, but a
    large share for small LLMs, as the predictors' width does not scale with the model)."""
    attention = sum(4.0 * llm.heads * llm.head_dim * n * (n + 1) / 2 for n in tokens_per_layer)
    return float(_token_flops(llm) * sum(tokens_per_layer) + attention + 2 * llm.hidden * llm.vocab_size)


def decode_step_flops(llm: LLMConfig, keys_per_layer: Sequence[int]) -> float:
    """Forward FLOPs of one cached decoding step of one token: each layer's projections for the token and its
    attention over ``keys_per_layer[i]`` keys (the cached tokens and itself), plus the output head."""
    attention = sum(4.0 * llm.heads * llm.head_dim * n for n in keys_per_layer)
    return float(_token_flops(llm) * len(keys_per_layer) + attention + 2 * llm.hidden * llm.vocab_size)


def kv_cache_bytes(llm: LLMConfig, tokens_per_layer: Sequence[int], element_size: int) -> int:
    """Bytes of a KV cache holding ``tokens_per_layer[i]`` tokens in layer i."""
    return int(sum(tokens_per_layer) * 2 * llm.kv_heads * llm.head_dim * element_size)


@dataclass
class KVCache:
    """One prompt's per-layer keys and values [n_i, kv_heads, head_dim]; layers may hold different tokens."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def lengths(self) -> list[int]:
        return [k.shape[0] for k in self.keys]


@dataclass
class Prefill:
    """Result of :func:`prefill`: ``hidden`` [n_kept, hidden] leaving the last layer, ``kept`` [n_kept]
    indices of the tokens that reached it, the filled ``cache``, ``tokens_per_layer``, the ``sparsify``
    switch that was used and, per generated token, whether the output-text predictor ``admitted`` it (the
    newest token reaches every layer either way)."""

    hidden: torch.Tensor
    kept: torch.Tensor
    cache: KVCache
    tokens_per_layer: list[int]
    sparsify: bool
    admitted: list[bool]


class BatchKVCache:
    """The KV caches of B prompts in one padded buffer per layer, with per-sample lengths.

    ``keys[i]`` / ``values[i]``: [B, capacity, kv_heads, head_dim]; slots ``t < lengths[i][b]`` hold sample
    b's cached tokens of layer i in order, later slots are free. Lengths live on the host: decoding reads
    each step's admissions anyway.
    """

    def __init__(self, caches: Sequence[KVCache], capacity: int) -> None:
        first = caches[0].keys[0]
        layers, shape = len(caches[0].keys), (len(caches), capacity, *first.shape[1:])
        self.keys = [first.new_zeros(shape) for _ in range(layers)]
        self.values = [first.new_zeros(shape) for _ in range(layers)]
        self.lengths = [[c.lengths[i] for c in caches] for i in range(layers)]
        for b, cache in enumerate(caches):
            for i, n in enumerate(cache.lengths):
                self.keys[i][b, :n], self.values[i][b, :n] = cache.keys[i], cache.values[i]

    def attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, admit: Sequence[bool]) -> torch.Tensor:
        """One new token per sample, ``q`` [B, heads, head_dim], ``k``/``v`` [B, kv_heads, head_dim], attending to
        its sample's cached tokens of layer i and itself; [B, heads, head_dim]. The new K/V are written to each
        sample's next free slot, which becomes cached (the length grows) only where ``admit[b]``."""
        lengths = self.lengths[i]
        rows, slots = torch.arange(len(lengths), device=q.device), torch.tensor(lengths, device=q.device)
        self.keys[i][rows, slots], self.values[i][rows, slots] = k, v
        width = max(lengths) + 1
        visible = torch.arange(width, device=q.device)[None, :] <= slots[:, None]  # [B, width]
        out = F.scaled_dot_product_attention(
            q[:, :, None], self.keys[i][:, :width].transpose(1, 2), self.values[i][:, :width].transpose(1, 2),
            attn_mask=visible[:, None, None, :], enable_gqa=q.shape[1] != k.shape[1])
        self.lengths[i] = [n + int(a) for n, a in zip(lengths, admit)]
        return out[:, :, 0]

    def sample_lengths(self, b: int) -> list[int]:
        """Sample b's cached tokens per layer."""
        return [layer[b] for layer in self.lengths]


@dataclass
class GenerationResult:
    """One prompt's generated ``tokens`` (the end token excluded) and what the run cost.

    ``prompt_tokens``: tokens of the prompt; ``prefill_kept``: prompt tokens that reached the last layer;
    ``prefill_flops`` / ``prefill_flops_dense``: this run's prefill and the dense one's (same prompt);
    ``decode_flops`` / ``decode_flops_dense``: the decoding steps' forward FLOPs and a dense run's in the same
    mode (cached: one token against the cache per step; without cache: a full pass per step);
    ``kv_bytes`` / ``kv_bytes_dense``: the cache at its peak (the end; 0 without cache) and a dense cache of
    the same tokens; ``admitted``: per decoded token (``decoded`` fed in all), whether its K/V entered the
    sparsified layers; ``prefill_seconds``, ``decode_seconds``: this prompt's share of the wall times (those of
    its batch divided by the batch's prompts, so they add up over a batch).
    """

    tokens: list[int]
    prompt_tokens: int
    prefill_kept: int
    prefill_flops: float
    prefill_flops_dense: float
    kv_bytes: int
    kv_bytes_dense: int
    admitted: list[bool] = field(default_factory=list)
    decode_flops: float = 0.0
    decode_flops_dense: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def decoded(self) -> int:
        return len(self.admitted)

    @property
    def decoded_cached(self) -> int:
        return sum(self.admitted)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decoded / self.decode_seconds if self.decode_seconds > 0 else 0.0


def _project(layer: DecoderLayer, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [n, heads, head_dim], k and v [n, kv_heads, head_dim] of hidden states ``h`` [n, hidden] at positions ``pos`` [n]."""
    attn, cfg, n = layer.attn, layer.attn.cfg, h.shape[0]
    x = layer.attn_norm(h)
    q = attn.q(x).view(n, cfg.heads, cfg.head_dim)
    k = attn.k(x).view(n, cfg.kv_heads, cfg.head_dim)
    v = attn.v(x).view(n, cfg.kv_heads, cfg.head_dim)
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _finish(layer: DecoderLayer, h: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The layer's output [n, hidden] from its input ``h`` and the attention result [n, heads, head_dim]."""
    h = h + layer.attn.o(attended.reshape(h.shape[0], -1))
    return h + layer.mlp(layer.mlp_norm(h))


def _check_prompt(model: VLM, batch: PackedBatch) -> None:
    missing = [name for name in ("llm.embed", "llm.head") if name not in dict(model.blocks())]
    if missing or len(model.llm.layers) != model.cfg.llm.layers:
        raise DataError("generate: needs the whole model; this one is a pipeline stage (blocks were deleted)")
    bounds = batch.cu_seqlens.tolist()
    if batch.num_samples != 1 or bounds != [0, batch.input_ids.shape[1]]:
        raise DataError(f"generate: wants one unpadded prompt per batch (num_samples 1, cu_seqlens [0, L]), got "
                        f"{batch.num_samples} samples with cu_seqlens {bounds}; build each prompt without a token cap")


def _sparse_layer(model: VLM, sparsify: bool) -> int | None:
    """The layer where tokens are removed, None when this run is dense."""
    return model.cfg.sparsify.sparse_layer if sparsify and model.cfg.sparsify.enabled else None


def _admits_text(model: VLM, prompt: PackedBatch) -> bool:
    """Whether the output-text predictor decides on this prompt's decoded tokens: it exists and, with the
    vision predictor on, the prompt has image tokens."""
    sparse = model.cfg.sparsify
    has_image = bool((prompt.input_ids == model.cfg.image_context_id).any())
    return sparse.output_text_predictor and (has_image or not sparse.vision_predictor)


def _extended(prompt: PackedBatch, generated: Sequence[int]) -> PackedBatch:
    """The prompt followed by ``generated`` tokens (positions continuing), with no labels."""
    ids = torch.cat([prompt.input_ids, torch.tensor([list(generated)], dtype=prompt.input_ids.dtype,
                                                   device=prompt.input_ids.device)], dim=1)
    n, last = ids.shape[1], prompt.position_ids[0, -1]
    extra = torch.arange(1, len(generated) + 1, device=ids.device) + last
    return dataclasses.replace(prompt, input_ids=ids, labels=torch.full_like(ids, IGNORE_INDEX),
                               position_ids=torch.cat([prompt.position_ids, extra[None]], dim=1),
                               cu_seqlens=torch.tensor([0, n], dtype=torch.int32, device=prompt.cu_seqlens.device),
                               max_seqlen=n, loss_weight=torch.zeros(1, n, device=prompt.loss_weight.device),
                               seqlens=None, image_tokens=None)


@torch.no_grad()
def prefill(model: VLM, batch: PackedBatch, sparsify: bool = True, generated: Sequence[int] = ()) -> Prefill:
    """Run a one-sample prompt, followed by the ``generated`` tokens, through the model, filling a KV cache.

    The prompt's labels are ignored (a prompt has no answer). ``sparsify=False`` runs dense even when the
    model has predictors. With ``generated`` (decoding without a cache), at ``sparse_layer`` the generated
    tokens before the newest are removed where the output-text predictor drops them; the newest stays.
    The model is used in eval mode.
    """
    _check_prompt(model, batch)
    prompt = dataclasses.replace(batch, labels=torch.full_like(batch.labels, IGNORE_INDEX))
    was_training = model.training
    model.eval()
    try:
        return _prefill(model, prompt, generated, sparsify)
    finally:
        model.train(was_training)


def _prefill(model: VLM, prompt: PackedBatch, generated: Sequence[int], sparsify: bool) -> Prefill:
    batch = _extended(prompt, generated) if generated else prompt
    x = batch.pixel_values
    for name, block in model.blocks():
        x = block(x, batch)
        if name == "llm.embed":
            break
    h, pos = x[0], batch.position_ids[0]
    n_prompt, cut = prompt.input_ids.shape[1], _sparse_layer(model, sparsify)
    kept = torch.arange(h.shape[0], device=h.device)
    keys, values, tokens_per_layer = [], [], []
    admitted = torch.ones(len(generated), dtype=torch.bool, device=h.device)
    for i, layer in enumerate(model.llm.layers.values()):
        if i == cut:
            keep = layer.sparsifier(h[None, :n_prompt], prompt) > 0.5
            if generated:
                if _admits_text(model, prompt):
                    admitted = layer.sparsifier.keep_new_tokens(h[n_prompt:])
                keep = torch.cat([keep, admitted[:-1], keep.new_ones(1)])
            kept = keep.nonzero().flatten()
            h, pos = h[kept], pos[kept]
        q, k, v = _project(layer, h, pos)
        attended = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                                  enable_gqa=q.shape[1] != k.shape[1]).transpose(0, 1)
        h = _finish(layer, h, attended)
        keys.append(k)
        values.append(v)
        tokens_per_layer.append(h.shape[0])
    return Prefill(h, kept, KVCache(keys, values), tokens_per_layer, cut is not None, admitted.tolist())


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """Greedy (``temperature <= 0``) or sampled next token from logits [vocab]."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = (logits.float() / temperature).softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _logits(model: VLM, h: torch.Tensor) -> torch.Tensor:
    """Output-head logits [n, vocab] of last-layer hidden states [n, hidden]."""
    return model.llm.head.out(model.llm.head.norm(h))


@torch.no_grad()
def generate(model: VLM, batch: PackedBatch, max_new_tokens: int, temperature: float = 0.0,
             eos_token_id: int | None = None, sparsify: bool = True, generator: torch.Generator | None = None,
             use_cache: bool = True) -> GenerationResult:
    """Answer one prompt: :func:`generate_batch` of one."""
    return generate_batch(model, [batch], max_new_tokens, temperature, eos_token_id, sparsify, generator, use_cache)[0]


@torch.no_grad()
def generate_batch(model: VLM, prompts: Sequence[PackedBatch], max_new_tokens: int, temperature: float = 0.0,
                   eos_token_id: int | None = None, sparsify: bool = True, generator: torch.Generator | None = None,
                   use_cache: bool = True) -> list[GenerationResult]:
    """Answer each prompt (a one-sample :class:`PackedBatch`): up to ``max_new_tokens`` tokens, stopping after
    ``eos_token_id`` (excluded); decoding steps run all prompts at once (see the module docstring).

    ``temperature`` 0 is greedy, > 0 samples from ``softmax(logits / temperature)`` with ``generator`` (prompt
    by prompt within a step). ``sparsify`` uses the model's predictors when it has them. ``use_cache=False``
    reruns every prompt with its generated tokens at each step instead (same tokens, its FLOPs reported).
    """
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    try:
        for p in prompts:
            _check_prompt(model, p)
        prompts = [dataclasses.replace(p, labels=torch.full_like(p.labels, IGNORE_INDEX)) for p in prompts]
        run = _decode_cached if use_cache else _decode_uncached
        return run(model, prompts, max_new_tokens, temperature, eos_token_id, sparsify, generator)
    finally:
        model.train(was_training)


@dataclass
class _Started:
    """Every prompt prefilled: the ``prefills``, one ``results`` entry each holding the prefill figures (decoding
    fills in the rest), each prompt's first ``picked`` token and the prefill wall time."""

    prefills: list[Prefill]
    results: list[GenerationResult]
    picked: list[int | None]
    seconds: float


def _start(model: VLM, prompts: list[PackedBatch], sparsify: bool, temperature: float,
           generator: torch.Generator | None) -> _Started:
    cfg, start = model.cfg.llm, time.perf_counter()
    prefills = [_prefill(model, p, (), sparsify) for p in prompts]
    element = prefills[0].hidden.element_size()
    results = []
    for p, pre in zip(prompts, prefills):
        n = p.input_ids.shape[1]
        results.append(GenerationResult(tokens=[], prompt_tokens=n, prefill_kept=pre.tokens_per_layer[-1],
                                        prefill_flops=prefill_flops(cfg, pre.tokens_per_layer),
                                        prefill_flops_dense=prefill_flops(cfg, [n] * cfg.layers), kv_bytes=0,
                                        kv_bytes_dense=kv_cache_bytes(cfg, [n] * cfg.layers, element)))
    picked: list[int | None] = [_pick(_logits(model, pre.hidden[-1:])[0], temperature, generator) for pre in prefills]
    return _Started(prefills, results, picked, time.perf_counter() - start)


def _finish_results(model: VLM, started: _Started, decode_seconds: float) -> list[GenerationResult]:
    """Sets each result's dense cache size at the end and its share of the batch's wall times."""
    cfg, element, n = model.cfg.llm, started.prefills[0].hidden.element_size(), len(started.results)
    for r in started.results:
        r.kv_bytes_dense = kv_cache_bytes(cfg, [r.prompt_tokens + r.decoded] * cfg.layers, element)
        r.prefill_seconds, r.decode_seconds = started.seconds / n, decode_seconds / n
    return started.results


def _to_feed(results: list[GenerationResult], picked: list[int | None], max_new_tokens: int,
             eos_token_id: int | None) -> list[bool]:
    """Appends each still-running prompt's picked token to its answer; whether each prompt is fed that token
    (not after an end token, nor once ``max_new_tokens`` are out). Finished prompts have ``picked`` None."""
    feed = []
    for b, token in enumerate(picked):
        if token is None or token == eos_token_id or len(results[b].tokens) >= max_new_tokens:
            picked[b] = None
            feed.append(False)
            continue
        results[b].tokens.append(token)
        feed.append(len(results[b].tokens) < max_new_tokens)
        if not feed[-1]:
            picked[b] = None
    return feed


def _decode_cached(model: VLM, prompts: list[PackedBatch], max_new_tokens: int, temperature: float,
                   eos_token_id: int | None, sparsify: bool, generator: torch.Generator | None) -> list[GenerationResult]:
    llm, cfg = model.llm, model.cfg.llm
    started = _start(model, prompts, sparsify, temperature, generator)
    results, picked = started.results, started.picked
    start = time.perf_counter()
    cut = _sparse_layer(model, sparsify)
    judged = [cut is not None and _admits_text(model, p) for p in prompts]
    cache = BatchKVCache([pre.cache for pre in started.prefills], max(p.input_ids.shape[1] for p in prompts) + max_new_tokens)
    position = [int(p.position_ids[0, -1]) + 1 for p in prompts]
    device = started.prefills[0].hidden.device
    while True:
        feed = _to_feed(results, picked, max_new_tokens, eos_token_id)
        if not any(feed):
            break
        h = llm.embed.tok(torch.tensor([t if f else 0 for t, f in zip(picked, feed)], device=device))
        pos = torch.tensor(position, device=device)
        admit, keys = list(feed), []  # keys: [layer][sample] keys each new token attends to
        for i, layer in enumerate(llm.layers.values()):
            if i == cut:
                decided = layer.sparsifier.keep_new_tokens(h).tolist()
                admit = [f and (d or not j) for f, d, j in zip(feed, decided, judged)]
            keys.append([n + 1 for n in cache.lengths[i]])
            q, k, v = _project(layer, h, pos)
            h = _finish(layer, h, cache.attend(i, q, k, v, admit))
        logits = _logits(model, h)
        for b in (b for b in range(len(prompts)) if feed[b]):
            r = results[b]
            r.admitted.append(admit[b])
            r.decode_flops += decode_step_flops(cfg, [row[b] for row in keys])
            r.decode_flops_dense += decode_step_flops(cfg, [r.prompt_tokens + len(r.admitted)] * cfg.layers)
            position[b] += 1
            picked[b] = _pick(logits[b], temperature, generator)
    decode_seconds = time.perf_counter() - start
    element = started.prefills[0].hidden.element_size()
    for b, r in enumerate(results):
        r.kv_bytes = kv_cache_bytes(cfg, cache.sample_lengths(b), element)
    return _finish_results(model, started, decode_seconds)


def _decode_uncached(model: VLM, prompts: list[PackedBatch], max_new_tokens: int, temperature: float,
                     eos_token_id: int | None, sparsify: bool, generator: torch.Generator | None) -> list[GenerationResult]:
    cfg = model.cfg.llm
    started = _start(model, prompts, sparsify, temperature, generator)
    results, picked = started.results, started.picked
    start = time.perf_counter()
    while True:
        feed = _to_feed(results, picked, max_new_tokens, eos_token_id)
        if not any(feed):
            break
        for b in (b for b in range(len(prompts)) if feed[b]):
            r = results[b]
            pre = _prefill(model, prompts[b], r.tokens, sparsify)
            r.admitted.append(pre.admitted[-1])
            r.decode_flops += prefill_flops(cfg, pre.tokens_per_layer)
            r.decode_flops_dense += prefill_flops(cfg, [r.prompt_tokens + len(r.tokens)] * cfg.layers)
            picked[b] = _pick(_logits(model, pre.hidden[-1:])[0], temperature, generator)
    return _finish_results(model, started, time.perf_counter() - start)
