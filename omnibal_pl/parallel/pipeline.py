"""One training step of a pipeline x data parallel model with ``torch.distributed.pipelining``.

How a step runs (:meth:`PipelineRunner.train_step`), on every rank with the ``m`` micro-batches of its
pipeline (all ranks of one pipeline get the same ones; DP replicas get different ones):

- Metadata: every stage module gets the step's list of :class:`PackedBatch` es, and the schedule hands
  each stage the micro-batch index ``k`` as the keyword argument ``mb_index`` (``step`` chunks the
  tensor ``arange(m)`` along dim 0, and keyword arguments reach every stage). The one tensor crossing
  stages is the blocks' ``x``; the first stage reads its micro-batch's ``pixel_values`` (the schedule's
  input to it is a placeholder [m, 1] the schedule chunks).
- Loss: on the last stage, ``loss_fn(logits, batch) -> scalar`` per micro-batch (the schedule's
  target is the micro-batch index). The step's loss and gradient are the *mean* over the step's
  ``m x dp`` micro-batches (the schedule divides gradients by ``m``, the DP all-reduce by ``dp``);
  a loss normalised by a global token count must fold that count into ``loss_fn``.
- Gradients: accumulate into ``.grad`` over the micro-batches with no communication; after the last
  micro-batch bucketed flat all-reduces (at most 25 MiB copied at a time) average them over the "dp" mesh
  dimension, then a tied
  embedding split across ranks sums its two partial gradients (:mod:`omnibal_pl.parallel.tied`).
  They are not zeroed here: zero them before each step, as with ``loss.backward()``.
- The step's loss is broadcast from the last stage and averaged over DP: every rank returns it.

Shapes are static: every micro-batch has the plan's ``token_cap`` tokens (``input_ids`` length L) and
``vit_cap`` tiles (``pixel_values`` tiles T); a micro-batch of another shape raises :class:`DataError`.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from omnibal_pl.batch import PackedBatch
from omnibal_pl.errors import DataError
from omnibal_pl.model import VLMConfig
from omnibal_pl.plan.costs import GRAD_BUCKET_BYTES
from omnibal_pl.plan.plan import Plan
from omnibal_pl.parallel.sharding import SHARDED_LEVELS, check_zero, local_tensor, shard_stages
from omnibal_pl.parallel.stage import StageModule, build_stage
from omnibal_pl.parallel.tied import TiedCopy, tie_embeddings

LossFn = Callable[[torch.Tensor, PackedBatch], torch.Tensor]


class _MicroBatchLoss:
    """The schedule's ``loss_fn(output, target)``: ``target`` is the micro-batch index."""

    def __init__(self, loss_fn: LossFn, stage: StageModule) -> None:
        self.loss_fn = loss_fn
        self.stage = stage

    def __call__(self, logits: torch.Tensor, mb_index: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits, self.stage.micro_batches[int(mb_index)])


