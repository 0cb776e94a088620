"""The typed schema of ``omnibal-train``'s composed config (``conf/train.yaml``): every group checked at start."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from omnibal_pl.balance.config import BalanceConfig
from omnibal_pl.config import ClusterConfig, PlanSettings, check_keys, to_dataclass
from omnibal_pl.data.datamodule import LoaderConfig, PackingConfig
from omnibal_pl.errors import ConfigError
from omnibal_pl.model import VLMConfig
from omnibal_pl.train.optim import OptimConfig


@dataclass
class TrainerConfig:
    """The Lightning Trainer settings the app exposes (accumulation comes from ``balance.micro_batches``)."""

    max_steps: int = 200
    max_epochs: int = -1
    log_every_n_steps: int = 10
    gradient_clip_val: Optional[float] = 1.0
    checkpoint_every_n_steps: int = 100
    enable_progress_bar: bool = True
    deterministic: bool = False
    callbacks: list[Any] = field(default_factory=list)


@dataclass
class TrainPlanSettings(PlanSettings):
    """:class:`PlanSettings` plus ``use``: the plan a pipeline run (``cluster.strategy=omnibal``) executes:
    ``auto`` (searched for this model, cluster and the data's caps), ``uniform`` (equal block counts, no
    recompute) or the path of a plan file (checked against the run's settings)."""

    use: str = "auto"


@dataclass
class RunConfig:
    """Every group of ``conf/train.yaml``, typed."""

    model: VLMConfig
    balance: BalanceConfig
    cluster: ClusterConfig
    trainer: TrainerConfig
    optim: OptimConfig
    packing: PackingConfig
    loader: LoaderConfig
    plan: TrainPlanSettings
    dataset: dict[str, Any]
    seed: int
    init_from: Optional[str] = None
    ckpt_path: Optional[str] = None
    run_dir: Optional[str] = None


def parse_run_config(cfg: DictConfig) -> RunConfig:
    """Checks every group against its schema: an unknown key (top-level too), a mistyped key or a wrong type
    fails here, at start, naming the key."""
    check_keys(cfg, [f.name for f in fields(RunConfig)], "omnibal-train")
    try:
        model = VLMConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None
    return RunConfig(
        model=model,
        balance=to_dataclass(cfg.balance, BalanceConfig, "balance"),
        cluster=to_dataclass(cfg.cluster, ClusterConfig, "cluster"),
        trainer=to_dataclass(cfg.trainer, TrainerConfig, "trainer"),
        optim=to_dataclass(cfg.optim, OptimConfig, "optim"),
        packing=to_dataclass(cfg.packing, PackingConfig, "packing"),
        loader=to_dataclass(cfg.loader, LoaderConfig, "loader"),
        plan=to_dataclass(cfg.plan, TrainPlanSettings, "plan"),
        dataset=OmegaConf.to_container(cfg.dataset, resolve=True),
        seed=int(cfg.seed),
        init_from=cfg.get("init_from"),
        ckpt_path=cfg.get("ckpt_path"),
        run_dir=cfg.get("run_dir"),
    )
