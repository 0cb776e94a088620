"""One run, assembled before any Trainer exists: resolve, then build.

:func:`resolve_run` turns a typed :class:`~omnibal_pl.train.schemas.RunConfig` into a
:class:`ResolvedRun`, in this order:

1. the DP size, from the cluster (processes / pipeline stages);
2. the training data: dataset, per-sample statistics, and the micro-batch shape (caps given, or searched
   once for that real DP size: :func:`~omnibal_pl.data.training_data.prepare_training_data`); under
   ``balance.cost=fitted`` the time model is checked against the run's setting first
   (:func:`~omnibal_pl.train.time_calibration.time_model_setting`): one measured elsewhere is refused;
3. the pipeline :class:`~omnibal_pl.plan.Plan` (pipeline runs only): searched (``plan.use=auto``), a
   uniform split, or a plan file, checked against the model and the run's settings.

:func:`build_run` then makes the DataModule, the LightningModule, the strategy and the Trainer from it.
Every process runs both (Lightning re-runs the script for each rank it launches): everything is
deterministic except a profiled plan, so global rank 0 writes the plan it resolved to ``plan.yaml`` and
hands its path to the processes Lightning launches (``OMNIBAL_PLAN``); under external launchers
(torchrun, srun) the strategy adopts rank 0's plan at start-up (:meth:`OmniBalStrategy._check_plan`).
The Lightning hook order the run relies on is in ``docs/architecture.md``.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import lightning as L
from lightning.pytorch.strategies import StrategyRegistry
import torch

from omnibal_pl.balance.cost import TimeModel, load_time_model
from omnibal_pl.balance.search import micro_batch_shape
from omnibal_pl.data.datamodule import OmniBalDataModule
from omnibal_pl.data.training_data import ModelSpec, TrainingData, prepare_training_data
from omnibal_pl.errors import ConfigError
from omnibal_pl.launch_env import launch_rank
from omnibal_pl.parallel import OmniBalStrategy
from omnibal_pl.plan.make import PlanInputs, plan_from_partition, planning_inputs, resolve_source
from omnibal_pl.plan.partition import search_partition
from omnibal_pl.plan.plan import Plan, check_pipeline_sizes, uniform_plan
from omnibal_pl.plan.profiler import precision_of
from omnibal_pl.train.callbacks import GumbelTemperature
from omnibal_pl.train.checkpoints import AtomicCheckpointIO
from omnibal_pl.train.config_groups import build_callbacks
from omnibal_pl.train.time_calibration import TimeModelCalibration, time_model_setting
from omnibal_pl.train.faults import FaultWatch, collective_timeout, strategy_with_timeout
from omnibal_pl.train.loggers import build_loggers
from omnibal_pl.train.memory_report import MemoryReport
from omnibal_pl.train.module import OmniBalModule, VLMTrainingModule
from omnibal_pl.train.objective import head_loss_sum
from omnibal_pl.train.plan_search import adapt_plan, first_step_batches, refine_plan
from omnibal_pl.train.pipeline_module import OmniBalPipelineModule
from omnibal_pl.train.progress import StepProgressBar
from omnibal_pl.train.skip_budget import SkipBudget
from omnibal_pl.train.schemas import RunConfig
from omnibal_pl.train.validation import ValidateAfterLastStep

PLAN_ENV = "OMNIBAL_PLAN"  # the plan file rank 0 resolved, for the processes Lightning launches


@dataclass
class ResolvedRun:
    """A run's settings with everything derived from them: the DP size, the data (with its resolved
    micro-batch shape in ``data.balance``) and the pipeline plan (None without pipeline parallelism)."""

    cfg: RunConfig
    run_dir: Path
    dp: int
    data: TrainingData
    plan: Plan | None

    @property
    def pipelined(self) -> bool:
        return self.plan is not None


def resolve_run(cfg: RunConfig, run_dir: Path) -> ResolvedRun:
    """The DP size, the training data and the plan of ``cfg`` (see the module docstring)."""
    c = cfg.cluster
    dp = c.data_parallel_size()
    pipelined = c.strategy == "omnibal"
    if pipelined and cfg.packing.pad_to != "cap":
        raise ConfigError(f"packing.pad_to={cfg.packing.pad_to!r}: pipeline stages need static micro-batch shapes; "
                          "use packing.pad_to=cap (every micro-batch padded to the token and tile caps)")
    m = cfg.model
    spec = ModelSpec(m.llm.vocab_size, m.vision.image_size, m.tokens_per_tile, m.image_context_id, m.vision.family,
                     m.vision.spatial_merge)
    if cfg.balance.cost == "fitted" and cfg.balance.time_model:
        TimeModel.load(cfg.balance.time_model).check_setting(run_setting(cfg), f"time model {cfg.balance.time_model}")
    data = prepare_training_data(cfg.dataset, replace(cfg.balance, dp=dp), spec)
    plan = resolve_plan(cfg, run_dir, data) if pipelined else None
    return ResolvedRun(cfg, run_dir, dp, data, plan)


def run_device(accelerator: str) -> torch.device:
    """The device type a run on Lightning's ``accelerator`` trains on (``gpu``/``cuda``: CUDA; ``auto``: CUDA
    where available; else CPU)."""
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if cuda else "cpu")


def forks_processes(strategy: str) -> bool:
    """Whether Lightning's registered strategy ``strategy`` starts its processes by forking this one
    (``ddp_fork``, ``ddp_notebook`` and their variants)."""
    return strategy in StrategyRegistry and StrategyRegistry[strategy]["init_params"].get("start_method") == "fork"


def run_setting(cfg: RunConfig) -> dict[str, str]:
    """The setting a time model for this run must have been measured in (:func:`time_model_setting`).

    On CUDA this reads the GPU's name and capability, which initialises CUDA in this process, before Lightning
    starts the run's processes; a strategy that forks them cannot run after that, so it is refused here."""
    device, strategy = run_device(cfg.cluster.accelerator), cfg.cluster.strategy
    if device.type == "cuda" and forks_processes(strategy):
        raise ConfigError(f"cluster.strategy={strategy} forks its processes after the time model's setting (the GPU's "
                          "name and attention kernel) is read here, which initialises CUDA; Lightning cannot fork "
                          "after that. Use cluster.strategy=ddp (or ddp_spawn) with balance.cost=fitted or "
                          "trainer.time_model_steps")
    return time_model_setting(cfg.model, device, cfg.cluster.precision, cfg.packing.pad_to)


