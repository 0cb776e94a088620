"""Trial steps of pipeline plans on the local ranks: what each rank holds and how long its steps take.

:func:`run_trials` starts ``pp x dp`` processes on this machine (gloo on CPU, NCCL on CUDA, one GPU per
rank), and on them runs every given plan in turn: build the plan's stages (:func:`build_pipeline`, the
plan's ZeRO level included), then ``warmup + steps`` AdamW steps on the same micro-batches for every
plan. Per rank and plan it reports (:class:`RankTrial`):

- ``static_bytes``: parameters + gradients + optimizer state this rank holds after the last step
  (local shards; :func:`~omnibal_pl.train.memory_report.held_bytes`);
- ``activation_bytes``: the peak of the activation bytes autograd held during the measured steps
  (:class:`~omnibal_pl.plan.saved_bytes.PeakSavedBytes`, the profiler's instrument applied to the whole
  step, so the memory model's in-flight counting and recompute are checked against the runtime);
- ``device_peak_bytes``: on CUDA, the allocator's peak over the measured steps (everything included);
- ``step_s``: the measured steps' seconds (wall clock after a barrier; CUDA synchronised).

Used by adaptive recompute and measured refinement (``plan.adapt``, ``plan.refine``:
:mod:`omnibal_pl.train.plan_search`) and by ``scripts/bench_memory.py``.
"""
from __future__ import annotations

import datetime
import gc
import json
import socket
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.optim import ZeroRedundancyOptimizer

from omnibal_pl.batch import PackedBatch
from omnibal_pl.errors import ConfigError
from omnibal_pl.model import VLMConfig
from omnibal_pl.parallel import build_mesh, build_pipeline, initial_state_dict
from omnibal_pl.plan.plan import Plan
from omnibal_pl.plan.profiler import Precision, precision_of
from omnibal_pl.plan.saved_bytes import ParameterFilter, PeakSavedBytes
from omnibal_pl.train.memory_report import held_bytes
from omnibal_pl.train.objective import packed_loss_sum


@dataclass
class RankTrial:
    """One rank's measurements of one plan (see the module docstring); bytes and seconds."""

    rank: int
    pp_rank: int
    dp_rank: int
    stages: list[int]
    static_bytes: dict[str, int]
    activation_bytes: int
    device_peak_bytes: int | None
    step_s: list[float]
    loss: float

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def peak_bytes(self) -> int:
        """Static bytes + the activation peak (the CPU-measurable part of the rank's peak)."""
        return sum(self.static_bytes.values()) + self.activation_bytes


@dataclass
class PlanTrial:
    """Every rank's :class:`RankTrial` of one plan."""

    plan: Plan
    ranks: list[RankTrial]

    @property
    def step_s(self) -> float:
        """The step's seconds: the slowest rank's median."""
        return max(r.median_step_s for r in self.ranks)

    def pp_rank_peak(self, pp_rank: int) -> int:
        """The largest :attr:`RankTrial.peak_bytes` over the DP replicas of pipeline rank ``pp_rank``."""
        return max(r.peak_bytes for r in self.ranks if r.pp_rank == pp_rank)

    def pp_rank_activations(self, pp_rank: int) -> int:
        return max(r.activation_bytes for r in self.ranks if r.pp_rank == pp_rank)

    def pp_rank_static(self, pp_rank: int) -> int:
        return max(sum(r.static_bytes.values()) for r in self.ranks if r.pp_rank == pp_rank)


def _loss(logits: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    loss_sum, weight = packed_loss_sum(logits, batch)
    return loss_sum / weight.clamp(min=1)


def _trial(cfg: VLMConfig, plan: Plan, mesh, dims, batches: Sequence[PackedBatch], warmup: int, steps: int,
           device: torch.device, seed: int, precision: Precision) -> RankTrial:
    state = {k: v.to(precision.params) if v.is_floating_point() else v for k, v in initial_state_dict(cfg, seed).items()}
    runner = build_pipeline(cfg, plan, mesh, state, _loss, device)
    params = list(runner.parameters())
    opt = (ZeroRedundancyOptimizer(params, torch.optim.AdamW, process_group=runner.dp_group, lr=1e-4)
           if plan.zero == 1 else torch.optim.AdamW(params, lr=1e-4))
    probe = PeakSavedBytes(ParameterFilter([*params, *(t for mb in batches for t in mb.tensors())]))
    times, loss = [], 0.0
    for step in range(warmup + steps):
        if step == warmup:
            probe.reset()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        dist.barrier()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with probe, precision.context(device):
            loss = float(runner.train_step(batches))
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    trial = RankTrial(rank=dist.get_rank(), pp_rank=dims.pp_rank, dp_rank=dims.dp_rank,
                      stages=plan.stages_of_rank(dims.pp_rank), static_bytes=held_bytes(params, opt),
                      activation_bytes=probe.peak,
                      device_peak_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                      step_s=times, loss=loss)
    del runner, opt, params, probe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return trial


def _worker(rank: int, world: int, port: int, out: str, cfg: VLMConfig, plans: list[dict], pp: int,
            batches: list[list[PackedBatch]], warmup: int, steps: int, device_type: str, seed: int,
            threads: int, precision: str) -> None:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        mesh, dims = build_mesh(pp, device_type=device_type)
        rows = [asdict(_trial(cfg, Plan.from_dict(p), mesh, dims, batches[dims.dp_rank], warmup, steps, device, seed,
                              precision_of(precision))) for p in plans]
        Path(out, f"rank{rank}.json").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_trials(cfg: VLMConfig, plans: Sequence[Plan], batches: Sequence[Sequence[PackedBatch]], *, steps: int = 2,
               warmup: int = 1, device_type: str = "cpu", seed: int = 0, threads: int = 1,
               precision: str = "32-true") -> list[PlanTrial]:
    """Runs ``plans`` (same pp, dp and shape) one after the other on ``pp x dp`` local processes and returns
    their measurements (module docstring). ``batches[d]``: the ``micro_batches`` micro-batches DP replica
    ``d`` runs every step, of the plans' shape. ``threads``: torch threads per process on CPU;
    ``precision``: the run's Lightning precision (parameters stored and steps autocast as it says)."""
    if not plans:
        raise ConfigError("run_trials: no plan to run")
    first = plans[0]
    for p in plans[1:]:
        p.check_run("a trial plan", pp=first.pp, dp=first.dp, micro_batches=first.micro_batches,
                    vit_cap=first.vit_cap, token_cap=first.token_cap)
    if len(batches) != first.dp or any(len(b) != first.micro_batches for b in batches):
        raise ConfigError(f"run_trials: need {first.micro_batches} micro-batches for each of dp={first.dp} replicas, "
                          f"got {[len(b) for b in batches]}")
    world = first.pp * first.dp
    if device_type == "cuda" and torch.cuda.device_count() < world:
        raise ConfigError(f"trial runs need {world} GPUs on this machine (pp x dp), {torch.cuda.device_count()} "
                          "are visible; turn plan.adapt / plan.refine off for multi-node runs")
    with tempfile.TemporaryDirectory() as tmp:
        args = (world, _free_port(), tmp, cfg, [p.to_dict() for p in plans], first.pp, [list(b) for b in batches],
                warmup, steps, device_type, seed, threads, precision)
        mp.start_processes(_worker, args=args, nprocs=world, start_method="spawn", join=True)
        per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    return [PlanTrial(plan, [RankTrial(**per_rank[r][i]) for r in range(world)]) for i, plan in enumerate(plans)]

