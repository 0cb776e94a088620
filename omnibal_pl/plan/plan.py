"""The pipeline plan: the one description of how a run splits the model over pipeline ranks.

A :class:`Plan` is what the planner writes (``plan.yaml``), what ``omnibal-train`` resolves before the
Trainer exists, and what the runtime (:mod:`omnibal_pl.parallel`) builds its stages from. It lists the
blocks of each stage by name (stage ``s`` runs on pipeline rank ``s % pp``; more stages than ranks means
interleaving), the recompute mode of each block that recomputes, and the settings it was made under:
schedule, pipeline and data-parallel sizes, micro-batches per step and the micro-batch shape. A run
whose settings differ refuses the plan (:meth:`Plan.check_run`).

This module also owns the vocabulary of pipelines: :data:`SCHEDULES`, the recompute modes (defined by
the block that implements them, :data:`omnibal_pl.model.block.RECOMPUTE_MODES`), the uniform split and
the one check of pipeline sizes (:func:`check_pipeline_sizes`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from omnibal_pl.errors import ConfigError, PlanError
from omnibal_pl.model.block import RECOMPUTE_MODES
from omnibal_pl.model.config import TRANSFORMER_BLOCK_PREFIXES, VLMConfig
from omnibal_pl.plan.costs import SOURCES, ZERO_LEVELS

SCHEDULES = ("1f1b", "gpipe", "interleaved")
PLAN_SOURCES = (*SOURCES, "uniform")
PLAN_SETTINGS = ("model", "pp", "dp", "zero", "schedule", "micro_batches", "vit_cap", "token_cap")  # what a run must match  # where the block costs came from; uniform: none were used
_FORMAT_VERSION = 2

__all__ = ["PLAN_SETTINGS", "PLAN_SOURCES", "Plan", "RECOMPUTE_MODES", "SCHEDULES", "check_pipeline_sizes", "even_bounds",
           "uniform_plan"]


def check_pipeline_sizes(pp: int, micro_batches: int, schedule: str, virtual_stages: int = 1, dp: int = 1,
                         num_blocks: int | None = None, runnable: bool = True) -> None:
    """Raises :class:`ConfigError` unless a pipeline of these sizes can be simulated (and, with ``runnable``,
    run by torch's schedules).

    ``pp`` ranks with ``virtual_stages`` stages each (more than one only under ``interleaved``, which
    also needs ``micro_batches`` to be a multiple of ``pp``, as in Megatron); a model of ``num_blocks``
    blocks (when given) has at most that many stages; every count is an integer >= 1. To run, 1F1B needs
    at least as many micro-batches per step as stages (torch's ``Schedule1F1B``), and fewer micro-batches
    than stages under GPipe warns (mostly bubble).
    """
    sizes = {"pp": pp, "dp": dp, "micro_batches": micro_batches, "virtual_stages": virtual_stages}
    bad = [f"{k}={v!r}" for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad:
        raise ConfigError(f"pipeline sizes {', '.join(bad)}: each must be an integer >= 1")
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule {schedule!r} is not one of {SCHEDULES}")
    if schedule != "interleaved" and virtual_stages != 1:
        raise ConfigError(f"{virtual_stages} stages per pipeline rank need schedule 'interleaved', got {schedule!r}")
    if schedule == "interleaved" and micro_batches % pp:
        raise ConfigError(f"interleaved 1F1B needs micro_batches ({micro_batches}) to be a multiple of pp ({pp}), "
                          f"as in Megatron; use balance.micro_batches={pp * -(-micro_batches // pp)}")
    if num_blocks is not None and pp * virtual_stages > num_blocks:
        raise ConfigError(f"{pp * virtual_stages} pipeline stages but the model has only {num_blocks} blocks; use "
                          f"cluster.pp <= {num_blocks // virtual_stages}")
    if not runnable:
        return
    if schedule == "1f1b" and micro_batches < pp * virtual_stages:
        raise ConfigError(f"1F1B needs at least as many micro-batches per step as stages: {micro_batches} < "
                          f"{pp * virtual_stages}; raise balance.micro_batches or use schedule 'gpipe'")
    if micro_batches < pp * virtual_stages:
        warnings.warn(f"{micro_batches} micro-batches for {pp * virtual_stages} pipeline stages: most of the step is "
                      f"pipeline bubble; use at least {pp * virtual_stages} micro-batches per step", stacklevel=2)


def even_bounds(n_items: int, n_stages: int, offset: int = 0) -> list[int]:
    """Bounds of ``n_items`` split into ``n_stages`` runs differing by at most one, longer runs first."""
    if not 1 <= n_stages <= n_items:
        raise PlanError(f"cannot split {n_items} blocks into {n_stages} non-empty stages; use 1 to {n_items}")
    q, r = divmod(n_items, n_stages)
    return [offset + k * q + min(k, r) for k in range(n_stages + 1)]


@dataclass(frozen=True)
class Plan:
    """One pipeline plan. Units: seconds, bytes; ``vit_cap`` in tiles, ``token_cap`` in tokens.

    Invariants (checked at construction): the pipeline sizes pass :func:`check_pipeline_sizes`; every
    stage is non-empty, no block appears twice, ``len(stages)`` is a multiple of ``pp``; recompute names
    only blocks of the plan with a known mode, ``attention`` only on transformer blocks; one memory
    figure per stage when predictions are given. ``predicted_step_s`` and ``stage_memory_bytes`` are the
    planner's predictions (None and empty for a uniform split, which predicts nothing). ``zero`` is the
    ZeRO level the stages are sharded with over the ``dp`` ranks (:mod:`omnibal_pl.parallel.sharding`);
    ``precision`` the Lightning precision its memory was modelled in ("" when it models none: a uniform split).
    """

    model: str
    stages: tuple[tuple[str, ...], ...]
    recompute: dict[str, str]
    schedule: str
    pp: int
    micro_batches: int
    vit_cap: int
    token_cap: int
    dp: int = 1
    zero: int = 0
    precision: str = ""
    source: str = "uniform"
    predicted_step_s: float | None = None
    stage_memory_bytes: tuple[float, ...] = ()
    device: str = ""
    memory_budget_bytes: float = math.inf
    bubble_fraction: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(tuple(s) for s in self.stages))
        object.__setattr__(self, "stage_memory_bytes", tuple(float(b) for b in self.stage_memory_bytes))
        object.__setattr__(self, "recompute", {n: m for n, m in dict(self.recompute).items() if m != "none"})
        errors = []
        if self.source not in PLAN_SOURCES:
            errors.append(f"source {self.source!r} is not one of {PLAN_SOURCES}")
        if self.zero not in ZERO_LEVELS:
            errors.append(f"zero={self.zero!r} is not a ZeRO level {ZERO_LEVELS}")
        for key in ("vit_cap", "token_cap"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                errors.append(f"{key}={getattr(self, key)!r} must be an integer >= 1")
        names = [n for s in self.stages for n in s]
        if not self.stages or any(not s for s in self.stages):
            errors.append(f"every stage needs at least one block; got {[len(s) for s in self.stages]} blocks per stage")
        elif isinstance(self.pp, int) and self.pp >= 1 and len(self.stages) % self.pp:
            errors.append(f"{len(self.stages)} stages do not divide evenly over pp={self.pp} ranks")
        else:
            try:
                check_pipeline_sizes(self.pp, self.micro_batches, self.schedule, len(self.stages) // self.pp, self.dp)
            except ConfigError as err:
                errors.append(str(err))
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
        attention = sorted(n for n, m in self.recompute.items()
                           if m == "attention" and not str(n).startswith(TRANSFORMER_BLOCK_PREFIXES))
        if attention:
            errors.append(f"blocks {attention} have no attention core to recompute: 'attention' is for "
                          "vision.blocks.<i> and llm.layers.<i>; use 'full' or 'none'")
        if self.stage_memory_bytes and len(self.stage_memory_bytes) != len(self.stages):
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

    def stages_of_rank(self, pp_rank: int) -> list[int]:
        """Stage indices run by pipeline rank ``pp_rank``, ascending."""
        return list(range(pp_rank, len(self.stages), self.pp))

    def check_model(self, cfg: VLMConfig) -> None:
        """Raises :class:`PlanError` unless the stages hold every block of ``cfg`` exactly once, in order."""
        block_names = cfg.block_names()
        names = [n for s in self.stages for n in s]
        if names == block_names:
            return
        missing = [n for n in block_names if n not in set(names)]
        unknown = [n for n in names if n not in set(block_names)]
        if missing or unknown:
            raise PlanError(f"plan of {self.model!r} does not match model {cfg.name!r}: blocks missing from the plan "
                            f"{missing[:6]}{'...' if len(missing) > 6 else ''}, blocks the model does not have "
                            f"{unknown[:6]}{'...' if len(unknown) > 6 else ''}; make the plan for this model config "
                            "(omnibal-plan model=...)")
        first = next(i for i, (a, b) in enumerate(zip(names, block_names)) if a != b)
        raise PlanError(f"plan of {self.model!r} lists the model's blocks out of order: position {first} holds "
                        f"{names[first]!r}, the model has {block_names[first]!r} there; stages must be contiguous "
                        "runs of blocks in model order")

    def check_run(self, where: str = "plan", **settings: Any) -> None:
        """Raises :class:`PlanError` naming every setting (``pp=2``, ``vit_cap=18``, ...) whose value differs
        from the one the plan was made for."""
        diff = [f"{k}: plan {getattr(self, k)!r}, run {v!r}" for k, v in settings.items() if getattr(self, k) != v]
        if diff:
            raise PlanError(f"{where} was made for other settings than this run's ({'; '.join(diff)}); make a plan "
                            "for this run (omnibal-plan with the same cluster and balance settings) or use plan.use=auto")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stages"] = [list(s) for s in self.stages]
        data["recompute"] = dict(self.recompute)
        data["stage_memory_bytes"] = list(self.stage_memory_bytes)
        return {"version": _FORMAT_VERSION, **data}

    def save(self, path: str | Path) -> Path:
        """Writes the plan as YAML (atomically: other processes may be waiting to read it)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, width=120))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Reads a plan written by :meth:`save`; a missing or malformed file raises :class:`PlanError`."""
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise PlanError(f"{path}: cannot read the plan ({err}); make one with omnibal-plan") from err
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> "Plan":
        """The plan of a :meth:`to_dict` mapping; a malformed one raises :class:`PlanError` naming ``where``."""
        if not isinstance(data, dict):
            raise PlanError(f"{where}: a plan file is a YAML mapping, got {type(data).__name__}")
        data = dict(data)
        if data.pop("version", None) != _FORMAT_VERSION:
            raise PlanError(f"{where}: plan format version is not {_FORMAT_VERSION}; make it again with omnibal-plan")
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        unknown, missing = sorted(set(data) - known), sorted(required - set(data))
        if unknown or missing:
            raise PlanError(f"{where}: unknown keys {unknown}, missing keys {missing}; valid keys are {sorted(known)}")
        if not isinstance(data["stages"], list) or not all(isinstance(s, list) for s in data["stages"]):
            raise PlanError(f"{where}: stages must be a list of lists of block names")
        if not isinstance(data["recompute"], dict):
            raise PlanError(f"{where}: recompute must map block names to modes")
        try:
            return cls(**data)
        except PlanError as err:
            raise PlanError(f"{where}: {err}") from None
        except (TypeError, ValueError) as err:
            raise PlanError(f"{where}: {err}") from None


def uniform_plan(cfg: VLMConfig, pp: int, micro_batches: int, vit_cap: int, token_cap: int, *, dp: int = 1,
                 zero: int = 0, schedule: str = "1f1b", virtual_stages: int = 2) -> Plan:
    """Equal block counts per stage (earlier stages one longer when uneven), no recompute: the split
    without a planner, as DeepSpeed's ``uniform``. ``interleaved`` runs ``virtual_stages`` stages per rank."""
    names = cfg.block_names()
    n_stages = pp * (virtual_stages if schedule == "interleaved" else 1)
    bounds = even_bounds(len(names), n_stages)
    return Plan(model=cfg.name, stages=tuple(tuple(names[a:b]) for a, b in zip(bounds, bounds[1:])), recompute={},
                schedule=schedule, pp=pp, micro_batches=micro_batches, vit_cap=vit_cap, token_cap=token_cap, dp=dp,
                zero=zero)