def resolve_plan(cfg: RunConfig, run_dir: Path, data: TrainingData) -> Plan:
    """The pipeline plan of the run, checked against the model and the run's settings; global rank 0
    writes it to ``run_dir/plan.yaml``."""
    c, balance, settings = cfg.cluster, data.balance, cfg.plan
    shape = micro_batch_shape(balance)
    expected = dict(model=cfg.model.name, pp=c.pp, dp=balance.dp, zero=c.zero, schedule=c.schedule,
                    micro_batches=balance.micro_batches, vit_cap=shape.vit_cap, token_cap=shape.token_cap)
    virtual_stages = settings.virtual_stages if c.schedule == "interleaved" else 1
    check_pipeline_sizes(c.pp, balance.micro_batches, c.schedule, virtual_stages, balance.dp,
                         num_blocks=len(cfg.model.block_names()))
    rank = launch_rank(c.devices)
    use = settings.use
    if rank != 0 and os.environ.get(PLAN_ENV):
        use = os.environ[PLAN_ENV]
    if use == "uniform":
        plan = uniform_plan(cfg.model, c.pp, balance.micro_batches, shape.vit_cap, shape.token_cap, dp=balance.dp,
                            zero=c.zero, schedule=c.schedule, virtual_stages=settings.virtual_stages)
    elif use != "auto":
        plan = Plan.load(use)
    else:
        source = resolve_source(cfg.model, settings.source)
        if source == "cost_model" and not c.device:
            raise ConfigError("plan.source=cost_model needs cluster.device (a preset: h100_80gb, h200, a100_80gb)")
        if settings.threads or c.threads:
            torch.set_num_threads(settings.threads or c.threads)
        inputs = planning_inputs(cfg.model, c.pp, balance.micro_batches, shape.vit_cap, shape.token_cap, dp=balance.dp,
                                 schedule=c.schedule, device=c.device or "local", source=source,
                                 profile_cache=settings.profile_cache or str(run_dir / "plan_profile"),
                                 samples=shape.samples, virtual_stages=settings.virtual_stages,
                                 memory_fraction=settings.memory_fraction, zero=c.zero, precision=c.precision,
                                 memory_gb=settings.memory_gb, head_loss=head_loss_sum)
        plan = measured_plan(cfg, inputs, data, trials=rank == 0)
    plan.check_model(cfg.model)
    where = f"plan {use}" if use not in ("auto", "uniform") else "plan"
    plan.check_run(where, **expected)
    if plan.precision:  # a plan that models memory was made for one precision
        plan.check_run(where, precision=precision_of(c.precision).name)
    if rank == 0:
        plan.save(run_dir / "plan.yaml")
    return plan


def measured_plan(cfg: RunConfig, inputs: PlanInputs, data: TrainingData, trials: bool) -> Plan:
    """The searched plan, refined and adapted on this machine's devices as ``plan.refine`` and
    ``plan.adapt`` ask (:mod:`omnibal_pl.train.plan_search`) when ``trials`` (global rank 0: the other
    ranks take rank 0's plan); the search's best as it is otherwise."""
    settings, c = cfg.plan, cfg.cluster
    if settings.refine < 0 or settings.trial_steps < 1:
        raise ConfigError(f"plan.refine={settings.refine} must be >= 0 and plan.trial_steps={settings.trial_steps} >= 1")
    searched = plan_from_partition(cfg.model, inputs, search_partition(inputs.profile, inputs.config), c.zero)
    if not trials or not (settings.refine > 1 or settings.adapt):
        return searched
    if c.num_nodes > 1:
        raise ConfigError("plan.refine / plan.adapt run trial steps on this node's devices only; with "
                          "cluster.num_nodes > 1 make the plan on one node (omnibal-train ... plan.adapt=true "
                          "trainer.max_steps=0) and pass it as plan.use=<plan.yaml>")
    batches = first_step_batches(data, cfg.packing)
    trial_args = dict(steps=settings.trial_steps, device_type=run_device(c.accelerator).type,
                      seed=cfg.seed, threads=c.threads or 1, precision=str(c.precision))
    plan = refine_plan(cfg.model, inputs, settings.refine, batches, c.zero, **trial_args) if settings.refine > 1 else searched
    return adapt_plan(cfg.model, plan, inputs, batches, **trial_args) if settings.adapt else plan


