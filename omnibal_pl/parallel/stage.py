"""One rank's pipeline stage(s): a pruned :class:`VLM` holding a contiguous run of ``blocks()``.

Construction (torchtitan's manual split): build the whole model on the meta device (no memory, no
init), delete every block outside the stage (``ModuleDict`` entries deleted, other blocks set to
None), materialise the rest on the device and fill it from a *full* (unsharded) state dict. Parameter
names never change (``llm.layers.7.attn.q.weight`` on whichever stage holds layer 7), so a checkpoint
re-partitions to any layout.

Initialisation: :func:`initial_state_dict` is the single-process init for a seed (``torch.manual_seed
(seed); VLM(cfg)``) built once on the CPU; every stage copies its slice, so a pipeline starts
bitwise-equal to the single-process model. It holds one full model in host memory per rank for a
moment: fine for tests and benchmarks; instruct-tuning starts from a pretrained checkpoint anyway,
whose full state dict is passed instead.

Tied embeddings (``llm.tie_embeddings``): a stage holding both ``llm.embed`` and ``llm.head`` shares
one parameter; a stage holding one of them gets its own copy under its own name, kept in sync by
:mod:`omnibal_pl.parallel.tied`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from omnibal_pl.batch import PackedBatch
from omnibal_pl.errors import ConfigError
from omnibal_pl.model import RECOMPUTE_MODES, VLM, TransformerBlock, VLMConfig
from omnibal_pl.parallel.sharding import full_tensor
from omnibal_pl.plan.plan import Plan


class StageModule(nn.Module):
    """One pipeline stage: ``model`` is a :class:`VLM` pruned to ``block_names``, run in order.

    ``forward(x, mb_index)`` runs the blocks on ``x`` (the one tensor crossing stages; stage 0 takes the
    micro-batch's own ``pixel_values`` instead) with the :class:`PackedBatch` ``micro_batches[mb_index]``; the pipeline runner sets ``micro_batches`` (the
    step's micro-batches, the same list on every stage of a pipeline) before each step and passes each
    micro-batch's index as a keyword argument, which the pipeline schedule hands to every stage.
    Blocks in ``checkpointed`` (non-transformer blocks under ``full`` recompute) run under
    ``torch.utils.checkpoint``; transformer blocks recompute by their own ``recompute`` attribute.
    """

    def __init__(self, model: VLM, stage_index: int, checkpointed: Sequence[str] = ()) -> None:
        super().__init__()
        self.model = model
        self.stage_index = stage_index
        self.block_names = tuple(name for name, _ in model.blocks())
        self.checkpointed = frozenset(checkpointed)
        self.micro_batches: list[PackedBatch] = []

    def forward(self, x: torch.Tensor, mb_index: torch.Tensor) -> torch.Tensor:
        batch = self.micro_batches[int(mb_index)]
        if self.stage_index == 0:
            x = batch.pixel_values  # the schedule's input to stage 0 is a placeholder (PipelineRunner.train_step)
        for name, block in self.model.blocks():
            if name in self.checkpointed and torch.is_grad_enabled():
                x = checkpoint(block, x, batch, use_reentrant=False)
            else:
                x = block(x, batch)
        return x


def initial_state_dict(cfg: VLMConfig, seed: int) -> dict[str, torch.Tensor]:
    """The full model's parameters after ``torch.manual_seed(seed); VLM(cfg)`` on the CPU.

    The global RNG state is restored afterwards. Tied weights appear under both names, as in
    ``state_dict()``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VLM(cfg).state_dict()


def _prune(model: VLM, keep: set[str]) -> None:
    for name, _ in model.blocks():
        if name in keep:
            continue
        parent_name, _, key = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, nn.ModuleDict):
            del parent[key]
        else:
            setattr(parent, key, None)


def load_stage_state(stage: StageModule, full_state: Mapping[str, torch.Tensor]) -> None:
    """Copy this stage's slice of a full (unsharded) state dict into its parameters and buffers.

    Keys are the model's own names (``llm.layers.3.mlp.up.weight``); keys of other stages are ignored.
    Raises :class:`ConfigError` naming the missing keys or mismatched shapes.
    """
    own = stage.model.state_dict()
    missing = [k for k in own if k not in full_state]
    shapes = [f"{k}: {tuple(full_state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in full_state and full_state[k].shape != v.shape]
    if missing or shapes:
        raise ConfigError(
            f"stage {stage.stage_index}: the state dict does not fit the model: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, shape mismatches {shapes[:8]}; pass a full state dict of "
            f"the same model config (omnibal names, see to_hf_state_dict for HF checkpoints)"
        )
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(full_state[k])


def build_stage(cfg: VLMConfig, plan: Plan, stage_index: int, device: torch.device | str,
                full_state: Mapping[str, torch.Tensor]) -> StageModule:
    """Stage ``stage_index`` of ``plan`` on ``device``, filled from ``full_state``, recompute applied.

    ``plan`` must have passed :meth:`Plan.check_model` for ``cfg``. Only the stage's blocks are ever
    materialised.
    """
    names = plan.stages[stage_index]
    with torch.device("meta"):
        model = VLM(cfg)
    _prune(model, set(names))
    model.to_empty(device=device)
    if model.llm.embed is not None and model.llm.head is not None and cfg.llm.tie_embeddings:
        model.llm.head.out.weight = model.llm.embed.tok.weight  # to_empty made two tensors of the tied one
    modes = {n: plan.mode(n) for n in names}
    transformer = {n for n, b in model.blocks() if isinstance(b, TransformerBlock)}
    for mode in RECOMPUTE_MODES:
        model.set_recompute(mode, [n for n in transformer if modes[n] == mode])
    stage = StageModule(model, stage_index, checkpointed=[n for n in names if n not in transformer and modes[n] == "full"])
    load_stage_state(stage, full_state)
    return stage


def gather_full_state_dict(stages: Sequence[StageModule], pp_group: torch.distributed.ProcessGroup
                           ) -> dict[str, torch.Tensor]:
    """The full model's state dict (CPU tensors, model names) on every rank of ``pp_group``.

    All-gathers each rank's slices as Python objects (ZeRO 2/3 shards gathered first, a collective over
    "dp"): for tests, export and small models; large models save with distributed checkpointing instead.
    """
    local = {k: full_tensor(v.detach()).cpu() for s in stages for k, v in s.model.state_dict().items()}
    parts: list[dict[str, torch.Tensor] | None] = [None] * torch.distributed.get_world_size(pp_group)
    torch.distributed.all_gather_object(parts, local, group=pp_group)
    return {k: v for part in parts for k, v in part.items()}
