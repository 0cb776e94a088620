"""``OmniBalStrategy``: a Lightning strategy that runs pipeline stages x data parallelism from a plan.

What the strategy owns (Lightning's split, as in ``ModelParallelStrategy``):

- processes and the ("pp", "dp") mesh: ``pp x dp`` processes (``pp`` is the plan's, ``dp`` defaults to
  world / pp), one process group over the world, the mesh of :mod:`omnibal_pl.parallel.mesh`; a world
  that does not fit the plan (its ``pp`` and ``dp``), or ranks holding different plans, is a
  :class:`ConfigError` at setup;
- the data split: ``distributed_sampler_kwargs`` report the *DP* rank and size, so every rank of one
  pipeline loads the same micro-batches (``OmniBalDataModule`` shards by them);
- the pipeline: :meth:`build_runner` materialises only this rank's stages of the :class:`Plan` (from a
  full state dict) with the plan's per-block recompute and schedule;
- checkpoints: distributed checkpoints keyed by model names (:mod:`omnibal_pl.parallel.dcp`),
  so a run resumes into any plan or PP size;
- evaluation: ``validation_step`` runs the schedule forward only (:meth:`PipelineRunner.eval_step`), the
  last stage measuring each micro-batch; sanity validation is switched off, ``test_step`` refused.

What the module owns (:class:`omnibal_pl.train.pipeline_module.OmniBalPipelineModule`): manual
optimisation, one ``training_step`` per optimizer step over the step's micro-batches (one loader item
holds them all), the loss, clipping through the runner, logging.
"""
from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from omnibal_pl.errors import ConfigError
from omnibal_pl.model import VLMConfig
from omnibal_pl.parallel import dcp
from omnibal_pl.parallel.mesh import ParallelDims, build_mesh
from omnibal_pl.parallel.pipeline import LossFn, PipelineRunner, build_pipeline
from omnibal_pl.plan.plan import PLAN_SETTINGS, Plan


