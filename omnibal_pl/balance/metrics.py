"""Balance metrics of a grouping arranged into steps (names and meanings fixed by the balance-core issue).

- ``vit_dist_ratio`` / ``llm_dist_ratio``: per step, sum over DP ranks of (max - x_r) / (max * dp), x_r the
  rank's tile (token) load in that step; averaged over steps. 0 is perfect.
- ``pad_ratio``: padded tokens / all tokens when, in every step and micro-batch slot, each rank's group is
  padded to the longest group of that slot.
- ``vit_fill`` / ``token_fill``: mean over groups of group sum / cap (how full the padded shapes are).
- ``max_mean_vit`` / ``max_mean_tokens``: mean over steps of (max rank load / mean rank load): the slowest
  rank's excess over the average.
- ``time_dist_ratio`` / ``max_mean_time``: the same two for each rank's modelled time (seconds of its
  micro-batches under a fitted :class:`~omnibal_pl.balance.cost.TimeModel`); only when a model is given.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from omnibal_pl.balance.cost import TimeModel, group_features
from omnibal_pl.balance.grouping import Grouping
from omnibal_pl.balance.steps import Steps
from omnibal_pl.lengths import LengthTable


def dist_ratio(loads: np.ndarray) -> float:
    """Mean over steps of sum_r (max - x_r) / (max * dp); ``loads`` is [steps, dp]."""
    if loads.size == 0:
        return 0.0
    peak = loads.max(axis=1).astype(np.float64)
    waste = (peak[:, None] - loads).sum(axis=1)
    per_step = np.divide(waste, peak * loads.shape[1], out=np.zeros_like(peak), where=peak > 0)
    return float(per_step.mean())


def pad_ratio(slot_tokens: np.ndarray) -> float:
    """Padded / all tokens when each slot pads to its longest group; ``slot_tokens`` is [steps, dp, micro]."""
    if slot_tokens.size == 0:
        return 0.0
    peak = slot_tokens.max(axis=1, keepdims=True)
    total = float(peak.sum() * slot_tokens.shape[1])
    return float((peak - slot_tokens).sum() / total) if total else 0.0


def max_over_mean(loads: np.ndarray) -> float:
    """Mean over steps of max / mean rank load (1.0 is perfect)."""
    if loads.size == 0:
        return 1.0
    mean = loads.mean(axis=1)
    return float(np.mean(np.divide(loads.max(axis=1), mean, out=np.ones_like(mean, dtype=np.float64), where=mean > 0)))


def balance_metrics(table: LengthTable, grouping: Grouping, steps: Steps,
                    time_model: TimeModel | None = None) -> dict[str, Any]:
    """All metrics of one grouping and step arrangement, JSON-ready (the modelled-time ones with ``time_model``)."""
    vit_sums, tok_sums = grouping.sums(table)
    rank_vit = vit_sums[steps.groups].sum(axis=2)
    rank_tok = tok_sums[steps.groups].sum(axis=2)
    grouped = np.zeros(len(table), np.int64)
    np.add.at(grouped, grouping.indices, 1)
    n_groups = len(grouping)
    timing = {}
    if time_model is not None:
        rank_time = time_model.predict(group_features(table, grouping))[steps.groups].sum(axis=2)
        timing = {"time_dist_ratio": dist_ratio(rank_time), "max_mean_time": max_over_mean(rank_time)}
    return {
        "algorithm": grouping.algorithm,
        "samples": len(table),
        "samples_grouped": int((grouped > 0).sum()),
        "samples_lost": int((grouped == 0).sum()),
        "samples_repeated": int((grouped > 1).sum()),
        "samples_oversize": grouping.oversize,
        "groups": n_groups,
        "avg_group_size": float(len(grouping.indices) / max(n_groups, 1)),
        "vit_cap": grouping.vit_cap,
        "token_cap": grouping.token_cap,
        "steps": steps.num_steps,
        "groups_in_partial_step": int(len(steps.leftover)),
        "vit_dist_ratio": dist_ratio(rank_vit),
        "llm_dist_ratio": dist_ratio(rank_tok),
        "pad_ratio": pad_ratio(tok_sums[steps.groups]),
        "vit_fill": float(vit_sums.mean() / grouping.vit_cap) if n_groups else 0.0,
        "token_fill": float(tok_sums.mean() / grouping.token_cap) if n_groups else 0.0,
        "max_mean_vit": max_over_mean(rank_vit),
        "max_mean_tokens": max_over_mean(rank_tok),
        "groups_vs_lower_bound": float(n_groups / max(table.total_vit / grouping.vit_cap,
                                                      table.total_tokens / grouping.token_cap)) if n_groups else 0.0,
        **timing,
    }


def per_source(table: LengthTable, grouping: Grouping) -> dict[str, dict[str, Any]]:
    """Per source file: samples, tiles, tokens, samples grouped and the mean fill of the groups holding them."""
    vit_sums, tok_sums = grouping.sums(table)
    group_of = np.full(len(table), -1, np.int64)
    group_of[grouping.indices] = np.repeat(np.arange(len(grouping)), grouping.sizes())
    out = {}
    for s, name in enumerate(table.sources):
        rows = np.flatnonzero(table.source == s)
        held = group_of[rows]
        held = held[held >= 0]
        out[name] = {
            "samples": int(len(rows)),
            "tiles": int(table.vit[rows].sum()),
            "tokens": int(table.tokens[rows].sum()),
            "samples_grouped": int(len(held)),
            "vit_fill": float(vit_sums[held].mean() / grouping.vit_cap) if len(held) else 0.0,
            "token_fill": float(tok_sums[held].mean() / grouping.token_cap) if len(held) else 0.0,
        }
    return out
