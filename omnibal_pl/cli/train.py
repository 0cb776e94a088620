"""``omnibal-train``: train a VLM on balanced micro-batches with Lightning, configured by Hydra.

    omnibal-train                                    # the main job: tiny model, synthetic data, CPU
    omnibal-train model=internvl2_2b dataset=internvl dataset.meta=meta.json dataset.tokenizer=tok cluster=gpu8
    omnibal-train model=llava_1_5_7b init_from=/ckpts/llava-v1.5-7b dataset=llava ...  # start from HF weights
    omnibal-train ckpt_path=outputs/train/<date>/<time>/checkpoints/last.ckpt
    omnibal-train -m balance.algorithm=balanced,random trainer.max_steps=50
    omnibal-train cluster=cpu_pp2                    # 2 pipeline stages on 2 CPU processes (omnibal strategy)
    omnibal-train cluster=gpu8 cluster.strategy=omnibal cluster.pp=4 plan=plans/internvl2_2b.yaml

Each run directory holds the resolved config (``config.yaml``), ``metrics.csv`` (every logged value),
``balance_report.json`` and ``balance.png`` (the first epoch's grouping), ``loss.png``,
``summary.json`` and ``checkpoints/`` (``last.ckpt`` plus every ``checkpoint_every_n_steps``).

Pipeline parallelism (``cluster.strategy=omnibal``, ``cluster.pp`` stages, DP = processes / pp): the
stages come from ``plan``: ``auto`` runs the planner for this model, cluster and the data's caps
(``plan_source``: ``profile`` measures the blocks on this machine, ``cost_model`` uses the
``cluster.device`` preset, ``auto`` profiles models under 1B parameters); ``uniform`` splits the
blocks evenly without recompute; a path loads a plan file. The plan the run uses is written to
``plan.yaml`` (a uniform split: none); checkpoints are distributed-checkpoint folders.
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from omnibal_pl.balance.config import BalanceConfig
from omnibal_pl.balance.report import plot_balance, write_json
from omnibal_pl.cli.conf import hydra_app
from omnibal_pl.config import to_dataclass
from omnibal_pl.data.datamodule import LoaderConfig, ModelSpec, OmniBalDataModule, PackingConfig
from omnibal_pl.errors import ConfigError
from omnibal_pl.model import VLMConfig
from omnibal_pl.module import OmniBalModule, OmniBalPipelineModule, OptimConfig
from omnibal_pl.plan import Plan, make_plan
from omnibal_pl.plan.cost_model import block_parameters
from omnibal_pl.strategy import SCHEDULES, OmniBalStrategy, PipelineLayout, block_names, uniform_layout


@dataclass
class ClusterConfig:
    """Where the run executes: Lightning accelerator/devices/nodes/strategy/precision, plus CPU threads,
    the device peak (TFLOP/s, for MFU) and the pipeline size."""

    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    threads: int | None = None
    peak_tflops: float | None = None
    pp: int = 1  # pipeline stages (cluster.strategy=omnibal); DP = devices x num_nodes / pp
    schedule: str = "1f1b"  # pipeline schedule: 1f1b | gpipe | interleaved
    device: str | None = None  # cost-model preset for plan_source=cost_model (h100_80gb, h200, a100_80gb)


@dataclass
class TrainerConfig:
    """The Lightning Trainer settings the app exposes (accumulation comes from ``balance.micro_batches``)."""

    max_steps: int = 200
    max_epochs: int = -1
    log_every_n_steps: int = 10
    gradient_clip_val: float | None = 1.0
    checkpoint_every_n_steps: int = 100
    enable_progress_bar: bool = True
    deterministic: bool = False
    callbacks: list[Any] = field(default_factory=list)


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
    dataset: dict[str, Any]
    seed: int
    init_from: str | None
    ckpt_path: str | None
    plan: str = "auto"
    plan_source: str = "auto"


def parse(cfg: DictConfig) -> RunConfig:
    """Checks every group against its schema: a mistyped key or a wrong type fails here, at start."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    try:
        model_cfg = VLMConfig.from_dict(model)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None
    run = RunConfig(
        model=model_cfg,
        balance=to_dataclass(cfg.balance, BalanceConfig, "balance"),
        cluster=to_dataclass(cfg.cluster, ClusterConfig, "cluster"),
        trainer=to_dataclass(cfg.trainer, TrainerConfig, "trainer"),
        optim=to_dataclass(cfg.optim, OptimConfig, "optim"),
        packing=to_dataclass(cfg.packing, PackingConfig, "packing"),
        loader=to_dataclass(cfg.loader, LoaderConfig, "loader"),
        dataset=OmegaConf.to_container(cfg.dataset, resolve=True),
        seed=int(cfg.seed),
        init_from=cfg.get("init_from"),
        ckpt_path=cfg.get("ckpt_path"),
        plan=str(cfg.get("plan") or "auto"),
        plan_source=str(cfg.get("plan_source") or "auto"),
    )
    check_pipeline(run)
    return run


