"""``omnibal-plan``: the searched pipeline plan of a VLM for the balanced micro-batch shape, beside the baselines.

    omnibal-plan                                                  # InternVL-Chat-V1.5, 4 x H100 stages
    omnibal-plan model=internvl2_8b plan.pp=2 plan.device=a100_80gb
    omnibal-plan model=tiny plan.source=profile plan.device=local balance.vit_cap=4 balance.token_cap=128
    omnibal-plan model=llava_1_5_7b model/sparsify=dynamic_llava plan.pp=4

The micro-batch shape is ``balance.vit_cap`` tiles x ``balance.token_cap`` tokens, packed as
``balance.samples_per_group`` samples; caps left null are found by the balance core on ``dataset``.
The run directory gets ``plan.yaml`` (the strategy's input), ``gantt.png`` and ``cost_profile.json``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from omnibal_pl.balance.config import BalanceConfig
from omnibal_pl.balance.search import resolve_caps
from omnibal_pl.cli.conf import hydra_app
from omnibal_pl.config import to_dataclass
from omnibal_pl.data.length_source import dataset_lengths
from omnibal_pl.errors import ConfigError
from omnibal_pl.model import VLMConfig
from omnibal_pl.plan import Plan, exact_partition, plan_from_partition, planning_inputs, save_gantt, search_partition
from omnibal_pl.plan.report import GIB, compare, format_comparison, format_stages


@dataclass
class PlanAppConfig:
    """The ``plan`` node of ``conf/omnibal_plan.yaml`` (see the comments there)."""

    pp: int = 4
    dp: int = 8
    micro_batches: int = 8
    schedule: str = "1f1b"
    virtual_stages: int = 2
    source: str = "cost_model"
    device: str = "h100_80gb"
    memory_fraction: float = 0.9
    optimizer_shards: int = 1
    profile_cache: str | None = None
    exact: bool = False
    threads: int | None = None


def caps(cfg: DictConfig, balance: BalanceConfig) -> tuple[int, int, str]:
    """``(vit_cap, token_cap, where they came from)``: the given caps, or the balance core's search."""
    if balance.vit_cap is not None and balance.token_cap is not None:
        return int(balance.vit_cap), int(balance.token_cap), "given"
    if balance.algorithm not in ("balanced", "isf"):
        raise ConfigError(f"balance.algorithm={balance.algorithm!r} has no caps; set balance.vit_cap and "
                          "balance.token_cap, or use balance=balanced")
    table = dataset_lengths(OmegaConf.to_container(cfg.dataset, resolve=True))
    found = resolve_caps(table, balance)
    return found.vit_cap, found.token_cap, f"{balance.algorithm} search on {cfg.dataset.name} ({len(table):,} samples)"


def run_plan(cfg: DictConfig, run_dir: Path) -> Plan:
    """Plans one model from a composed config; writes plan.yaml, gantt.png and cost_profile.json to ``run_dir``."""
    try:
        model = VLMConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None
    settings = to_dataclass(OmegaConf.to_container(cfg.plan, resolve=True), PlanAppConfig, "plan")
    balance = to_dataclass(OmegaConf.to_container(cfg.balance, resolve=True), BalanceConfig, "balance")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    vit_cap, token_cap, origin = caps(cfg, balance)
    inputs = planning_inputs(
        model, settings.pp, settings.micro_batches, vit_cap, token_cap, dp=settings.dp, schedule=settings.schedule,
        device=settings.device, source=settings.source, profile_cache=settings.profile_cache,
        samples=balance.samples_per_group, virtual_stages=settings.virtual_stages,
        memory_fraction=settings.memory_fraction, optimizer_shards=settings.optimizer_shards)
    searched = search_partition(inputs.profile, inputs.config)
    exact = exact_partition(inputs.profile, inputs.config, incumbent=searched) if settings.exact else None
    plan = plan_from_partition(model, inputs, searched)

    c = inputs.config
    print(f"model {model.name} ({len(inputs.profile.blocks)} blocks), sparsify {'on' if model.sparsify.enabled else 'off'}; "
          f"micro-batch {vit_cap} tiles x {token_cap} tokens in {balance.samples_per_group} samples ({origin})")
    print(f"pp={c.pp} x dp={c.dp}, {c.schedule}{f' v={c.virtual_stages}' if c.virtual_stages > 1 else ''}, "
          f"{c.micro_batches} micro-batches; costs: {inputs.profile.source} on {inputs.profile.device}; "
          f"budget {c.budget(0) / GIB:.1f} GiB per rank, hop {c.hop_s * 1e3:.2f} ms")
    print(format_stages(inputs, searched))
    print()
    print(format_comparison(compare(inputs, searched, exact)))
    run_dir.mkdir(parents=True, exist_ok=True)
    plan.save(run_dir / "plan.yaml")
    inputs.profile.save(run_dir / "cost_profile.json")
    save_gantt(searched.sim, str(run_dir / "gantt.png"), title=f"{model.name}: searched plan, "
               f"step {searched.step_s:.4g} s, bubble {searched.sim.bubble_fraction:.1%}")
    print(f"plan: {run_dir / 'plan.yaml'}\ngantt: {run_dir / 'gantt.png'}")
    return plan


def plan_app(cfg: DictConfig) -> Plan:
    """``run_plan`` writing into Hydra's run directory."""
    return run_plan(cfg, Path(HydraConfig.get().runtime.output_dir))


main = hydra_app("omnibal_plan", "omnibal-plan", plan_app)

if __name__ == "__main__":
    main()
