"""KV-cache generation with Dynamic-LLaVA's prefill removal and decoding cache admission."""
import dataclasses

import pytest
import torch

from omnibal_pl.errors import DataError
from omnibal_pl.model import VLM, VLMConfig, dummy_batch
from omnibal_pl.model.generate import generate, generate_batch, kv_cache_bytes, prefill, prefill_flops
from omnibal_pl.model.sparsify import split_output
from tests.helpers import bias_predictors, tiny_cfg

LAYERS = 3  # layer 0 dense, layers 1 and 2 sparsified


def prompt(cfg: VLMConfig, text: int = 9, tiles: int = 3):
    batch = dummy_batch(cfg, [text], [tiles], seed=3)
    return dataclasses.replace(batch, labels=torch.full_like(batch.labels, -100))


@pytest.fixture
def models():
    torch.manual_seed(0)
    plain = VLM(tiny_cfg(sparsify=False, layers=LAYERS)).eval()
    sparse = VLM(tiny_cfg(layers=LAYERS, vision_keep_rate=0.5, instruct_text_predictor=True)).eval()
    sparse.load_state_dict(plain.state_dict(), strict=False)
    return plain, sparse


def test_cached_greedy_generation_equals_full_recomputation(models):
    plain, _ = models
    batch = prompt(plain.cfg)
    result = generate(plain, batch, max_new_tokens=6)
    tokens, current = [], batch
    for _ in range(6):
        tokens.append(int(plain(current)[0, -1].argmax()))
        ids = torch.cat([current.input_ids, torch.tensor([[tokens[-1]]])], dim=1)
        n = ids.shape[1]
        current = dataclasses.replace(current, input_ids=ids, labels=torch.full_like(ids, -100),
                                      position_ids=torch.arange(n)[None], cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
                                      max_seqlen=n, loss_weight=torch.zeros(1, n))
    assert result.tokens == tokens
    assert result.kv_bytes == result.kv_bytes_dense == kv_cache_bytes(plain.cfg.llm, [batch.input_ids.shape[1] + 5] * 3, 4)


def test_prefill_removal_matches_the_masked_forward(models):
    _, sparse = models
    batch = prompt(sparse.cfg, text=12, tiles=4)
    pre = prefill(sparse, batch)
    n_image = 4 * sparse.cfg.tokens_per_tile
    removed = batch.input_ids.shape[1] - len(pre.kept)
    assert removed >= n_image - int(n_image * 0.5)  # the vision top-k, plus what the instruction predictor drops
    assert pre.tokens_per_layer[0] == batch.input_ids.shape[1] and pre.tokens_per_layer[1:] == [len(pre.kept)] * 2
    assert pre.cache.lengths == pre.tokens_per_layer
    logits, keep = split_output(sparse(batch), sparse.cfg.sparsify)
    assert keep[0].nonzero().flatten().tolist() == pre.kept.tolist()
    head = sparse.llm.head
    torch.testing.assert_close(head.out(head.norm(pre.hidden)), logits[0, pre.kept], rtol=1e-4, atol=1e-4)


def test_generation_is_equal_with_and_without_pruning_when_everything_is_kept(models):
    plain, _ = models
    keep_all = VLM(tiny_cfg(layers=LAYERS, vision_keep_rate=1.0, instruct_text_predictor=True, instruct_text_keep_rate=1.0)).eval()
    keep_all.load_state_dict(plain.state_dict(), strict=False)
    bias_predictors(keep_all, keep=True)
    batch = prompt(plain.cfg)
    reference = generate(plain, batch, max_new_tokens=8)
    pruned = generate(keep_all, batch, max_new_tokens=8)
    assert pruned.tokens == reference.tokens and len(pruned.tokens) == 8
    assert pruned.kv_bytes == reference.kv_bytes and pruned.decoded_cached == pruned.decoded == 7
    sampled = [generate(m, batch, 8, temperature=0.8, generator=torch.Generator().manual_seed(5)).tokens
               for m in (plain, keep_all)]
    assert sampled[0] == sampled[1]


