"""Grouping samples into micro-batches: the algorithms behind one call, :func:`group_samples`.

``balanced`` and ``isf`` run in the C++ core (``csrc/``); ``random`` and ``length_grouped`` are the
usual baselines (a fixed number of samples per micro-batch), in numpy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from omnibal_pl.balance import _core
from omnibal_pl.balance.config import BalanceConfig
from omnibal_pl.errors import BalanceError
from omnibal_pl.lengths import LengthTable

# Hugging Face's group_by_length sorts inside random mega-batches of this many micro-batches.
LENGTH_GROUPED_MEGABATCH = 50


@dataclass
class Grouping:
    """Groups in compressed form: group ``g`` is ``indices[offsets[g]:offsets[g + 1]]`` (sample ids).

    ``vit_cap``/``token_cap`` are the shapes a micro-batch is padded to: the algorithm's caps, or for
    the cap-free baselines the largest group's sums.
    """

    indices: np.ndarray
    offsets: np.ndarray
    vit_cap: int
    token_cap: int
    algorithm: str
    oversize: int = 0  # samples placed alone because they exceed a cap

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def group(self, g: int) -> np.ndarray:
        return self.indices[self.offsets[g] : self.offsets[g + 1]]

    def sizes(self) -> np.ndarray:
        """Samples per group."""
        return np.diff(self.offsets)

    def sums(self, table: LengthTable) -> tuple[np.ndarray, np.ndarray]:
        """Tiles and tokens per group (int64)."""
        return _segment_sums(table.vit[self.indices], self.offsets), _segment_sums(table.tokens[self.indices], self.offsets)

    def subset(self, groups: np.ndarray) -> "Grouping":
        """The given groups, in that order."""
        groups = np.asarray(groups, dtype=np.int64)
        sizes = self.sizes()[groups]
        offsets = np.zeros(len(groups) + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        idx = np.concatenate([self.group(g) for g in groups]) if len(groups) else np.zeros(0, np.int64)
        return Grouping(idx, offsets, self.vit_cap, self.token_cap, self.algorithm, self.oversize)


def _segment_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    csum = np.zeros(len(values) + 1, np.int64)
    np.cumsum(values, out=csum[1:])
    return csum[offsets[1:]] - csum[offsets[:-1]]


def group_samples(table: LengthTable, cfg: BalanceConfig, vit_cap: int | None = None, token_cap: int | None = None,
                  seed: int | None = None) -> Grouping:
    """Groups every sample of ``table`` once with ``cfg.algorithm``.

    Caps default to ``cfg``'s; ``balanced`` and ``isf`` need them resolved (see
    :func:`omnibal_pl.balance.search.resolve_caps`). ``seed`` overrides ``cfg.seed`` (the sampler
    passes one per epoch).
    """
    vit_cap = cfg.vit_cap if vit_cap is None else vit_cap
    token_cap = cfg.token_cap if token_cap is None else token_cap
    seed = cfg.seed if seed is None else seed
    if cfg.algorithm in ("balanced", "isf"):
        if vit_cap is None or token_cap is None:
            raise BalanceError(f"{cfg.algorithm} needs both caps; set balance.vit_cap and balance.token_cap "
                               "or resolve them with omnibal_pl.balance.resolve_caps")
        try:
            if cfg.algorithm == "balanced":
                idx, off, n_over = _core.balanced(table.vit, table.tokens, vit_cap, token_cap, seed, cfg.oversize)
            else:
                threshold = token_cap - 128 if cfg.token_threshold is None else cfg.token_threshold
                idx, off, n_over = _core.isf(table.vit, table.tokens, vit_cap, token_cap, threshold, cfg.iterations,
                                             seed, cfg.oversize)
        except _core.OversizeError as e:
            raise BalanceError(str(e)) from None
        return Grouping(idx, off, int(vit_cap), int(token_cap), cfg.algorithm, int(n_over))
    order = np.random.default_rng(seed).permutation(len(table))
    m = cfg.samples_per_group
    if cfg.algorithm == "length_grouped":
        mega = m * cfg.groups_per_step * LENGTH_GROUPED_MEGABATCH
        for start in range(0, len(order), mega):
            chunk = order[start : start + mega]
            order[start : start + mega] = chunk[np.argsort(-table.tokens[chunk], kind="stable")]
    offsets = np.append(np.arange(0, len(order), m), len(order)).astype(np.int64)
    grouping = Grouping(order.astype(np.int64), offsets, 0, 0, cfg.algorithm)
    v, t = grouping.sums(table)
    grouping.vit_cap, grouping.token_cap = int(v.max()), int(t.max())
    return grouping
