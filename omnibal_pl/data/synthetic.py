"""A dataset whose samples have exactly the lengths of a :class:`LengthTable` (random content).

Row ``i``: ``vit[i]`` tiles, the first ``image_flag[i]`` flagged real (random normal pixels), the rest
zero dummies; ``tokens[i]`` tokens laid out as ``[t0, <ctx> x image_flag[i]*tokens_per_tile, t1..]``
with text tokens never equal to ``image_context_id``, the last half of the text supervised and the first
token never. Content is a pure function of ``(seed, i)``.

Text is a noisy bigram chain: a random first token, then each token is ``(MULT * prev + 1) mod V``
with probability ``1 - TEXT_NOISE`` and uniform otherwise. So a model has something to learn (the
loss falls from ln V towards the chain's entropy) while every token id stays equally frequent.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from omnibal_pl.data.datasets import Sample
from omnibal_pl.batch import IGNORE_INDEX
from omnibal_pl.errors import DataError
from omnibal_pl.lengths import LengthTable, load_lengths


MULT = 31
TEXT_NOISE = 0.1


def bigram_chain(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    """``n`` token ids in [0, vocab): a noisy deterministic bigram chain (see the module docstring)."""
    noise = rng.integers(0, vocab, size=n)
    follow = rng.random(n) >= TEXT_NOISE
    out = np.empty(n, np.int64)
    prev = int(noise[0])
    out[0] = prev
    for k in range(1, n):
        prev = (MULT * prev + 1) % vocab if follow[k] else int(noise[k])
        out[k] = prev
    return out


class SyntheticDataset(torch.utils.data.Dataset):
    """Random samples shaped by ``lengths`` (a table or a statistics file path)."""

    def __init__(
        self,
        lengths: LengthTable | str | Path,
        vocab_size: int = 32000,
        image_size: int = 448,
        tokens_per_tile: int = 256,
        image_context_id: int = 0,
        seed: int = 0,
    ) -> None:
        table = lengths if isinstance(lengths, LengthTable) else load_lengths(lengths)
        if len(table) == 0:
            raise DataError("synthetic dataset: the length table is empty")
        if vocab_size < 2:
            raise DataError(f"synthetic dataset: vocab_size={vocab_size} must be >= 2")
        text = table.tokens.astype(np.int64) - table.image_flag.astype(np.int64) * tokens_per_tile
        bad = np.flatnonzero(text < 1)
        if bad.size:
            r = int(bad[0])
            raise DataError(f"synthetic dataset: row {r} has {table.tokens[r]} tokens but {table.image_flag[r]} real tiles "
                            f"x {tokens_per_tile} tokens_per_tile need more ({bad.size} such rows); "
                            "fix tokens_per_tile or the statistics")
        self.table = table
        self.vocab_size = vocab_size
        self.image_size = image_size
        self.tokens_per_tile = tokens_per_tile
        self.image_context_id = image_context_id
        self.seed = seed

    def __len__(self) -> int:
        return len(self.table)

    def lengths(self) -> LengthTable:
        """The table the samples follow (row ``i`` matches ``self[i]``)."""
        return self.table

    def __getitem__(self, i: int) -> Sample:
        i = int(i)
        rng = np.random.default_rng((self.seed, i))
        vit, tokens, real = int(self.table.vit[i]), int(self.table.tokens[i]), int(self.table.image_flag[i])
        n_image = real * self.tokens_per_tile
        n_text = tokens - n_image
        text = bigram_chain(rng, n_text, self.vocab_size - 1)
        text[text >= self.image_context_id] += 1  # skip the image-context id
        ids = np.concatenate([text[:1], np.full(n_image, self.image_context_id), text[1:]])
        labels = np.full(tokens, IGNORE_INDEX, np.int64)
        answer = n_text // 2  # supervised text tokens, never the first
        if answer:
            labels[tokens - answer :] = ids[tokens - answer :]
        pixels = torch.zeros(vit, 3, self.image_size, self.image_size)
        pixels[:real] = torch.from_numpy(rng.standard_normal((real, 3, self.image_size, self.image_size), np.float32))
        flags = torch.zeros(vit, dtype=torch.int64)
        flags[:real] = 1
        return Sample(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(labels), pixels, flags, i)