def test_pruning_reduces_prefill_flops_and_cache(models):
    plain, sparse = models
    batch = prompt(plain.cfg, tiles=4)
    bias_predictors(sparse, keep=False)  # the output-text predictor admits no decoded token
    sparse.llm.layers["1"].sparsifier.instruct_text = None
    result = generate(sparse, batch, max_new_tokens=5)
    n, n_image = batch.input_ids.shape[1], 4 * plain.cfg.tokens_per_tile
    kept = n - n_image + int(n_image * 0.5)
    assert result.prompt_tokens == n and result.prefill_kept == kept
    assert result.prefill_flops == prefill_flops(plain.cfg.llm, [n, kept, kept]) < result.prefill_flops_dense
    assert result.decoded == 4 and result.decoded_cached == 0
    # layer 0 caches every token; layers >= sparse_layer only the kept prompt tokens
    assert result.kv_bytes == kv_cache_bytes(plain.cfg.llm, [n + 4, kept, kept], 4)
    assert result.kv_bytes_dense == kv_cache_bytes(plain.cfg.llm, [n + 4] * 3, 4)
    dense = generate(sparse, batch, max_new_tokens=5, sparsify=False)
    assert dense.kv_bytes == dense.kv_bytes_dense == result.kv_bytes_dense
    assert dense.tokens == generate(plain, batch, max_new_tokens=5).tokens


def test_generation_stops_at_eos_and_rejects_packed_prompts(models):
    plain, _ = models
    batch = prompt(plain.cfg)
    first = generate(plain, batch, max_new_tokens=4).tokens
    assert generate(plain, batch, max_new_tokens=4, eos_token_id=first[1]).tokens == first[:1]
    with pytest.raises(DataError, match="one unpadded prompt"):
        generate(plain, dummy_batch(plain.cfg, [4, 5], [1, 0]), max_new_tokens=2)


@pytest.fixture
def published():
    """Vision and output-text predictors (as published), random weights: a mixed keep pattern when decoding."""
    torch.manual_seed(1)
    model = VLM(tiny_cfg(layers=LAYERS, vision_keep_rate=0.5)).eval()
    with torch.no_grad():  # peaked attention: a wrong position or a visible padding slot changes the tokens
        for layer in model.llm.layers.values():
            layer.attn.q.weight.mul_(6.0)
            layer.attn.k.weight.mul_(6.0)
    return model


def test_decode_admission_with_a_mixed_keep_pattern_equals_one_masked_pass(published):
    """Cached decoding with admissions decided on the hidden state entering sparse_layer gives the tokens and
    the keep pattern of one masked forward over prompt + fed tokens (the generated ones as the answer span).
    Bug caught: admission decided from another input (e.g. the token's embedding)."""
    batch = prompt(published.cfg, text=8, tiles=3)
    result = generate(published, batch, max_new_tokens=16)
    assert len(result.tokens) == 16 and 0 < result.decoded_cached < result.decoded == 15, result.admitted
    fed = torch.tensor([result.tokens[:-1]])
    ids = torch.cat([batch.input_ids, fed], dim=1)
    n, p = ids.shape[1], batch.input_ids.shape[1]
    full = dataclasses.replace(batch, input_ids=ids, labels=torch.cat([batch.labels, fed], dim=1),
                               position_ids=torch.arange(n)[None], cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
                               max_seqlen=n, loss_weight=torch.zeros(1, n), seqlens=None, image_tokens=None)
    logits, keep = split_output(published(full), published.cfg.sparsify)
    assert keep[0, p:].bool().tolist() == result.admitted
    assert logits[0, p - 1:].argmax(-1).tolist() == result.tokens


