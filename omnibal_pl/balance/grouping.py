"""Grouping samples into micro-batches: the algorithms behind one call, :func:`group_samples`.

``balanced``, ``isf`` and LLaMA-Factory's greedy knapsack (``llamafactory``) run in the C++ core
(``csrc/``); ``random``, ``length_grouped`` and ``disttrain`` (a fixed number of samples per micro-batch)
in numpy; ms-swift's packing (``swift``) through the ``binpacking`` package ms-swift itself calls.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from omnibal_pl.balance import _core
from omnibal_pl.balance.config import CAPPED_ALGORITHMS, PACKERS, BalanceConfig
from omnibal_pl.errors import BalanceError
from omnibal_pl.lengths import LengthTable

# Hugging Face's group_by_length sorts inside random mega-batches of this many micro-batches.
LENGTH_GROUPED_MEGABATCH = 50
# ms-swift packs its (shuffled) dataset in chunks of this many samples, carrying each chunk's last bin over.
SWIFT_PACKING_CHUNK = 1000
# balanced's automatic vision quantum: this many quanta per mean sample (tables of a few tiles per sample get 1).
QUANTA_PER_MEAN_SAMPLE = 48


@dataclass
class Grouping:
    """Groups in compressed form: group ``g`` is ``indices[offsets[g]:offsets[g + 1]]`` (sample ids).

    ``vit_cap``/``token_cap`` are the shapes a micro-batch is padded to: the algorithm's caps, or for
    the cap-free baselines the largest group's sums (the packers: the token cap they packed to, and the
    largest group's tiles).
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
        return segment_sums(table.vit[self.indices], self.offsets), segment_sums(table.tokens[self.indices], self.offsets)

    def subset(self, groups: np.ndarray) -> "Grouping":
        """The given groups, in that order."""
        groups = np.asarray(groups, dtype=np.int64)
        sizes = self.sizes()[groups]
        offsets = np.zeros(len(groups) + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        # position k of the output reads self.indices[start of its group + its rank inside the group]
        starts = np.repeat(self.offsets[groups] - offsets[:-1], sizes)
        idx = self.indices[starts + np.arange(int(offsets[-1]), dtype=np.int64)]
        return Grouping(idx, offsets, self.vit_cap, self.token_cap, self.algorithm, self.oversize)


def segment_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sum of ``values`` over each segment ``[offsets[g], offsets[g + 1])`` (int64 for integers, else float64)."""
    dtype = np.int64 if np.issubdtype(values.dtype, np.integer) else np.float64
    csum = np.zeros(len(values) + 1, dtype)
    np.cumsum(values, out=csum[1:])
    return csum[offsets[1:]] - csum[offsets[:-1]]


def auto_vit_quantum(table: LengthTable) -> int:
    """``balanced``'s vision quantum for ``table`` when ``balance.vit_quantum`` is unset: the mean sample's vision
    count / :data:`QUANTA_PER_MEAN_SAMPLE`, at least 1. Tiles (InternVL/LLaVA, ~4 per sample) get 1, exact tiles;
    Qwen's merge blocks (~660 per sample) get ~13, so a sample loses under half a quantum (~1%) to rounding."""
    return max(1, int(table.total_vit / max(len(table), 1) / QUANTA_PER_MEAN_SAMPLE))


def group_samples(table: LengthTable, cfg: BalanceConfig, vit_cap: int | None = None, token_cap: int | None = None,
                  seed: int | None = None) -> Grouping:
    """Groups every sample of ``table`` once with ``cfg.algorithm``.

    Caps default to ``cfg``'s; ``balanced`` and ``isf`` need them resolved, the packers need the token cap (see
    :func:`omnibal_pl.balance.search.resolve_caps`). ``seed`` overrides ``cfg.seed`` (the sampler passes one
    per epoch). ``balanced`` counts vision in quanta of ``cfg.vit_quantum`` (unset: :func:`auto_vit_quantum`).
    """
    vit_cap = cfg.vit_cap if vit_cap is None else vit_cap
    token_cap = cfg.token_cap if token_cap is None else token_cap
    seed = cfg.seed if seed is None else seed
    if cfg.algorithm in CAPPED_ALGORITHMS:
        if vit_cap is None or token_cap is None:
            raise BalanceError(f"{cfg.algorithm} needs both caps; set balance.vit_cap and balance.token_cap "
                               "or resolve them with omnibal_pl.balance.resolve_caps")
        with _oversize_as_balance_error():
            if cfg.algorithm == "balanced":
                quantum = auto_vit_quantum(table) if cfg.vit_quantum is None else cfg.vit_quantum
                if quantum > vit_cap:
                    raise BalanceError(f"balance.vit_quantum={quantum} is larger than balance.vit_cap={vit_cap}: a group "
                                       "holds vit_cap // vit_quantum quanta; lower the quantum or raise the cap")
                idx, off, n_over = _core.balanced(table.vit, table.tokens, vit_cap, token_cap, quantum, seed,
                                                  cfg.oversize)
            else:
                threshold = token_cap - 128 if cfg.token_threshold is None else cfg.token_threshold
                idx, off, n_over = _core.isf(table.vit, table.tokens, vit_cap, token_cap, threshold, cfg.iterations,
                                             seed, cfg.oversize)
        return Grouping(idx, off, int(vit_cap), int(token_cap), cfg.algorithm, int(n_over))
    if cfg.algorithm in PACKERS:
        if token_cap is None:
            raise BalanceError(f"{cfg.algorithm} packs to a token cap; set balance.token_cap or resolve it with "
                               "omnibal_pl.balance.resolve_caps")
        return _pack(table, cfg, int(token_cap), seed)
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


def _pack(table: LengthTable, cfg: BalanceConfig, token_cap: int, seed: int) -> Grouping:
    """A packer's groups, shuffled as its trainer's random sampler takes them; the tile cap is the largest group's."""
    with _oversize_as_balance_error():
        if cfg.algorithm == "llamafactory":
            idx, off, n_over = _core.greedy_knapsack(table.vit, table.tokens, token_cap, seed, cfg.oversize)
        else:
            idx, off, n_over = _swift_packing(table, token_cap, seed, cfg.oversize)
    packed = Grouping(idx, off, 0, token_cap, cfg.algorithm, int(n_over))
    shuffled = packed.subset(np.random.default_rng(seed).permutation(len(packed)))
    shuffled.vit_cap = int(shuffled.sums(table)[0].max())
    return shuffled


def _swift_packing(table: LengthTable, token_cap: int, seed: int, oversize: str) -> tuple[np.ndarray, np.ndarray, int]:
    """ms-swift's packing: the shuffled samples in chunks of ``SWIFT_PACKING_CHUNK``, each chunk (plus the bin
    carried from the previous one) packed by ``binpacking.to_constant_volume`` on tokens; the last bin of every
    chunk but the final one is carried into the next. Returns CSR groups and the oversize count."""
    try:
        import binpacking
    except ImportError:
        raise BalanceError("balance.algorithm=swift uses the binpacking package (as ms-swift does): "
                           "pip install 'omnibal_pl[baselines]' or pip install binpacking") from None
    over = np.flatnonzero(table.tokens > token_cap)
    if len(over) and oversize == "error":
        raise _core.OversizeError(f"sample {over[0]} has {table.tokens[over[0]]} tokens, over the token cap "
                                  f"{token_cap}; raise balance.token_cap or use oversize=solo")
    order = np.random.default_rng(seed).permutation(len(table))
    order = order[table.tokens[order] <= token_cap]
    tokens = table.tokens
    groups: list[list[int]] = [[int(i)] for i in over]
    carried: list[tuple[int, int]] = []
    for start in range(0, len(order), SWIFT_PACKING_CHUNK):
        chunk = carried + [(int(i), int(tokens[i])) for i in order[start : start + SWIFT_PACKING_CHUNK]]
        bins = [[i for i, _ in b] for b in binpacking.to_constant_volume(chunk, token_cap, weight_pos=1) if b]
        final = start + SWIFT_PACKING_CHUNK >= len(order)
        carried = [] if final else [(i, int(tokens[i])) for i in bins.pop()]
        groups.extend(bins)
    sizes = np.array([len(g) for g in groups], np.int64)
    offsets = np.zeros(len(groups) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    indices = np.array([i for g in groups for i in g], np.int64)
    return indices, offsets, len(over)


@contextmanager
def _oversize_as_balance_error() -> Iterator[None]:
    try:
        yield
    except _core.OversizeError as e:
        raise BalanceError(str(e)) from None