def check_pipeline(run: RunConfig) -> None:
    """Pipeline settings that cannot work, caught before any process starts."""
    c = run.cluster
    if c.strategy != "omnibal":
        if c.pp != 1:
            raise ConfigError(f"cluster.pp={c.pp}: pipeline parallelism runs under cluster.strategy=omnibal")
        return
    world = int(c.devices) * int(c.num_nodes)
    blocks = len(block_names(run.model))
    if c.pp < 1 or world % c.pp:
        raise ConfigError(f"cluster.pp={c.pp} does not divide the {world} processes (cluster.devices x num_nodes): "
                          f"pp x dp must equal the world size; pick pp among the divisors of {world}")
    if c.pp > blocks:
        raise ConfigError(f"cluster.pp={c.pp} pipeline stages but model {run.model.name!r} has only {blocks} blocks; "
                          f"use cluster.pp <= {blocks}")
    if c.schedule not in SCHEDULES:
        raise ConfigError(f"cluster.schedule={c.schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if run.packing.pad_to != "cap":
        raise ConfigError(f"packing.pad_to={run.packing.pad_to!r}: pipeline stages need static micro-batch shapes; "
                          "use packing.pad_to=cap (every micro-batch padded to the token and tile caps)")
    if run.plan_source not in ("auto", "profile", "cost_model"):
        raise ConfigError(f"plan_source={run.plan_source!r}: choose auto, profile or cost_model")
    if run.plan not in ("auto", "uniform"):
        load_plan(run)  # a bad plan file fails here, before training starts


def load_plan(run: RunConfig) -> Plan:
    """The plan file ``run.plan``, checked against the model, ``cluster.pp``, schedule and micro-batches."""
    plan = Plan.load(run.plan)
    plan.check_model(block_names(run.model))
    c, m = run.cluster, run.balance.micro_batches
    if (plan.pp, plan.schedule, plan.micro_batches) != (c.pp, c.schedule, m):
        raise ConfigError(f"plan {run.plan}: made for pp={plan.pp}, schedule {plan.schedule}, {plan.micro_batches} "
                          f"micro-batches; the run has cluster.pp={c.pp}, cluster.schedule={c.schedule}, "
                          f"balance.micro_batches={m}; make a plan for this run or use plan=auto")
    return plan


def plan_layout(run: RunConfig, run_dir: Path, datamodule: OmniBalDataModule) -> Callable[[], PipelineLayout]:
    """The strategy's layout source: the plan (made, or loaded) once the data's caps are known; written to
    ``run_dir/plan.yaml``. Runs on global rank 0 only (the strategy broadcasts the layout)."""
    c = run.cluster

    def resolve() -> PipelineLayout:
        if run.plan == "uniform":
            return uniform_layout(run.model, c.pp * (2 if c.schedule == "interleaved" else 1))
        if run.plan != "auto":
            plan = load_plan(run)
        else:
            vit_cap, token_cap = datamodule.balance.vit_cap, datamodule.balance.token_cap
            if not vit_cap or not token_cap:
                raise ConfigError(f"plan=auto plans for the micro-batch caps, but balance.algorithm="
                                  f"{run.balance.algorithm} has none; set balance.vit_cap and token_cap, or give a plan")
            source = run.plan_source
            if source == "auto":
                source = "profile" if sum(n for _, n in block_parameters(run.model)) < 1e9 else "cost_model"
            if source == "cost_model" and not c.device:
                raise ConfigError("plan_source=cost_model needs cluster.device (a preset: h100_80gb, h200, a100_80gb)")
            world = int(c.devices) * int(c.num_nodes)
            plan = make_plan(run.model, c.pp, run.balance.micro_batches, int(vit_cap), int(token_cap),
                             dp=world // c.pp, schedule=c.schedule, device=c.device or "local", source=source,
                             profile_cache=str(run_dir / "plan_profile"))
        plan.save(run_dir / "plan.yaml")
        return PipelineLayout(plan.stages, plan.recompute)

    return resolve


def build(run: RunConfig, run_dir: Path) -> tuple[L.Trainer, OmniBalModule, OmniBalDataModule]:
    """Trainer, module and datamodule of a run; everything the run writes goes under ``run_dir``."""
    L.seed_everything(run.seed, workers=True)
    if run.cluster.threads:
        torch.set_num_threads(run.cluster.threads)
    m = run.model
    spec = ModelSpec(m.llm.vocab_size, m.vision.image_size, m.tokens_per_tile, m.image_context_id)
    datamodule = OmniBalDataModule(run.dataset, run.balance, spec, run.packing, run.loader)
    c = run.cluster
    strategy: str | OmniBalStrategy = c.strategy
    module_cls = OmniBalModule
    if c.strategy == "omnibal":
        strategy = OmniBalStrategy(pp=c.pp, layout=plan_layout(run, run_dir, datamodule),
                                   micro_batches=run.balance.micro_batches, schedule=c.schedule)
        module_cls = OmniBalPipelineModule
    module = module_cls(m, run.optim, c.peak_tflops, seed=run.seed, init_from=run.init_from)
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", every_n_train_steps=run.trainer.checkpoint_every_n_steps,
                                 save_last=True, save_top_k=-1, filename="step{step:06d}", auto_insert_metric_name=False)
    callbacks = [checkpoint, *(instantiate(c) for c in run.trainer.callbacks)]
    if m.sparsify.enabled:
        from omnibal_pl.model.sparsify import GumbelTemperature

        callbacks.append(GumbelTemperature())
    trainer = L.Trainer(
        accelerator=run.cluster.accelerator,
        devices=run.cluster.devices,
        num_nodes=run.cluster.num_nodes,
        strategy=strategy,
        precision=run.cluster.precision,
        max_steps=run.trainer.max_steps,
        max_epochs=run.trainer.max_epochs,
        accumulate_grad_batches=run.balance.micro_batches,
        gradient_clip_val=run.trainer.gradient_clip_val,
        log_every_n_steps=run.trainer.log_every_n_steps,
        enable_progress_bar=run.trainer.enable_progress_bar,
        deterministic=run.trainer.deterministic,
        logger=CSVLogger(run_dir, name="", version=""),
        callbacks=callbacks,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        default_root_dir=run_dir,
    )
    return trainer, module, datamodule


