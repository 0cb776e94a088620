"""ZeRO levels over the data-parallel ranks of each pipeline stage, with PyTorch's FSDP2 (``fully_shard``).

``cluster.zero`` in DeepSpeed's vocabulary:

- 0: parameters, gradients and optimizer state replicated on every DP rank; gradients all-reduced once
  per step (:func:`omnibal_pl.parallel.pipeline.all_reduce_grads`);
- 1: optimizer state partitioned over DP (torch's ``ZeroRedundancyOptimizer``, built by the training module
  with the runner's "dp" group): gradients all-reduced as at 0, each rank updates its parameters' share
  and broadcasts it;
- 2: gradients and optimizer state sharded over DP: every block of a stage is an FSDP2 unit that
  reduce-scatters its gradients after the step's last micro-batch and keeps its parameters unsharded
  from forward to backward (``reshard_after_forward=False``);
- 3: parameters too: each unit all-gathers its parameters for forward and again for backward
  (``reshard_after_forward=True``).

Sharding follows torchtitan's composition of pipelining with FSDP2: ``fully_shard`` per block over the
DP sub-mesh of the ("pp", "dp") mesh, then on the stage root (which takes the blocks' leftovers and a
tied embedding/head pair of one stage, so a shared parameter belongs to one unit);
``torch.distributed.pipelining`` turns gradient synchronisation off for every micro-batch but the last.
Parameters become ``DTensor`` s sharded on dim 0: their names do not change, so distributed checkpoints
keep their keys.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from omnibal_pl.errors import ConfigError
from omnibal_pl.model import VLMConfig
from omnibal_pl.plan.costs import ZERO_LEVELS
from omnibal_pl.plan.plan import Plan

if TYPE_CHECKING:  # stage.py imports this module
    from omnibal_pl.parallel.stage import StageModule

SHARDED_LEVELS = (2, 3)
_TIED = ("llm.embed", "llm.head")


def check_zero(zero: int, cfg: VLMConfig, plan: Plan) -> None:
    """Raises :class:`ConfigError` for a level that is unknown or cannot shard this plan."""
    if zero not in ZERO_LEVELS:
        raise ConfigError(f"cluster.zero={zero!r}: choose one of {ZERO_LEVELS} (0 replicated, 1 optimizer state "
                          "sharded over DP, 2 gradients too, 3 parameters too)")
    if zero in SHARDED_LEVELS and cfg.llm.tie_embeddings:
        stage_of = {n: s for s, names in enumerate(plan.stages) for n in names}
        embed, head = stage_of["llm.embed"], stage_of["llm.head"]
        if embed != head and embed % plan.pp == head % plan.pp:
            raise ConfigError(f"cluster.zero={zero} with a tied embedding on two stages of one rank (stages {embed} "
                              f"and {head}) would put one parameter in two FSDP units; keep llm.embed and llm.head "
                              "on one stage or on different ranks")


def shard_stages(stages: Sequence[StageModule], dp_mesh: DeviceMesh, zero: int) -> None:
    """Applies ZeRO ``zero`` (2 or 3) to this rank's stages in place (see the module docstring)."""
    reshard = zero == 3
    for stage in stages:
        shared = stage.model.llm is not None and stage.model.llm.embed is not None and stage.model.llm.head is not None \
            and stage.model.llm.head.out.weight is stage.model.llm.embed.tok.weight
        for name, block in stage.model.blocks():
            if not (shared and name in _TIED):
                fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard)
        fully_shard(stage, mesh=dp_mesh, reshard_after_forward=reshard)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ``DTensor`` (collective over its mesh; the tensor itself otherwise)."""
    return t.full_tensor() if isinstance(t, DTensor) else t
