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
:mod:`omnibal_pl.strategy.tied`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from omnibal_pl.data.batch import PackedBatch
from omnibal_pl.errors import ConfigError, PlanError
from omnibal_pl.model import RECOMPUTE_MODES, VLM, TransformerBlock, VLMConfig
from omnibal_pl.plan.baselines import even_bounds


@dataclass(frozen=True)
class PipelineLayout:
    """Which blocks each pipeline stage runs and how each block recomputes (a plan file's content).

    ``stages[s]`` lists the block names of stage ``s``, in model order; stage ``s`` runs on pipeline
    rank ``s % pp`` (several stages per rank = interleaved schedule). ``recompute`` maps block names
    to ``none | full | attention``; blocks not named use ``none``. ``attention`` exists only for
    transformer blocks (``vision.blocks.<i>``, ``llm.layers.<i>``); ``full`` works for every block.
    """

    stages: tuple[tuple[str, ...], ...]
    recompute: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(tuple(s) for s in self.stages))
        object.__setattr__(self, "recompute", dict(self.recompute))

    def stages_of_rank(self, pp_rank: int, pp: int) -> list[int]:
        """Stage indices run by pipeline rank ``pp_rank``, ascending."""
        return list(range(pp_rank, len(self.stages), pp))


def _meta_blocks(cfg: VLMConfig) -> list[tuple[str, bool]]:
    """(name, is a transformer block) of every block in execution order, from a meta-device model."""
    with torch.device("meta"):
        return [(name, isinstance(block, TransformerBlock)) for name, block in VLM(cfg).blocks()]


def block_names(cfg: VLMConfig) -> list[str]:
    """The model's block names in execution order (built on the meta device: no memory, no init)."""
    return [name for name, _ in _meta_blocks(cfg)]


def uniform_layout(cfg: VLMConfig, num_stages: int) -> PipelineLayout:
    """Equal block counts per stage (earlier stages one longer when uneven), no recompute: the layout
    without a plan, as DeepSpeed's ``uniform`` partition. ``num_stages`` may exceed ``pp`` (interleaved)."""
    names = block_names(cfg)
    if not 1 <= num_stages <= len(names):
        raise ConfigError(f"{num_stages} pipeline stages for model {cfg.name!r} with {len(names)} blocks; "
                          f"use between 1 and {len(names)} stages")
    bounds = even_bounds(len(names), num_stages)
    return PipelineLayout([names[a:b] for a, b in zip(bounds, bounds[1:])])


def check_layout(layout: PipelineLayout, cfg: VLMConfig, pp: int) -> None:
    """Raise unless ``layout`` splits exactly this model's blocks into contiguous stages for ``pp`` ranks.

    :class:`ConfigError` for ``pp`` larger than the number of blocks; :class:`PlanError` for names that
    are not blocks, blocks missing, repeated or out of order, empty stages, a stage count that is not a
    multiple of ``pp`` and bad recompute entries.
    """
    blocks = _meta_blocks(cfg)
    names = [name for name, _ in blocks]
    if pp > len(names):
        raise ConfigError(f"pp={pp} pipeline ranks but model {cfg.name!r} has only {len(names)} blocks; use pp <= {len(names)}")
    flat = [n for stage in layout.stages for n in stage]
    unknown = [n for n in flat if n not in names]
    if unknown:
        raise PlanError(f"plan: {unknown} are not blocks of model {cfg.name!r}; its blocks are {names}")
    if flat != names:
        missing = [n for n in names if n not in flat]
        repeated = sorted({n for n in flat if flat.count(n) > 1})
        raise PlanError(
            f"plan: the stages must cover every block of {cfg.name!r} exactly once, in order; "
            f"missing {missing}, repeated {repeated}; got stages {[list(s) for s in layout.stages]}"
        )
    empty = [s for s, stage in enumerate(layout.stages) if not stage]
    if empty or len(layout.stages) % pp:
        raise PlanError(
            f"plan: {len(layout.stages)} stages (empty: {empty}) for pp={pp}; every stage needs a block and "
            f"the stage count must be a multiple of pp (one stage per rank, or v per rank for interleaved 1F1B)"
        )
    transformer = {name for name, is_transformer in blocks if is_transformer}
    bad = {n: m for n, m in layout.recompute.items()
           if n not in names or m not in RECOMPUTE_MODES or (m == "attention" and n not in transformer)}
    if bad:
        raise PlanError(
            f"plan: bad recompute entries {bad}: keys must be block names of {cfg.name!r}, modes one of "
            f"{RECOMPUTE_MODES}, and 'attention' only for transformer blocks (vision.blocks.<i>, llm.layers.<i>)"
        )


class StageModule(nn.Module):
    """One pipeline stage: ``model`` is a :class:`VLM` pruned to ``block_names``, run in order.

    ``forward(x, mb_index)`` runs the blocks on ``x`` (the one tensor crossing stages) with the
    :class:`PackedBatch` ``micro_batches[mb_index]``; the pipeline runner sets ``micro_batches`` (the
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


def build_stage(cfg: VLMConfig, layout: PipelineLayout, stage_index: int, device: torch.device | str,
                full_state: Mapping[str, torch.Tensor]) -> StageModule:
    """Stage ``stage_index`` of ``layout`` on ``device``, filled from ``full_state``, recompute applied.

    ``layout`` must have passed :func:`check_layout`. Only the stage's blocks are ever materialised.
    """
    names = layout.stages[stage_index]
    with torch.device("meta"):
        model = VLM(cfg)
    _prune(model, set(names))
    model.to_empty(device=device)
    if model.llm.embed is not None and model.llm.head is not None and cfg.llm.tie_embeddings:
        model.llm.head.out.weight = model.llm.embed.tok.weight  # to_empty made two tensors of the tied one
    modes = {n: layout.recompute.get(n, "none") for n in names}
    transformer = {n for n, b in model.blocks() if isinstance(b, TransformerBlock)}
    for mode in RECOMPUTE_MODES:
        model.set_recompute(mode, [n for n in transformer if modes[n] == mode])
    stage = StageModule(model, stage_index, checkpointed=[n for n in names if n not in transformer and modes[n] == "full"])
    load_stage_state(stage, full_state)
    return stage


def gather_full_state_dict(stages: Sequence[StageModule], pp_group: torch.distributed.ProcessGroup
                           ) -> dict[str, torch.Tensor]:
    """The full model's state dict (CPU tensors, model names) on every rank of ``pp_group``.

    All-gathers each rank's slices as Python objects: for tests, export and small models; large
    models save with distributed checkpointing instead.
    """
    local = {k: v.detach().cpu() for s in stages for k, v in s.model.state_dict().items()}
    parts: list[dict[str, torch.Tensor] | None] = [None] * torch.distributed.get_world_size(pp_group)
    torch.distributed.all_gather_object(parts, local, group=pp_group)
    return {k: v for part in parts for k, v in part.items()}
