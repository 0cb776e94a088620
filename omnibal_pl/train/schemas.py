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
from omnibal_pl.model.hf_loading import RUN_SIDE_FIELDS, folder_differences, vlm_config_from_hf
from omnibal_pl.train.faults import FaultConfig
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
    val_check_interval: int = 100  # optimizer steps between validations (with dataset.val_fraction > 0)
    time_model_steps: int = 0  # > 0: fit the balance time model on these steps (omnibal_pl/train/time_calibration.py)


@dataclass
class TrainPlanSettings(PlanSettings):
    """:class:`PlanSettings` plus ``use``: the plan a pipeline run (``cluster.strategy=omnibal``) executes:
    ``auto`` (searched for this model, cluster and the data's caps), ``uniform`` (equal block counts, no
    recompute) or the path of a plan file (checked against the run's settings). With ``use=auto``, before
    training (:mod:`omnibal_pl.train.plan_search`): ``refine`` > 1 runs the search's ``refine`` best
    partitions for ``trial_steps`` steps each and keeps the fastest; ``adapt`` chooses recompute again from
    each rank's measured memory."""

    use: str = "auto"
    refine: int = 0
    adapt: bool = False
    trial_steps: int = 2


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
    logger: dict[str, Any] = field(default_factory=dict)  # name -> _target_ spec (conf/logger/)
    callbacks: dict[str, Any] = field(default_factory=dict)  # name -> _target_ spec (conf/callbacks/)
    faults: FaultConfig = field(default_factory=FaultConfig)


AUTO_MODEL = "auto"  # model=auto: the architecture of init_from's folder


def model_config(node: dict[str, Any], init_from: str | None) -> VLMConfig:
    """The run's model: ``model=auto`` reads the architecture from ``init_from``'s ``config.json`` and takes only
    the run-side fields (attention backend, sparsify, adapter) from ``node``; any other ``model=`` must agree
    with ``init_from``'s folder when both are given (the error names the fields that differ)."""
    if node.get("name") == AUTO_MODEL:
        if init_from is None:
            raise ConfigError("model=auto reads the architecture from init_from's config.json: set init_from=<folder>")
        extra = sorted(set(node) - {"name", *RUN_SIDE_FIELDS})
        if extra:
            raise ConfigError(f"model=auto takes the architecture from {init_from}/config.json, so model.{extra[0]} "
                              f"cannot be set; only {list(RUN_SIDE_FIELDS)} can")
        folder = vlm_config_from_hf(init_from).to_dict()
        return VLMConfig.from_dict({**folder, **{k: node[k] for k in RUN_SIDE_FIELDS if k in node}})
    model = VLMConfig.from_dict(node)
    if init_from is not None:
        differences = folder_differences(model, init_from)
        if differences:
            raise ConfigError(f"model={model.name} disagrees with init_from={init_from}/config.json in "
                              f"{'; '.join(differences)}; use model=auto to take the folder's architecture")
    return model


def parse_run_config(cfg: DictConfig) -> RunConfig:
    """Checks every group against its schema: an unknown key (top-level too), a mistyped key or a wrong type
    fails here, at start, naming the key."""
    check_keys(cfg, [f.name for f in fields(RunConfig)], "omnibal-train")
    try:
        model = model_config(OmegaConf.to_container(cfg.model, resolve=True), cfg.get("init_from"))
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
        logger=OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else {},
        callbacks=OmegaConf.to_container(cfg.callbacks, resolve=True) if cfg.get("callbacks") else {},
        faults=to_dataclass(cfg.faults, FaultConfig, "faults"),
    )