def test_batched_generation_equals_one_prompt_at_a_time(published):
    """Four prompts of different lengths (one text-only) decoded together, each with its own cache lengths,
    give each prompt's single-run tokens, admissions and cache size. Bugs caught: one length for every
    sample's cache, a padding slot left visible, one position counter for the batch."""
    prompts = [prompt(published.cfg, text=t, tiles=n) for t, n in ((8, 3), (14, 1), (5, 0), (11, 2))]
    single = [generate(published, q, max_new_tokens=12) for q in prompts]
    eos = single[1].tokens[4]  # stops prompt 1 (at least) early
    single = [generate(published, q, max_new_tokens=12, eos_token_id=eos) for q in prompts]
    batched = generate_batch(published, prompts, max_new_tokens=12, eos_token_id=eos)
    assert [r.tokens for r in batched] == [r.tokens for r in single]
    assert [r.admitted for r in batched] == [r.admitted for r in single]
    assert [r.kv_bytes for r in batched] == [r.kv_bytes for r in single]
    assert [r.decode_flops for r in batched] == [r.decode_flops for r in single]
    assert len({len(r.tokens) for r in batched}) > 1 and any(0 < r.decoded_cached < r.decoded for r in batched)


def test_decoding_without_cache_equals_cached_decoding_and_counts_full_passes(published):
    """The original's second mode: every step reruns prompt + generated tokens with the dropped ones removed
    from sparse_layer on (the newest kept). Same tokens as cached decoding; FLOPs = one prefill per step."""
    batch = prompt(published.cfg, text=8, tiles=3)
    cached = generate(published, batch, max_new_tokens=10)
    uncached = generate(published, batch, max_new_tokens=10, use_cache=False)
    assert uncached.tokens == cached.tokens and uncached.admitted == cached.admitted
    llm, n, kept = published.cfg.llm, batch.input_ids.shape[1], cached.prefill_kept
    expected = dense = 0.0
    for k in range(1, cached.decoded + 1):  # the k-th fed token: prompt + k tokens, sparse_layer = 1
        sparse = kept + sum(cached.admitted[:k - 1]) + 1
        expected += prefill_flops(llm, [n + k, sparse, sparse])
        dense += prefill_flops(llm, [n + k] * LAYERS)
    assert uncached.decode_flops == pytest.approx(expected) and uncached.decode_flops_dense == pytest.approx(dense)
    assert uncached.kv_bytes == 0 and cached.decode_flops < uncached.decode_flops < dense


def test_text_only_prompts_admit_every_decoded_token(published):
    """With the vision predictor on, text is sparsified only where it ran (image prompts)."""
    bias_predictors(published, keep=False)
    with_image = generate(published, prompt(published.cfg, tiles=2), max_new_tokens=6)
    text_only = generate(published, prompt(published.cfg, tiles=0), max_new_tokens=6)
    assert with_image.admitted == [False] * 5 and text_only.admitted == [True] * 5


def test_omnibal_eval_answers_the_same_batched_and_without_cache(published):
    """omnibal-eval's --batch-size and --no-kv-cache change how, not what, it answers; decoding FLOPs are summed."""
    from omnibal_pl.cli.eval import answer_questions

    questions = [{"question_id": i, "text": str(i)} for i in range(5)]
    encode = lambda q: prompt(published.cfg, text=5 + 3 * q["question_id"], tiles=q["question_id"] % 3)  # noqa: E731
    runs = {(b, c): answer_questions(published, questions, encode, lambda ids: " ".join(map(str, ids)), "tiny", 6,
                                     batch_size=b, use_cache=c)
            for b, c in ((1, True), (3, True), (2, False))}
    texts = {key: [a["text"] for a in answers] for key, (answers, _) in runs.items()}
    assert texts[(3, True)] == texts[(1, True)] == texts[(2, False)]
    cached, uncached = runs[(1, True)][1], runs[(2, False)][1]
    assert cached.decode_flops == runs[(3, True)][1].decode_flops < uncached.decode_flops < uncached.decode_flops_dense