def build_run(run: ResolvedRun) -> tuple[L.Trainer, VLMTrainingModule, OmniBalDataModule]:
    """Trainer, module and DataModule of a resolved run; everything the run writes goes under ``run.run_dir``."""
    cfg, c = run.cfg, run.cfg.cluster
    L.seed_everything(cfg.seed, workers=True)
    if c.threads:
        torch.set_num_threads(c.threads)
    m = run.data.balance.micro_batches
    datamodule = OmniBalDataModule(run.data, cfg.packing, cfg.loader, whole_steps=run.pipelined)
    module_args = dict(model=cfg.model, optim=cfg.optim, peak_tflops=c.peak_tflops, seed=cfg.seed,
                       init_from=cfg.init_from, max_nonfinite_steps=cfg.faults.max_nonfinite_steps)
    if run.pipelined:
        module: VLMTrainingModule = OmniBalPipelineModule(**module_args, gradient_clip_val=cfg.trainer.gradient_clip_val)
        strategy: Any = OmniBalStrategy(run.plan, dp=run.dp, timeout=collective_timeout(cfg.faults))
    else:
        module, strategy = OmniBalModule(**module_args), strategy_with_timeout(c.strategy, collective_timeout(cfg.faults))
    loggers = build_loggers(cfg.logger, run.run_dir)
    # the run's own mechanism, always on; then the callbacks group (conf/callbacks/) and trainer.callbacks
    callbacks = [MemoryReport(run.run_dir / "memory_report.json", run.plan),
                 FaultWatch(cfg.faults.step_timeout_s, cfg.faults.sigterm_grace_s),
                 SkipBudget(run.data.skipped, run.data.skip_policy.max_skip_fraction)]
    if cfg.model.sparsify.enabled:
        callbacks.append(GumbelTemperature())
    if run.data.val is not None:
        callbacks.append(ValidateAfterLastStep())
    if cfg.trainer.enable_progress_bar:
        callbacks.append(StepProgressBar())
    if cfg.trainer.time_model_steps > 0:
        if run.pipelined:
            raise ConfigError("trainer.time_model_steps times micro-batches one by one, which the pipeline strategy "
                              "runs inside a step: fit the time model in a run without it (cluster.strategy=auto or "
                              "ddp); the model holds for the same data and model under any strategy")
        callbacks.append(TimeModelCalibration(run.run_dir / "time_model.json", run.data.lengths,
                                              cfg.trainer.time_model_steps, run_setting(cfg),
                                              balance_model=load_time_model(cfg.balance)))
    chosen = {"callbacks": cfg.callbacks, "trainer.callbacks": dict(enumerate(cfg.trainer.callbacks))}
    for group, specs in chosen.items():
        callbacks += build_callbacks(group, specs, run.run_dir, bool(loggers), run.data.val is not None)
    trainer = L.Trainer(
        accelerator=c.accelerator,
        devices=c.devices,
        num_nodes=c.num_nodes,
        strategy=strategy,
        precision=c.precision,
        max_steps=cfg.trainer.max_steps,
        max_epochs=cfg.trainer.max_epochs,
        accumulate_grad_batches=1 if run.pipelined else m,
        gradient_clip_val=None if run.pipelined else cfg.trainer.gradient_clip_val,  # the pipeline module clips
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        enable_progress_bar=cfg.trainer.enable_progress_bar,
        deterministic=cfg.trainer.deterministic,
        logger=loggers or False,
        callbacks=callbacks,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        # validation every val_check_interval optimizer steps (Lightning counts loader items), across epochs
        val_check_interval=cfg.trainer.val_check_interval * (1 if run.pipelined else m),
        check_val_every_n_epoch=None,
        limit_val_batches=None if run.data.val is not None else 0,
        plugins=None if run.pipelined else [AtomicCheckpointIO()],  # the pipeline's checkpoints: parallel/dcp.py
        default_root_dir=run.run_dir,
    )
    return trainer, module, datamodule


@contextlib.contextmanager
def plan_for_launched_processes(run: ResolvedRun) -> Iterator[None]:
    """While Lightning launches the other ranks (inside ``trainer.fit``), point them at rank 0's plan file."""
    if run.plan is None or launch_rank(run.cfg.cluster.devices) != 0:
        yield
        return
    os.environ[PLAN_ENV] = str(run.run_dir / "plan.yaml")
    try:
        yield
    finally:
        os.environ.pop(PLAN_ENV, None)
