"""The plan file: what the planner hands to the strategy (YAML), and :func:`make_plan`, which makes one.

A :class:`Plan` lists the blocks of each pipeline stage by name (stage ``s`` runs on pp rank ``s % pp``;
more stages than ranks means interleaving), the recompute mode of each block that recomputes, the
schedule and micro-batch count, the micro-batch shape it was made for, and the predictions.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import yaml

from omnibal_pl.errors import ConfigError, PlanError
from omnibal_pl.model.config import VLMConfig
from omnibal_pl.plan.cost_model import PRESETS, block_parameters, cost_model_profile, device_preset, fit_device, hop_seconds
from omnibal_pl.plan.costs import RECOMPUTE_MODES, SOURCES, CostProfile, MicroBatchShape
from omnibal_pl.plan.partition import ScoredPartition, search_partition
from omnibal_pl.plan.profiler import device_memory_bytes, local_device, profile_blocks
from omnibal_pl.plan.schedule import SCHEDULES, PipelineConfig

RECOMPUTING_BLOCKS = ("vision.blocks.", "llm.layers.")  # the TransformerBlock names
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Plan:
    """One pipeline plan. Units: seconds, bytes; ``vit_cap`` in tiles, ``token_cap`` in tokens.

    Invariants (checked at construction): every stage non-empty, no block twice, ``len(stages)`` a
    multiple of ``pp``, recompute only on transformer blocks of the plan with a known mode, one memory
    figure per stage.
    """

    model: str
    stages: tuple[tuple[str, ...], ...]
    recompute: dict[str, str]
    schedule: str
    pp: int
    micro_batches: int
    vit_cap: int
    token_cap: int
    predicted_step_s: float
    stage_memory_bytes: tuple[float, ...]
    source: str
    dp: int = 1
    device: str = ""
    memory_budget_bytes: float = math.inf
    bubble_fraction: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(tuple(s) for s in self.stages))
        object.__setattr__(self, "stage_memory_bytes", tuple(float(b) for b in self.stage_memory_bytes))
        object.__setattr__(self, "recompute", dict(self.recompute))
        errors = []
        if self.schedule not in SCHEDULES:
            errors.append(f"schedule {self.schedule!r} is not one of {SCHEDULES}")
        if self.source not in SOURCES:
            errors.append(f"source {self.source!r} is not one of {SOURCES}")
        for key in ("pp", "micro_batches", "dp", "vit_cap", "token_cap"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                errors.append(f"{key}={getattr(self, key)!r} must be an integer >= 1")
        if not self.stages or any(not s for s in self.stages):
            errors.append(f"every stage needs at least one block; got {[len(s) for s in self.stages]} blocks per stage")
        elif isinstance(self.pp, int) and self.pp >= 1 and len(self.stages) % self.pp:
            errors.append(f"{len(self.stages)} stages do not divide evenly over pp={self.pp} ranks")
        names = [n for s in self.stages for n in s]
        if any(not isinstance(n, str) for n in names):
            errors.append("block names must be strings")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            errors.append(f"blocks {twice} appear more than once")
        unknown = sorted(set(self.recompute) - set(names))
        if unknown:
            errors.append(f"recompute names blocks {unknown} that no stage holds")
        bad = {n: m for n, m in self.recompute.items() if m not in RECOMPUTE_MODES}
        if bad:
            errors.append(f"recompute modes {bad} are not among {RECOMPUTE_MODES}")
        fixed = sorted(n for n, m in self.recompute.items() if m != "none" and not str(n).startswith(RECOMPUTING_BLOCKS))
        if fixed:
            errors.append(f"blocks {fixed} cannot recompute (only vision.blocks.* and llm.layers.* can)")
        if len(self.stage_memory_bytes) != len(self.stages):
            errors.append(f"{len(self.stage_memory_bytes)} stage_memory_bytes for {len(self.stages)} stages")
        if errors:
            raise PlanError(f"plan of {self.model!r}: " + "; ".join(errors))

    @property
    def virtual_stages(self) -> int:
        """Stages per pipeline rank (1 unless interleaved)."""
        return len(self.stages) // self.pp

    def mode(self, block: str) -> str:
        """Recompute mode of ``block`` (``none`` when not listed)."""
        return self.recompute.get(block, "none")

    def check_model(self, block_names: Sequence[str]) -> None:
        """Raises :class:`PlanError` unless the stages hold every block of ``block_names`` exactly once, in order."""
        names = [n for s in self.stages for n in s]
        if names == list(block_names):
            return
        missing = [n for n in block_names if n not in set(names)]
        unknown = [n for n in names if n not in set(block_names)]
        if missing or unknown:
            raise PlanError(f"plan of {self.model!r} does not match the model: blocks missing from the plan "
                            f"{missing[:6]}{'...' if len(missing) > 6 else ''}, blocks the model does not have "
                            f"{unknown[:6]}{'...' if len(unknown) > 6 else ''}; make the plan for this model config "
                            "(omnibal-plan model=...)")
        first = next(i for i, (a, b) in enumerate(zip(names, block_names)) if a != b)
        raise PlanError(f"plan of {self.model!r} lists the model's blocks out of order: position {first} holds "
                        f"{names[first]!r}, the model has {block_names[first]!r} there; stages must be contiguous "
                        "runs of blocks in model order")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stages"] = [list(s) for s in self.stages]
        data["stage_memory_bytes"] = list(self.stage_memory_bytes)
        data["recompute"] = {n: m for n, m in self.recompute.items() if m != "none"}
        return {"version": _FORMAT_VERSION, **data}

    def save(self, path: str | Path) -> None:
        """Writes the plan as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, width=120))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Reads a plan written by :meth:`save`; a missing or malformed file raises :class:`PlanError`."""
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise PlanError(f"{path}: cannot read the plan ({err}); make one with omnibal-plan") from err
        if not isinstance(data, dict):
            raise PlanError(f"{path}: a plan file is a YAML mapping, got {type(data).__name__}")
        if data.pop("version", None) != _FORMAT_VERSION:
            raise PlanError(f"{path}: plan format version is not {_FORMAT_VERSION}; make it again with omnibal-plan")
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        unknown, missing = sorted(set(data) - known), sorted(required - set(data))
        if unknown or missing:
            raise PlanError(f"{path}: unknown keys {unknown}, missing keys {missing}; valid keys are {sorted(known)}")
        if not isinstance(data["stages"], list) or not all(isinstance(s, list) for s in data["stages"]):
            raise PlanError(f"{path}: stages must be a list of lists of block names")
        if not isinstance(data["recompute"], dict):
            raise PlanError(f"{path}: recompute must map block names to modes")
        try:
            return cls(**data)
        except PlanError as err:
            raise PlanError(f"{path}: {err}") from None
        except (TypeError, ValueError) as err:
            raise PlanError(f"{path}: {err}") from None


@dataclass
class PlanInputs:
    """What a partition search needs for one model, cluster and micro-batch shape: the block costs, the
    pipeline config (schedule, memory budget per rank, hop seconds) and the shape."""

    profile: CostProfile
    config: PipelineConfig
    shape: MicroBatchShape
    device: str


def planning_inputs(model: VLMConfig, pp: int, micro_batches: int, vit_cap: int, token_cap: int, *, dp: int = 1,
                    schedule: str = "1f1b", device: str = "h100_80gb", source: str = "cost_model",
                    profile_cache: str | None = None, samples: int = 4, virtual_stages: int = 2,
                    memory_fraction: float = 0.9, optimizer_shards: int = 1) -> PlanInputs:
    """Block costs and pipeline config for :func:`make_plan` (its docstring has the arguments)."""
    if source not in ("profile", "cost_model"):
        raise ConfigError(f"plan source {source!r}: use 'profile' (measure the blocks here) or 'cost_model'")
    if not 0 < memory_fraction <= 1:
        raise ConfigError(f"memory_fraction={memory_fraction} must be in (0, 1]")
    shape = MicroBatchShape(vit_cap, token_cap, samples)
    if device not in (*PRESETS, "measured", "local"):
        device_preset(device)  # raises the error listing the presets
    measured = None
    if source == "profile" or device not in PRESETS:
        measured = profile_blocks(model, shape, optimizer_shards=optimizer_shards, cache_dir=profile_cache)
    if device in PRESETS:
        preset = device_preset(device)
        memory, hop = preset.memory_bytes, hop_seconds(model, shape, preset)
    else:  # this machine: its memory, and no link between stages to time
        preset, memory, hop = None, device_memory_bytes(local_device()), 0.0
    if source == "profile":
        profile = measured
    else:
        if preset is None:
            preset = fit_device(measured, model, memory)
        profile = cost_model_profile(model, shape, preset, optimizer_shards=optimizer_shards)
    profile.check_blocks([n for n, _ in block_parameters(model)])
    config = PipelineConfig(pp=pp, micro_batches=micro_batches, schedule=schedule,
                            virtual_stages=virtual_stages if schedule == "interleaved" else 1, hop_s=hop,
                            memory_budget_bytes=memory * memory_fraction, dp=dp)
    return PlanInputs(profile=profile, config=config, shape=shape, device=device)


def plan_from_partition(model: VLMConfig, inputs: PlanInputs, scored: ScoredPartition) -> Plan:
    """The :class:`Plan` of a scored partition: stages by name, non-``none`` recompute modes, the simulated
    step and each stage's peak memory (static + in-flight micro-batches x kept activations)."""
    names = inputs.profile.names
    bounds = scored.bounds
    sim = scored.sim
    memory = [s + n * a for s, n, a in zip(scored.static_bytes, sim.peak_in_flight, scored.activation_bytes)]
    return Plan(
        model=model.name,
        stages=tuple(tuple(names[i:j]) for i, j in zip(bounds, bounds[1:])),
        recompute={n: m for n, m in zip(names, scored.modes) if m != "none"},
        schedule=inputs.config.schedule, pp=inputs.config.pp, micro_batches=inputs.config.micro_batches,
        vit_cap=inputs.shape.tiles, token_cap=inputs.shape.tokens,
        predicted_step_s=scored.step_s, stage_memory_bytes=tuple(memory), source=inputs.profile.source,
        dp=inputs.config.dp, device=inputs.device, memory_budget_bytes=inputs.config.budget(0),
        bubble_fraction=sim.bubble_fraction,
        notes={"samples_per_micro_batch": inputs.shape.samples, "policy": scored.policy,
               "hop_s": inputs.config.hop_s, "profile_device": inputs.profile.device},
    )


