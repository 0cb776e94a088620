"""``omnibal-plan``: the searched pipeline plan of a VLM for the balanced micro-batch shape, beside the baselines.

    omnibal-plan                                                  # InternVL-Chat-V1.5, 4 x H100 stages
    omnibal-plan model=internvl2_8b cluster.pp=2 cluster.device=a100_80gb
    omnibal-plan model=tiny plan.source=profile cluster.device=local balance.vit_cap=4 balance.token_cap=128
    omnibal-plan model=llava_1_5_7b model/sparsify=dynamic_llava cluster.pp=4

The micro-batch shape is ``balance.vit_cap`` tiles x ``balance.token_cap`` tokens, packed as
``balance.samples_per_group`` samples; caps left null are found by the balance core on ``dataset`` for
``cluster.dp`` ranks (the same caps path as ``omnibal-train``).
The run directory gets ``plan.yaml`` (the strategy's input), ``gantt.png`` and ``cost_profile.json``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from omnibal_pl.balance.config import BalanceConfig
from omnibal_pl.balance.search import micro_batch_shape, resolve_shape
from omnibal_pl.cli.conf import hydra_app
from omnibal_pl.config import ClusterConfig, PlanSettings, check_keys, to_dataclass
from omnibal_pl.data.length_source import dataset_lengths
from omnibal_pl.errors import ConfigError
from omnibal_pl.model import VLMConfig
from omnibal_pl.plan import Plan, exact_partition, plan_from_partition, planning_inputs, save_gantt, search_partition
from omnibal_pl.plan.make import PlanInputs, resolve_source
from omnibal_pl.plan.report import GIB, compare, format_comparison, format_stages, format_zero_fit, zero_fit


@dataclass
class PlanAppSettings(PlanSettings):
    """The ``plan`` node of ``conf/omnibal_plan.yaml``: :class:`PlanSettings` plus ``exact`` (also find the
    exact optimum by branch and bound and print it)."""

    exact: bool = False


def resolved_caps(cfg: DictConfig, balance: BalanceConfig) -> tuple[BalanceConfig, str]:
    """``balance`` with its caps resolved on the ``dataset`` statistics when not given, and where they came from."""
    if balance.vit_cap is not None and balance.token_cap is not None:
        return balance, "given"
    table = dataset_lengths(OmegaConf.to_container(cfg.dataset, resolve=True))
    resolved, _ = resolve_shape(table, balance)
    return resolved, f"{balance.algorithm} search on {cfg.dataset.name} ({len(table):,} samples)"


def run_plan(cfg: DictConfig, run_dir: Path) -> Plan:
    """Plans one model from a composed config; writes plan.yaml, gantt.png and cost_profile.json to ``run_dir``."""
    try:
        model = VLMConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None
    check_keys(cfg, ["model", "dataset", "balance", "cluster", "plan"], "omnibal-plan")
    settings = to_dataclass(cfg.plan, PlanAppSettings, "plan")
    cluster = to_dataclass(cfg.cluster, ClusterConfig, "cluster")
    balance = to_dataclass(cfg.balance, BalanceConfig, "balance")
    if cluster.dp is None:
        raise ConfigError("omnibal-plan plans for cluster.dp data-parallel ranks; set cluster.dp")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    balance, origin = resolved_caps(cfg, replace(balance, dp=cluster.dp))
    shape = micro_batch_shape(balance)
    source = resolve_source(model, settings.source)

    def level_inputs(zero: int) -> PlanInputs:
        return planning_inputs(
            model, cluster.pp, balance.micro_batches, shape.vit_cap, shape.token_cap, dp=cluster.dp,
            schedule=cluster.schedule, device=cluster.device or "local", source=source,
            profile_cache=settings.profile_cache, samples=shape.samples, virtual_stages=settings.virtual_stages,
            memory_fraction=settings.memory_fraction, zero=zero, precision=cluster.precision,
            memory_gb=settings.memory_gb)

    inputs = level_inputs(cluster.zero)
    searched = search_partition(inputs.profile, inputs.config)
    exact = exact_partition(inputs.profile, inputs.config, incumbent=searched) if settings.exact else None
    plan = plan_from_partition(model, inputs, searched, cluster.zero)

    c = inputs.config
    print(f"model {model.name} ({len(inputs.profile.blocks)} blocks), sparsify {'on' if model.sparsify.enabled else 'off'}; "
          f"micro-batch {shape.vit_cap} tiles x {shape.token_cap} tokens in {shape.samples} samples ({origin})")
    print(f"pp={c.pp} x dp={c.dp}, {c.schedule}{f' v={c.virtual_stages}' if c.virtual_stages > 1 else ''}, "
          f"{c.micro_batches} micro-batches; costs: {inputs.profile.source} on {inputs.profile.device}; "
          f"budget {c.budget(0) / GIB:.1f} GiB per rank, hop {c.hop_s * 1e3:.2f} ms")
    print(format_stages(inputs, searched))
    print()
    print(format_comparison(compare(inputs, searched, exact)))
    if source == "cost_model":
        print(f"\nZeRO levels over dp={cluster.dp} (this run: cluster.zero={cluster.zero}):")
        print(format_zero_fit(zero_fit(level_inputs), c.budget(0)))
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
