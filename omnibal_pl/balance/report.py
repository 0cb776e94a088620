"""One balance run end to end: caps, grouping, steps, metrics, timings; as JSON, a table and a plot."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from omnibal_pl.balance.config import BalanceConfig
from omnibal_pl.balance.cost import TimeModel, load_time_model, steps_weight
from omnibal_pl.balance.grouping import Grouping, group_samples
from omnibal_pl.balance.metrics import balance_metrics, per_source
from omnibal_pl.balance.search import resolve_shape
from omnibal_pl.balance.steps import Steps, arrange
from omnibal_pl.lengths import LengthTable

# Rows of the printed table: (report key, label, format).
TABLE_ROWS = (
    ("algorithm", "algorithm", "{}"),
    ("samples", "samples", "{:,}"),
    ("samples_lost", "samples lost", "{:,}"),
    ("samples_oversize", "samples oversize (solo)", "{:,}"),
    ("groups", "groups", "{:,}"),
    ("avg_group_size", "samples per group", "{:.2f}"),
    ("vit_cap", "vit cap (tiles)", "{}"),
    ("token_cap", "token cap", "{}"),
    ("steps", "steps", "{:,}"),
    ("vit_dist_ratio", "vit dist ratio", "{:.4f}"),
    ("llm_dist_ratio", "llm dist ratio", "{:.4f}"),
    ("pad_ratio", "pad ratio", "{:.4f}"),
    ("vit_fill", "vit fill", "{:.4f}"),
    ("token_fill", "token fill", "{:.4f}"),
    ("max_mean_vit", "max/mean tiles per step", "{:.4f}"),
    ("max_mean_tokens", "max/mean tokens per step", "{:.4f}"),
    ("time_dist_ratio", "time dist ratio (model)", "{:.4f}"),
    ("max_mean_time", "max/mean time per step", "{:.4f}"),
    ("groups_vs_lower_bound", "groups / lower bound", "{:.4f}"),
    ("seconds_search", "search (s)", "{:.3f}"),
    ("seconds_grouping", "grouping (s)", "{:.3f}"),
)


def run_balance(table: LengthTable, cfg: BalanceConfig,
                time_model: TimeModel | None = None) -> tuple[dict[str, Any], Grouping, Steps]:
    """Resolves the caps (searching if unset), groups, forms steps and measures; returns the report.

    ``time_model`` (default: the one stored at ``cfg.time_model``, if any) reports the modelled rank times
    (``time_dist_ratio``, ``max_mean_time``) of every algorithm; steps are formed on it under ``cost=fitted``.
    """
    cfg, caps = resolve_shape(table, cfg)
    model = load_time_model(cfg) if time_model is None else time_model
    start = time.perf_counter()
    grouping = group_samples(table, cfg)
    seconds_grouping = time.perf_counter() - start
    grouping, steps = arrange(table, grouping, cfg, time_model=steps_weight(cfg, model))
    report = balance_metrics(table, grouping, steps, model)
    report.update(
        seconds_grouping=seconds_grouping,
        seconds_search=caps.seconds,
        search_candidates=caps.candidates,
        step_order=cfg.resolved_step_order,
        config=asdict(cfg),
        per_source=per_source(table, grouping),
    )
    return report, grouping, steps


def format_table(reports: list[dict[str, Any]]) -> str:
    """A fixed-width table, one column per report."""
    width = max(12, *(len(str(r["algorithm"])) + 2 for r in reports))
    lines = []
    for key, label, fmt in TABLE_ROWS:
        cells = [fmt.format(r[key]) if key in r else "-" for r in reports]
        lines.append(f"{label:<26}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def plot_balance(table: LengthTable, grouping: Grouping, steps: Steps, path: str | Path, max_steps: int = 200) -> Path:
    """PNG: per-step rank loads (tiles, tokens) for the first ``max_steps`` steps and group-size histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vit_sums, tok_sums = grouping.sums(table)
    shown = steps.groups[:max_steps]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    for ax, sums, cap, name in ((axes[0, 0], vit_sums, grouping.vit_cap, "tiles"),
                                (axes[0, 1], tok_sums, grouping.token_cap, "tokens")):
        loads = sums[shown].sum(axis=2)  # [steps, dp]
        x = np.arange(len(loads))
        ax.fill_between(x, loads.min(axis=1), loads.max(axis=1), alpha=0.3, label="min..max over ranks")
        ax.plot(x, loads.mean(axis=1), lw=1, label="mean over ranks")
        ax.axhline(cap * shown.shape[2], color="k", ls="--", lw=0.8, label="cap")
        ax.set(title=f"{name} per DP rank per step", xlabel="step", ylabel=name)
        ax.legend(fontsize=8)
    axes[1, 0].hist(grouping.sizes(), bins=np.arange(grouping.sizes().max() + 2) - 0.5)
    axes[1, 0].set(title="samples per group", xlabel="samples", ylabel="groups")
    axes[1, 1].hist([vit_sums / max(grouping.vit_cap, 1), tok_sums / max(grouping.token_cap, 1)], bins=40,
                    label=["tile fill", "token fill"])
    axes[1, 1].set(title="group fill (sum / cap)", xlabel="fill", ylabel="groups")
    axes[1, 1].legend(fontsize=8)
    fig.suptitle(f"{grouping.algorithm}: caps {grouping.vit_cap} tiles / {grouping.token_cap} tokens, "
                 f"dp={steps.groups.shape[1]}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