def make_plan(model: VLMConfig, pp: int, micro_batches: int, vit_cap: int, token_cap: int, *, dp: int = 1,
              schedule: str = "1f1b", device: str = "h100_80gb", source: str = "cost_model",
              profile_cache: str | None = None, samples: int = 4, virtual_stages: int = 2,
              memory_fraction: float = 0.9, optimizer_shards: int = 1) -> Plan:
    """The searched partition of ``model`` into pipeline stages with adaptive per-stage recompute.

    ``vit_cap`` tiles and ``token_cap`` tokens per micro-batch, packed as ``samples`` samples; ``pp``
    ranks, ``micro_batches`` per step, ``schedule`` (``interleaved`` runs ``virtual_stages`` chunks per
    rank). ``source``: ``cost_model`` (FLOPs timed by the ``device`` preset: ``h100_80gb``, ``h200``,
    ``a100_80gb``, or ``measured``/``local``: fitted to a profile of this machine) or ``profile``
    (measured here, cached in ``profile_cache``). The memory budget per rank is ``memory_fraction`` of
    the device's memory (the preset's, or this machine's for ``measured``/``local``); the fp32 optimizer
    state is divided over ``optimizer_shards`` ranks (1 = each rank holds its own, as the omnibal
    strategy runs today). Raises :class:`PlanError` when no partition fits, naming the fix.
    """
    inputs = planning_inputs(model, pp, micro_batches, vit_cap, token_cap, dp=dp, schedule=schedule, device=device,
                             source=source, profile_cache=profile_cache, samples=samples,
                             virtual_stages=virtual_stages, memory_fraction=memory_fraction,
                             optimizer_shards=optimizer_shards)
    return plan_from_partition(model, inputs, search_partition(inputs.profile, inputs.config))
