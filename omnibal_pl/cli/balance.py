"""``omnibal-balance``: group a dataset into balanced micro-batches and report how balanced they are.

    omnibal-balance                                   # embedded synthetic statistics, balanced, DP=8
    omnibal-balance dataset=omnibal_lengths balance=isf report=isf.json plot=isf.png
    omnibal-balance dataset.paths=[a.json,b.json] balance.vit_cap=18 balance.token_cap=5280
    omnibal-balance -m balance.algorithm=balanced,isf,random,length_grouped
"""
from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from omnibal_pl.balance.config import BalanceConfig
from omnibal_pl.balance.report import format_table, plot_balance, run_balance, write_json
from omnibal_pl.cli.conf import hydra_app
from omnibal_pl.config import check_keys, to_dataclass
from omnibal_pl.data.length_source import dataset_lengths


def balance(cfg: DictConfig) -> dict:
    """Runs one balance job from a composed config; returns the report."""
    check_keys(cfg, ["dataset", "balance", "report", "plot"], "omnibal-balance")
    bcfg = to_dataclass(cfg.balance, BalanceConfig, "balance")
    table = dataset_lengths(OmegaConf.to_container(cfg.dataset, resolve=True))
    report, grouping, steps = run_balance(table, bcfg)
    report["dataset"] = cfg.dataset.name
    print(f"dataset {cfg.dataset.name}: {len(table):,} samples, {table.total_vit:,} tiles, {table.total_tokens:,} tokens")
    print(format_table([report]))
    run_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
    targets = [p for p in (cfg.get("report"), run_dir / "balance_report.json" if run_dir else None) if p]
    for target in targets:
        print(f"report: {write_json(report, target)}")
    if cfg.get("plot"):
        print(f"plot: {plot_balance(table, grouping, steps, cfg.plot)}")
    return report


main = hydra_app("omnibal_balance", "omnibal-balance", balance)

if __name__ == "__main__":
    main()
