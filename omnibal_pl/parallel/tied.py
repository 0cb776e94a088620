"""Tied input embedding and output head (``llm.tie_embeddings``) across pipeline stages, Megatron's way.

The single-process model has one matrix, ``llm.embed.tok.weight`` (also named ``llm.head.out.weight``).
In a pipeline:

- both blocks on one stage, or on two stages of the same rank (interleaved): one shared parameter;
- on different ranks: each rank keeps its own copy (``llm.embed.tok.weight`` on the embed rank,
  ``llm.head.out.weight`` on the head rank), both loaded from the same full state dict. After each
  backward the two partial gradients are summed over a two-rank group (embed rank, head rank of the
  same DP replica), so both copies get the single-process gradient and, with the same optimizer,
  stay equal. The head's copy is left out of the global gradient norm (counted once, as in one process).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from omnibal_pl.model import VLMConfig
from omnibal_pl.parallel.sharding import local_tensor
from omnibal_pl.parallel.stage import StageModule
from omnibal_pl.plan.plan import Plan


@dataclass
class TiedCopy:
    """This rank's copy of a weight tied across ranks, and the group that sums its gradient.

    ``duplicate``: the copy is the head's, so gradient-norm computations skip it.
    """

    param: nn.Parameter
    group: dist.ProcessGroup
    duplicate: bool

    def sync_grad(self) -> None:
        """Sum the two partial gradients (call once per step, after the last micro-batch's backward)."""
        dist.all_reduce(local_tensor(self.param.grad), group=self.group)  # equal shards under ZeRO 2/3


def tie_embeddings(cfg: VLMConfig, plan: Plan, mesh: DeviceMesh, stages: list[StageModule]
                   ) -> TiedCopy | None:
    """Tie ``llm.embed`` and ``llm.head`` of this rank's ``stages`` as the module docstring says.

    Collective over the whole world when the two blocks are on different pipeline ranks (every rank
    creates every replica's group, in the same order). Returns this rank's :class:`TiedCopy`, or None
    when the config does not tie, the weight is one local parameter, or this rank holds neither block.
    """
    if not cfg.llm.tie_embeddings:
        return None
    pp = mesh["pp"].size()
    stage_of = {name: s for s, names in enumerate(plan.stages) for name in names}
    embed_rank, head_rank = stage_of["llm.embed"] % pp, stage_of["llm.head"] % pp
    local = {name: block for stage in stages for name, block in stage.model.blocks()}
    embed, head = local.get("llm.embed"), local.get("llm.head")
    if embed_rank == head_rank:
        if embed is not None:
            head.out.weight = embed.tok.weight  # two stages of one rank: one parameter
        return None
    group = None
    for dp_index in range(mesh["dp"].size()):
        ranks = [int(mesh.mesh[embed_rank, dp_index]), int(mesh.mesh[head_rank, dp_index])]
        created = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            group = created
    if embed is not None:
        return TiedCopy(embed.tok.weight, group, duplicate=False)
    if head is not None:
        return TiedCopy(head.out.weight, group, duplicate=True)
    return None
