"""Argument search: the caps (Q_v tiles, Q_t tokens) for a wanted number of samples per group.

- ``isf``: the published search, reproduced: start from Q_t = 4096 and Q_v = 4096 / (mean tokens per
  tile, from token counts rounded up to 256 and rounded to 16), step Q_v by 1 and Q_t by that mean,
  score pad + vit dist + llm dist ratios with the Megatron sampler at ``dp`` (one group per rank per
  step) and keep settings whose mean group size is in [m, m + 1].
- ``balanced``: Q_v around (m + 1/2) x mean tiles per sample (multiples of the vision quantum, at most
  ``MAX_VIT_CAPS`` of them: Qwen's merge blocks give hundreds of possible caps), Q_t = Q_v x the data's tokens
  per tile x (1 + slack) for a few slacks; each candidate grouped once and scored by pad + dist ratios +
  the padding waste of both caps (2 - vit_fill - token_fill); mean group size in [m, m + 1]. Caps the
  algorithm fills to within 1% of the fewest possible groups (max(tiles / Q_v, tokens / Q_t)) are
  preferred: a cap pair too tight for the data's token-heavy samples leaves short groups behind.
- ``llamafactory`` / ``swift`` (the packers) pack to a token cap only: the one ``balanced`` searches, so
  every algorithm fills the same token budget per micro-batch; their tile cap stays unset.
- ``random`` / ``length_grouped`` / ``disttrain`` have no caps.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from omnibal_pl.balance.config import PACKERS, BalanceConfig
from omnibal_pl.balance.grouping import auto_vit_quantum, group_samples
from omnibal_pl.balance.metrics import balance_metrics
from omnibal_pl.balance.steps import arrange_steps
from omnibal_pl.batch import MicroBatchShape
from omnibal_pl.errors import BalanceError, ConfigError
from omnibal_pl.lengths import LengthTable

BALANCED_TOKEN_SLACKS = (0.0, 0.01, 0.02, 0.03, 0.05)
ISF_MAX_EVALUATIONS = 200
FILLABLE_GROUP_EXCESS = 1.01  # groups / lower bound under which a cap pair counts as fillable
MAX_VIT_CAPS = 8  # balanced: vision caps tried (evenly spaced multiples of the quantum)


@dataclass
class CapSearch:
    """The chosen caps and how they were found (``candidates``: [vit_cap, token_cap, score, avg size]);
    ``vit_quantum``: ``balanced``'s vision quantum, fixed with the caps (1 for the other algorithms)."""

    vit_cap: int
    token_cap: int
    seconds: float
    candidates: list[list[float]] = field(default_factory=list)
    vit_quantum: int = 1


def evaluate(table: LengthTable, cfg: BalanceConfig, vit_cap: int, token_cap: int) -> dict[str, Any]:
    """Groups once with these caps and returns the metrics at ``cfg.dp``, one group per rank per step."""
    one = replace(cfg, micro_batches=1, vit_cap=vit_cap, token_cap=token_cap)
    grouping = group_samples(table, one)
    return balance_metrics(table, grouping, arrange_steps(table, grouping, one))


def resolve_caps(table: LengthTable, cfg: BalanceConfig) -> CapSearch:
    """The caps to use: ``cfg``'s when both are set, else the algorithm's search (keeping a set one fixed)."""
    if cfg.algorithm == "balanced":
        cfg = replace(cfg, vit_quantum=auto_vit_quantum(table) if cfg.vit_quantum is None else cfg.vit_quantum)
    if cfg.vit_cap is not None and cfg.token_cap is not None:
        return CapSearch(int(cfg.vit_cap), int(cfg.token_cap), 0.0, vit_quantum=cfg.vit_quantum or 1)
    start = time.perf_counter()
    if cfg.algorithm == "isf":
        found = _search_isf(table, cfg)
    elif cfg.algorithm == "balanced":
        found = _search_balanced(table, cfg)
    elif cfg.algorithm in PACKERS:
        if cfg.token_cap is not None:
            return CapSearch(0, int(cfg.token_cap), 0.0)
        ours = _search_balanced(table, replace(cfg, algorithm="balanced", vit_cap=None))
        found = CapSearch(0, ours.token_cap, 0.0, ours.candidates)
    else:
        return CapSearch(0, 0, 0.0)
    found.seconds = time.perf_counter() - start
    return found


def resolve_shape(table: LengthTable, cfg: BalanceConfig) -> tuple[BalanceConfig, CapSearch]:
    """``cfg`` with its caps resolved, and how: the one caps path of every command.

    Caps set in ``cfg`` are kept; the others are searched on ``table`` for ``cfg.dp`` data-parallel ranks
    (give the run's real DP size). Cap-free algorithms (``random``, ``length_grouped``) keep None.
    """
    found = resolve_caps(table, cfg)
    quantum = found.vit_quantum if cfg.algorithm == "balanced" else cfg.vit_quantum
    return replace(cfg, vit_cap=found.vit_cap or None, token_cap=found.token_cap or None, vit_quantum=quantum), found


