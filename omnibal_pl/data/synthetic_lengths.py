"""Synthetic length statistics that follow the real InternVL SFT mix: the embedded default data.

``length_histogram.json`` (next to this file, made by ``scripts/make_length_histogram.py``) counts
samples per (tiles, real tiles, 32-token bin) over OmniBal's four published statistics files. A
synthetic table draws cells in proportion to those counts and a token count uniformly inside the
cell's bin, so a fresh clone can run the balance and training jobs without the files.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from omnibal_pl.errors import ConfigError
from omnibal_pl.lengths import LengthTable

HISTOGRAM_PATH = Path(__file__).with_name("length_histogram.json")
TOKEN_BIN = 32
EMBEDDED_SAMPLES = 70706  # as many samples as the four summarised files


@lru_cache(maxsize=1)
def _histogram() -> np.ndarray:
    data = json.loads(HISTOGRAM_PATH.read_text())
    return np.asarray(data["cells"], dtype=np.int64)  # [cells, (vit, image_flag, token_bin, count)]


def synthetic_lengths(samples: int = EMBEDDED_SAMPLES, seed: int = 0, max_tokens: int | None = None) -> LengthTable:
    """``samples`` rows drawn from the embedded histogram (deterministic per seed).

    ``max_tokens`` rescales token counts so the longest possible sample has at most that many tokens
    (for tiny models with short contexts); tiles are kept.
    """
    if samples < 1:
        raise ConfigError(f"synthetic samples={samples}: must be >= 1")
    cells = _histogram()
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(cells), size=samples, p=cells[:, 3] / cells[:, 3].sum())
    vit, flag, token_bin = cells[pick, 0], cells[pick, 1], cells[pick, 2]
    tokens = token_bin * TOKEN_BIN + rng.integers(0, TOKEN_BIN, size=samples)
    tokens = np.maximum(tokens, 1)
    if max_tokens is not None:
        top = (cells[:, 2].max() + 1) * TOKEN_BIN
        tokens = np.maximum(1, tokens * max_tokens // top)
    return LengthTable(vit, tokens, flag, np.zeros(samples, np.int16), ["synthetic"])


SOURCE_TOKENS_PER_TILE = 256  # LLM tokens per tile behind the embedded statistics (InternVL-Chat-V1.5)


def adapt_to_model(table: LengthTable, tokens_per_tile: int, text_scale: float = 1.0,
                   source_tokens_per_tile: int = SOURCE_TOKENS_PER_TILE) -> LengthTable:
    """The same samples for a model with ``tokens_per_tile`` LLM tokens per tile.

    Image tokens become ``image_flag x tokens_per_tile``; text tokens (the rest) are scaled by
    ``text_scale`` and kept >= 1. Identity for ``tokens_per_tile = 256`` and ``text_scale = 1``.
    """
    if tokens_per_tile < 1 or text_scale <= 0:
        raise ConfigError(f"tokens_per_tile={tokens_per_tile}, text_scale={text_scale}: both must be positive")
    image = table.image_flag.astype(np.int64)
    text = np.maximum(table.tokens.astype(np.int64) - image * source_tokens_per_tile, 1)
    text = np.maximum(np.rint(text * text_scale).astype(np.int64), 1)
    return LengthTable(table.vit, image * tokens_per_tile + text, table.image_flag, table.source, table.sources)


def truncate_text(table: LengthTable, token_cap: int, tokens_per_tile: int) -> LengthTable:
    """The same samples with their text cut so none is longer than ``token_cap`` tokens (image tokens are
    never cut), as a real dataset's ``overlong=truncate`` does; keeps at least one text token."""
    image = table.image_flag.astype(np.int64) * tokens_per_tile
    if (image + 1 > token_cap).any():
        worst = int(image.max())
        raise ConfigError(f"a synthetic sample has {worst} image tokens, more than the token cap {token_cap} allows; "
                          "raise balance.token_cap or use a model with fewer tokens per tile")
    return LengthTable(table.vit, np.minimum(table.tokens, token_cap), table.image_flag, table.source, table.sources)