class OmniBalStrategy(ParallelStrategy):
    """Pipeline x data parallel training of an :class:`~omnibal_pl.train.pipeline_module.OmniBalPipelineModule`.

    ``plan``: the stages, recompute, schedule, ``pp`` and micro-batches per step the run executes;
    ``dp``: data-parallel replicas (None: world size / ``plan.pp``; either way it must be the plan's).
    """

    strategy_name = "omnibal"

    def __init__(self, plan: Plan, dp: int | None = None, process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plan = plan
        self.pp, self.dp = plan.pp, dp
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._mesh: DeviceMesh | None = None
        self._dims: ParallelDims | None = None
        self.runner: PipelineRunner | None = None
        self.num_nodes = 1

    # ------------------------------------------------------------------ processes and mesh
    @property
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def mesh(self) -> DeviceMesh:
        if self._mesh is None:
            raise RuntimeError("the ('pp', 'dp') mesh exists once the Trainer has set up the processes")
        return self._mesh

    @property
    def dims(self) -> ParallelDims:
        if self._dims is None:
            raise RuntimeError("the parallel dims exist once the Trainer has set up the processes")
        return self._dims

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """The DP replica's rank and count: all ranks of one pipeline read the same data."""
        return {"num_replicas": self.dims.dp, "rank": self.dims.dp_rank}

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the stages and the optimizer must exist before a checkpoint fills them

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # load_checkpoint restores the optimizer

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    def setup_environment(self) -> None:
        super().setup_environment()
        reset_seed()
        assert self.cluster_environment is not None
        self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
        self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank
        backend = self._process_group_backend or _get_default_process_group_backend_for_device(self.root_device)
        _init_dist_connection(self.cluster_environment, backend, timeout=self._timeout)
        self._mesh, self._dims = build_mesh(self.pp, self.dp, self.root_device.type)
        self._check_plan()

    def _check_plan(self) -> None:
        """Every rank runs rank 0's plan. A rank whose own plan was made for the same settings but has other
        stages (a profiled plan measures this rank's timings) adopts it; a plan made for other settings on
        any rank is an error on every rank (so no rank is left waiting at a collective)."""
        plans: list[dict | None] = [None] * dist.get_world_size()
        dist.all_gather_object(plans, self.plan.to_dict())
        first = Plan.from_dict(plans[0], where="the plan of global rank 0")
        for rank, data in enumerate(plans):
            other = Plan.from_dict(data, where=f"the plan of global rank {rank}")
            first.check_run(f"the plan of global rank 0 (global rank {rank} holds another)",
                            **{k: getattr(other, k) for k in PLAN_SETTINGS})
        self.plan = first

    # ------------------------------------------------------------------ the pipeline
    def build_runner(self, cfg: VLMConfig, full_state: Mapping[str, torch.Tensor], loss_fn: LossFn) -> PipelineRunner:
        """This rank's stages of the plan filled from ``full_state`` (model names, CPU is fine), ready to step."""
        self.runner = build_pipeline(cfg, self.plan, self.mesh, full_state, loss_fn, self.root_device)
        return self.runner

    def optimizer_names(self) -> dict[nn.Parameter, str]:
        """Each local parameter's single-process name (the head's copy of a tied embedding: the embedding's)."""
        runner = self._require_runner()
        names: dict[nn.Parameter, str] = {}
        for stage in runner.modules:
            for name, p in stage.model.named_parameters():
                names.setdefault(p, name)
        if runner.tied is not None and runner.tied.duplicate:
            names[runner.tied.param] = "llm.embed.tok.weight"
        return names

    def _require_runner(self) -> PipelineRunner:
        if self.runner is None:
            raise ConfigError("OmniBalStrategy trains an OmniBalPipelineModule, whose configure_model builds the "
                              "pipeline (strategy.build_runner); use that module with cluster.strategy=omnibal")
        return self.runner

    # ------------------------------------------------------------------ Lightning's setup
    def setup(self, trainer: Any) -> None:
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        self._require_runner()
        module = self.lightning_module
        if module.automatic_optimization:
            raise ConfigError("OmniBalStrategy runs one optimizer step per training_step over the step's micro-batches: "
                              "use a module with manual optimisation (OmniBalPipelineModule)")
        if is_overridden("test_step", module):
            raise ConfigError("OmniBalStrategy does not run test_step through the pipeline; validate during fit "
                              "(dataset.val_fraction) or evaluate a saved checkpoint with omnibal-eval")
        if isinstance(self.precision_plugin, MixedPrecision) and self.precision_plugin.scaler is not None:
            raise ConfigError("OmniBalStrategy: fp16 with a loss scaler is not supported (the schedule runs backward "
                              "itself); use precision bf16-mixed or 32-true")
        if trainer.num_sanity_val_steps:
            trainer.num_sanity_val_steps = 0  # nothing to sanity-check: evaluation is not pipelined
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        self.barrier()

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    # ------------------------------------------------------------------ collectives (over the world)
    def barrier(self, name: str | None = None) -> None:
        if _distributed_is_initialized():
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        if isinstance(tensor, torch.Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    # ------------------------------------------------------------------ checkpoints
    def lightning_module_state_dict(self) -> dict[str, Any]:
        return dcp.model_state(self._require_runner().modules)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return dcp.optimizer_state(optimizer, self.optimizer_names())

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # load_checkpoint filled the stages

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        pass  # load_checkpoint filled the optimizer

    def save_checkpoint(self, checkpoint_: dict[str, Any], filepath: str | Path, storage_options: Any | None = None) -> None:
        """Collective: this rank's stages and optimizer state into the folder ``filepath`` (see :mod:`.checkpoint`)."""
        if storage_options is not None:
            raise ConfigError("OmniBalStrategy.save_checkpoint: storage_options are not supported (distributed checkpoints)")
        path = Path(self.broadcast(str(filepath)))
        if path.is_file():
            path.unlink()
        model = checkpoint_.pop("state_dict")
        optimizers = checkpoint_.pop("optimizer_states", [])
        if len(optimizers) > 1:
            raise ConfigError("OmniBalStrategy checkpoints one optimizer; configure_optimizers returned several")
        dcp.save(path, model, optimizers[0] if optimizers else {}, checkpoint_, self.is_global_zero)

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """Collective: fill this rank's stages and optimizer from a checkpoint of any layout; Lightning's rest."""
        path = Path(self.broadcast(str(checkpoint_path)))
        optimizer = self.optimizers[0] if self.optimizers else None
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        model_cfg = getattr(self.lightning_module, "model_cfg", None)  # a VLMTrainingModule's
        trained_only = model_cfg is not None and model_cfg.adapter.enabled
        meta = dcp.load(path, self._require_runner().modules, optimizer, self.optimizer_names(), trained_only)
        # A scheduler's list entries (base_lrs, _last_lr, lr_lambdas) hold one value per param group: rank 0's
        # were saved, this rank has its own groups; only the step counters are shared.
        for saved, config in zip(meta.get("lr_schedulers", []), self.lr_scheduler_configs):
            saved.update({k: v for k, v in config.scheduler.state_dict().items() if isinstance(v, list)})
        return meta

    def remove_checkpoint(self, filepath: str | Path) -> None:
        if self.is_global_zero:
            path = Path(filepath)
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    def teardown(self) -> None:
        assert self.cluster_environment is not None and self.accelerator is not None
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self.lightning_module.validation_step(*args, **kwargs)  # the module runs the pipeline forward only