def micro_batch_shape(cfg: BalanceConfig) -> MicroBatchShape:
    """The fixed micro-batch shape of a resolved config (see :func:`resolve_shape`)."""
    if cfg.vit_cap is None or cfg.token_cap is None:
        raise ConfigError(f"balance.algorithm={cfg.algorithm} has no caps, so micro-batches have no fixed shape; set "
                          "balance.vit_cap and balance.token_cap, or use balance=balanced")
    return MicroBatchShape(int(cfg.vit_cap), int(cfg.token_cap), cfg.samples_per_group)


def _score(m: dict[str, Any]) -> float:
    return m["pad_ratio"] + m["vit_dist_ratio"] + m["llm_dist_ratio"]


def _in_range(avg: float, want: int) -> bool:
    return want <= avg <= want + 1


def _search_balanced(table: LengthTable, cfg: BalanceConfig) -> CapSearch:
    want = cfg.samples_per_group
    mean_vit = table.total_vit / len(table)
    tokens_per_tile = table.total_tokens / table.total_vit
    quantum = auto_vit_quantum(table) if cfg.vit_quantum is None else cfg.vit_quantum
    centre = max(1, round((want + 0.5) * mean_vit))
    low, high = max(quantum, math.floor(want * mean_vit)), math.ceil((want + 1) * mean_vit)
    step = quantum * max(1, math.ceil((high - low) / quantum / MAX_VIT_CAPS))
    spaced = range(_round_up(low, quantum), high + 1, step)
    vit_caps = [cfg.vit_cap] if cfg.vit_cap is not None else sorted(spaced, key=lambda v: abs(v - centre))
    best: tuple[bool, float, int, int] | None = None
    tried = []
    for vit_cap in vit_caps:
        vit_cap = max(vit_cap, int(table.vit.min()))
        if cfg.token_cap is not None:
            token_caps = [int(cfg.token_cap)]
        else:
            token_caps = sorted({_round_up(vit_cap * tokens_per_tile * (1 + s), 8) for s in BALANCED_TOKEN_SLACKS})
        for token_cap in token_caps:
            m = evaluate(table, cfg, vit_cap, token_cap)
            score = _score(m) + (2.0 - m["vit_fill"] - m["token_fill"])
            tried.append([vit_cap, token_cap, score, m["avg_group_size"]])
            rank = (m["groups_vs_lower_bound"] > FILLABLE_GROUP_EXCESS, score, vit_cap, token_cap)
            if _in_range(m["avg_group_size"], want) and (best is None or rank < best):
                best = rank
    if best is None:
        raise BalanceError(f"balanced search found no caps giving {want}-{want + 1} samples per group "
                           f"(tried {len(tried)}); set balance.vit_cap and balance.token_cap by hand")
    return CapSearch(best[2], best[3], 0.0, tried, quantum)


def _round_up(x: float, step: int) -> int:
    return int(math.ceil(x / step) * step)


def _search_isf(table: LengthTable, cfg: BalanceConfig) -> CapSearch:
    want = cfg.samples_per_group
    mean_vit = float(table.vit.mean())
    mean_binned_tokens = float((np.ceil(table.tokens / 256) * 256).mean())
    tokens_per_tile = int(((mean_binned_tokens // max(mean_vit, 1) + 1) // 16) * 16)
    if tokens_per_tile < 1:
        raise BalanceError(f"ISF's published search steps the token cap by the mean tokens per tile rounded to 16, "
                           f"which is 0 here ({mean_binned_tokens / max(mean_vit, 1):.2f} tokens per vision unit: "
                           "merge blocks, not tiles); set balance.vit_cap and balance.token_cap by hand")
    token_cap = 4096
    vit_cap = max(1, token_cap // tokens_per_tile)
    results: list[list[float]] = []
    tried: list[list[float]] = []
    max_avg = 0.0
    for _ in range(ISF_MAX_EVALUATIONS):
        m = evaluate(table, replace(cfg, token_threshold=token_cap - 128), vit_cap, token_cap)
        avg = m["avg_group_size"]
        max_avg = max(max_avg, avg)
        tried.append([vit_cap, token_cap, _score(m), avg])
        if _in_range(avg, want):
            results.append([_score(m), vit_cap, token_cap])
        if max_avg > want + 1:
            if results:
                break
            vit_cap, token_cap = vit_cap - 1, token_cap - tokens_per_tile
        else:
            vit_cap, token_cap = vit_cap + 1, token_cap + tokens_per_tile
        if vit_cap < 1:
            break
    if not results:
        raise BalanceError(f"ISF search found no caps giving {want}-{want + 1} samples per group "
                           f"after {len(tried)} settings; set balance.vit_cap and balance.token_cap by hand")
    _, vit_cap, token_cap = min(results)
    return CapSearch(int(vit_cap), int(token_cap), 0.0, tried)