def _unique_parameters(modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for p in module.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def all_reduce_grads(params: Sequence[nn.Parameter], dp_group: dist.ProcessGroup,
                     bucket_bytes: int = GRAD_BUCKET_BYTES) -> None:
    """Average ``params``' gradients over ``dp_group``: flat all-reduces of at most ``bucket_bytes`` each
    (a bucket holds one dtype; a larger gradient goes alone), so the copy the collective works on never
    holds more than one bucket (or the largest gradient) besides the gradients themselves.

    Frozen parameters (``requires_grad=False``, the same on every replica) are skipped; a trainable one
    without a gradient gets zeros, so every replica runs the same collectives.
    """
    size = dist.get_world_size(dp_group)
    if size == 1:
        return
    buckets: dict[torch.dtype, list[torch.Tensor]] = {}

    def flush(grads: list[torch.Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=dp_group)
        flat.div_(size)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
        grads.clear()

    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        bucket = buckets.setdefault(p.grad.dtype, [])
        if bucket and (sum(g.numel() for g in bucket) + p.grad.numel()) * p.grad.element_size() > bucket_bytes:
            flush(bucket)
        bucket.append(p.grad)
    for bucket in buckets.values():
        if bucket:
            flush(bucket)


def clip_grad_norm_(params: Sequence[nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup,
                    device: torch.device, not_counted: Sequence[nn.Parameter] = (),
                    shard_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Scale the gradients so their global L2 norm over all pipeline stages is at most ``max_norm``.

    ``params`` are this rank's (all its stages); gradients must already be averaged over DP. Replicated
    gradients are equal across replicas, so only the pipeline group reduces; gradients sharded over DP
    (ZeRO 2/3: ``DTensor`` shards) sum their squares over ``shard_group`` too. ``not_counted`` (copies of
    a weight counted on another rank) are scaled but left out of the norm. Same formula as
    ``torch.nn.utils.clip_grad_norm_``; returns the norm before clipping (fp32 on ``device``, every rank).
    ``max_norm=inf`` measures the norm and leaves the gradients untouched.
    """
    with_grad = [p for p in params if p.grad is not None]
    skip = {id(p) for p in not_counted}
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for p in with_grad:
        if id(p) not in skip:
            squares += local_tensor(p.grad.detach()).float().pow(2).sum()
    if shard_group is not None:
        dist.all_reduce(squares, group=shard_group)
    dist.all_reduce(squares, group=pp_group)
    total = squares.sqrt()
    if math.isinf(max_norm):  # measuring only: no pass over the gradients
        return total
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in with_grad:
        local_tensor(p.grad.detach()).mul_(coef.to(p.grad.dtype))
    return total


class PipelineRunner:
    """Runs training steps of this rank's pipeline stages (see the module docstring).

    ``stages`` are this rank's :class:`StageModule` s of ``plan`` (one, or several for interleaved 1F1B),
    in stage order; the schedule and the micro-batches per step are the plan's; ``mesh`` is the
    ("pp", "dp") mesh; ``tied`` this rank's copy of an embedding tied across ranks, if any.
    """

    def __init__(self, stages: Sequence[StageModule], plan: Plan, mesh: DeviceMesh, loss_fn: LossFn,
                 device: torch.device | str = "cpu", tied: TiedCopy | None = None) -> None:
        self.modules = list(stages)
        self.sharded = plan.zero in SHARDED_LEVELS  # FSDP2 reduce-scatters the gradients itself
        self.device = torch.device(device)
        self.num_micro_batches = plan.micro_batches
        self.tied = tied
        self.pp_group = mesh["pp"].get_group()
        self.dp_group = mesh["dp"].get_group()
        self.shape = (plan.token_cap, plan.vit_cap)  # (tokens L, tiles T) of every micro-batch
        num_stages = len(plan.stages)
        pipe_stages = [PipelineStage(s, s.stage_index, num_stages, self.device, group=self.pp_group) for s in stages]
        self.has_first = pipe_stages[0].is_first
        self.has_last = pipe_stages[-1].is_last
        self.last_rank = (num_stages - 1) % plan.pp
        self.loss = _MicroBatchLoss(loss_fn, self.modules[-1])
        m = plan.micro_batches
        if plan.schedule == "interleaved":
            self.schedule = ScheduleInterleaved1F1B(pipe_stages, m, loss_fn=self.loss)
        else:
            cls = Schedule1F1B if plan.schedule == "1f1b" else ScheduleGPipe
            self.schedule = cls(pipe_stages[0], m, loss_fn=self.loss)

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's parameters (all its stages), each once: what its optimizer gets."""
        return iter(_unique_parameters(self.modules))

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """:func:`clip_grad_norm_` over all stages, a tied embedding counted once; the norm before clipping."""
        duplicate = [self.tied.param] if self.tied is not None and self.tied.duplicate else []
        return clip_grad_norm_(list(self.parameters()), max_norm, self.pp_group, self.device, not_counted=duplicate,
                               shard_group=self.dp_group if self.sharded else None)

    def check_shapes(self, micro_batches: Sequence[PackedBatch]) -> None:
        """Raise :class:`DataError` unless there are ``num_micro_batches`` micro-batches of the pipeline's shape."""
        if len(micro_batches) != self.num_micro_batches:
            raise DataError(f"pipeline step: got {len(micro_batches)} micro-batches, the schedule runs "
                            f"{self.num_micro_batches}; the sampler's micro_batches must match the pipeline's")
        tokens, tiles = self.shape
        for k, mb in enumerate(micro_batches):
            if mb.input_ids.shape[1] != tokens:
                raise DataError(
                    f"pipeline step: micro-batch {k} has {mb.input_ids.shape[1]} tokens, but pipeline stages run "
                    f"at a fixed {tokens} tokens (the plan's token_cap); pad every "
                    f"micro-batch to the token cap (collate pad_to: cap)")
            if mb.image_flags.shape[0] != tiles:  # one flag per tile (Qwen: per merge block of patch rows)
                raise DataError(
                    f"pipeline step: micro-batch {k} has {mb.image_flags.shape[0]} tiles, but pipeline stages run "
                    f"at a fixed {tiles} tiles (the plan's vit_cap); pad every "
                    f"micro-batch's tiles to the tile cap")

    def _run(self, micro_batches: Sequence[PackedBatch], train: bool) -> list[torch.Tensor] | None:
        """One pass of the schedule over ``micro_batches`` (forward and backward, or forward only); the last
        stage's per-micro-batch losses (None on other ranks)."""
        self.check_shapes(micro_batches)
        batches = [mb.to(self.device, non_blocking=True) for mb in micro_batches]
        for module in self.modules:
            module.micro_batches = batches
        index = torch.arange(len(batches))
        # stage 0 reads each micro-batch's pixel_values itself (StageModule.forward): concatenating them for the
        # schedule to chunk would hold a second copy of the step's pixels until its last backward
        args = (index.to(self.device, torch.float32).view(-1, 1),) if self.has_first else ()
        losses: list[torch.Tensor] | None = [] if self.has_last else None
        run = self.schedule.step if train else self.schedule.eval
        try:
            run(*args, target=index if self.has_last else None, losses=losses, return_outputs=False, mb_index=index)
        finally:
            for module in self.modules:
                module.micro_batches = []
        return losses

    def eval_step(self, micro_batches: Sequence[PackedBatch], on_logits: LossFn) -> None:
        """Forward only over ``micro_batches``, without gradients: the last stage calls ``on_logits(logits,
        batch)`` per micro-batch (its return value is ignored) instead of the training loss."""
        loss_fn = self.loss.loss_fn

        def observe(logits: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
            on_logits(logits, batch)
            return logits.new_zeros(())  # the schedule collects a loss per micro-batch

        self.loss.loss_fn = observe
        try:
            with torch.no_grad():
                self._run(micro_batches, train=False)
        finally:
            self.loss.loss_fn = loss_fn

    def train_step(self, micro_batches: Sequence[PackedBatch]) -> torch.Tensor:
        """Forward and backward of the step's micro-batches, then the DP gradient average.

        Returns the step's loss (mean over the ``m x dp`` micro-batches, detached fp32 scalar) on
        every rank. The optimizer step, clipping (:meth:`clip_grad_norm_`) and zeroing are the caller's.
        """
        losses = self._run(micro_batches, train=True)
        if not self.sharded:
            all_reduce_grads(list(self.parameters()), self.dp_group)
        if self.tied is not None:
            self.tied.sync_grad()
        loss = torch.stack(losses).detach().float().mean() if losses else torch.zeros((), device=self.device)
        dist.broadcast(loss, group=self.pp_group, group_src=self.last_rank)
        dist.all_reduce(loss, group=self.dp_group)
        return loss / dist.get_world_size(self.dp_group)


def build_pipeline(cfg: VLMConfig, plan: Plan, mesh: DeviceMesh, full_state: Mapping[str, torch.Tensor],
                   loss_fn: LossFn, device: torch.device | str = "cpu") -> PipelineRunner:
    """This rank's stages of ``plan`` (checked against ``cfg`` and the mesh), filled from ``full_state`` and
    sharded over the "dp" mesh dimension at the plan's ZeRO level (:mod:`omnibal_pl.parallel.sharding`)."""
    plan.check_model(cfg)
    plan.check_run("the plan given to build_pipeline", pp=mesh["pp"].size(), dp=mesh["dp"].size())
    check_zero(plan.zero, cfg, plan)
    stages = [build_stage(cfg, plan, s, device, full_state) for s in plan.stages_of_rank(mesh["pp"].get_local_rank())]
    if plan.zero in SHARDED_LEVELS:
        shard_stages(stages, mesh["dp"], plan.zero)
    tied = tie_embeddings(cfg, plan, mesh, stages)
    return PipelineRunner(stages, plan, mesh, loss_fn, device, tied)
