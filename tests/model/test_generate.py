"""KV-cache generation with Dynamic-LLaVA's prefill removal and decoding cache admission."""
import dataclasses

import pytest
import torch

from omnibal_pl.errors import DataError
from omnibal_pl.model import VLM, VLMConfig, dummy_batch
from omnibal_pl.model.generate import generate, kv_cache_bytes, prefill, prefill_flops
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
    torch.testing.assert_close(head.out(head.norm(pre.hidden)), logits[:, pre.kept], rtol=1e-4, atol=1e-4)


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