def summarize(module: OmniBalModule, datamodule: OmniBalDataModule, run_dir: Path, seconds: float) -> dict[str, Any]:
    """The run's summary: loss start/end, throughput (from metrics.csv) and the balance of epoch 0."""
    rows = _metrics_rows(run_dir / "metrics.csv")
    losses = module.losses
    report = datamodule.balance_report(0)

    def mean(key: str) -> float:
        vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
        return sum(vals) / len(vals) if vals else float("nan")

    head = losses[: max(1, len(losses) // 10)]
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "steps": len(losses),
        "loss_start": sum(head) / len(head) if losses else float("nan"),
        "loss_end": sum(tail) / len(tail) if losses else float("nan"),
        "tokens_per_s": mean("train/tokens_per_s"),
        "samples_per_s": mean("train/samples_per_s"),
        "tiles_per_s": mean("train/tiles_per_s"),
        "mfu": mean("train/mfu"),
        "seconds": seconds,
        "vit_cap": report["vit_cap"],
        "token_cap": report["token_cap"],
        "vit_dist_ratio": report["vit_dist_ratio"],
        "llm_dist_ratio": report["llm_dist_ratio"],
        "vit_fill": report["vit_fill"],
        "token_fill": report["token_fill"],
        "algorithm": report["algorithm"],
    }


def _metrics_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def write_artifacts(module: OmniBalModule, datamodule: OmniBalDataModule, run_dir: Path, seconds: float) -> dict:
    """Balance report and plot, loss plot, summary JSON; prints the summary table."""
    report = datamodule.balance_report(0)
    write_json(report, run_dir / "balance_report.json")
    plan = datamodule.sampler.plan(0)
    plot_balance(datamodule.lengths, plan.grouping, plan.steps, run_dir / "balance.png")
    _plot_loss(module.losses, run_dir / "loss.png")
    summary = summarize(module, datamodule, run_dir, seconds)
    write_json(summary, run_dir / "summary.json")
    rows = [("steps", f"{summary['steps']}"), ("loss start -> end", f"{summary['loss_start']:.4f} -> {summary['loss_end']:.4f}"),
            ("tokens/s", f"{summary['tokens_per_s']:,.0f}"), ("samples/s", f"{summary['samples_per_s']:,.1f}"),
            ("tiles/s", f"{summary['tiles_per_s']:,.1f}"), ("MFU", f"{summary['mfu']:.3f}" if summary["mfu"] == summary["mfu"] else "n/a (cluster.peak_tflops unset)"),
            ("balance", f"{summary['algorithm']} caps {summary['vit_cap']} tiles / {summary['token_cap']} tokens"),
            ("vit / llm dist ratio", f"{summary['vit_dist_ratio']:.4f} / {summary['llm_dist_ratio']:.4f}"),
            ("vit / token fill", f"{summary['vit_fill']:.3f} / {summary['token_fill']:.3f}"),
            ("wall time (s)", f"{seconds:.1f}"), ("run directory", str(run_dir))]
    print("\n".join(f"{k:<24}{v}" for k, v in rows))
    return summary


def _plot_loss(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set(xlabel="optimizer step", ylabel="loss", title="training loss (global, weighted)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(cfg: DictConfig) -> dict[str, Any] | None:
    """Runs one training job from a composed config; returns the summary on global rank 0."""
    run = parse(cfg)
    if cfg.get("run_dir"):
        run_dir = Path(cfg.run_dir)
    elif HydraConfig.initialized():
        run_dir = Path(HydraConfig.get().runtime.output_dir)
    else:
        raise ConfigError("run_dir is not set and Hydra is not running: pass run_dir=<folder>")
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer, module, datamodule = build(run, run_dir)
    if trainer.is_global_zero:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=run.ckpt_path)
    seconds = time.perf_counter() - start
    if not trainer.is_global_zero:
        return None
    return write_artifacts(module, datamodule, run_dir, seconds)


main = hydra_app("train", "omnibal-train", train)

if __name__ == "__main__":
    main()
