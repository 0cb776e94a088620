"""Random :class:`PackedBatch` es (Qwen models: :class:`QwenPackedBatch` es) that fit a model config: for tests,
profiling and benchmarks."""
from __future__ import annotations

from typing import Sequence

import torch

from omnibal_pl.batch import PackedBatch
from omnibal_pl.errors import ConfigError
from omnibal_pl.model.config import VLMConfig
from omnibal_pl.qwen_batch import QwenPackedBatch, pack_qwen_vision


def dummy_batch(
    cfg: VLMConfig,
    text_tokens: Sequence[int],
    tiles: Sequence[int],
    token_cap: int | None = None,
    vit_cap: int | None = None,
    seed: int = 0,
) -> PackedBatch:
    """One packed micro-batch of ``len(text_tokens)`` samples with random pixels and token ids.

    Sample ``k`` has ``tiles[k]`` real tiles whose ``tiles[k] * tokens_per_tile`` context tokens follow
    its first text token, then the rest of its ``text_tokens[k]`` text tokens (>= 1). The sequence is
    padded to ``token_cap`` tokens (a trailing padding segment) and the tiles to ``vit_cap`` with
    flag-0 dummies (at least one tile, as a text-only batch still runs the encoder).
    """
    if len(text_tokens) != len(tiles) or not text_tokens or min(text_tokens) < 1:
        raise ConfigError(f"dummy_batch: need one text length >= 1 per sample, got {text_tokens} and tiles {tiles}")
    gen = torch.Generator().manual_seed(seed)
    tpt = cfg.tokens_per_tile
    ids, pos, labels, seqlens = [], [], [], []
    for text, n in zip(text_tokens, tiles):
        words = torch.randint(0, cfg.llm.vocab_size - 1, (text,), generator=gen)
        words[words >= cfg.image_context_id] += 1  # never the image-context id
        image = torch.full((n * tpt,), cfg.image_context_id)
        sample = torch.cat([words[:1], image, words[1:]])
        ids.append(sample)
        labels.append(torch.where(sample == cfg.image_context_id, -100, sample))
        pos.append(torch.arange(len(sample)))
        seqlens.append(len(sample))
    used = sum(seqlens)
    length = token_cap if token_cap is not None else used
    if length < used:
        raise ConfigError(f"dummy_batch: samples need {used} tokens, more than token_cap {token_cap}")
    if length > used:
        ids.append(torch.zeros(length - used, dtype=torch.long))
        labels.append(torch.full((length - used,), -100))
        pos.append(torch.arange(length - used))
        seqlens.append(length - used)
    num_tiles = max(sum(tiles), vit_cap or 0, 1)
    flags = torch.zeros(num_tiles, dtype=torch.long)
    flags[: sum(tiles)] = 1
    labels_t = torch.cat(labels).unsqueeze(0)
    size = cfg.vision.image_size
    common = dict(input_ids=torch.cat(ids).unsqueeze(0), labels=labels_t,
                  cu_seqlens=torch.tensor([0] + seqlens, dtype=torch.int32).cumsum(0, dtype=torch.int32),
                  max_seqlen=max(seqlens), loss_weight=(labels_t != -100).float(),
                  sample_ids=torch.arange(len(text_tokens)), num_samples=len(text_tokens))
    if cfg.vision.family != "vit":  # Qwen: sample k's tiles are one image of 1 x tiles[k] merge blocks
        v, m = cfg.vision, cfg.vision.spatial_merge
        patches = [torch.randn(m * m * n, 3 * v.temporal_patch_size * v.patch_size**2, generator=gen) for n in tiles]
        vision = pack_qwen_vision(ids[: len(tiles)], patches, [[(1, m, m * n)] if n else [] for n in tiles],
                                  cfg.image_context_id, m, length, num_tiles)
        return QwenPackedBatch(position_ids=vision.position_ids, pixel_values=vision.pixel_values,
                               image_flags=vision.image_flags, image_grids=vision.image_grids, **common)
    return PackedBatch(position_ids=torch.cat(pos).unsqueeze(0), image_flags=flags,
                       pixel_values=torch.randn(num_tiles, 3, size, size, generator=gen), **common)
