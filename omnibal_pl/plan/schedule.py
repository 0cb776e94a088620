"""Pipeline schedules as per-rank programs: the order in which each rank runs its forward and backward ops.

Stages are numbered along the model: with ``v`` virtual stages (chunks) per rank and ``p`` ranks there
are ``p * v`` stages and stage ``s`` lives on rank ``s % p`` (Megatron's interleaved layout: chunk ``c``
of rank ``r`` is stage ``c * p + r``). Every schedule is the same three-phase program per rank:
``warmup`` forwards, then alternating one forward / one backward, then the remaining backwards;
the schedules differ only in the warmup count and in the order micro-batches and chunks are visited.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Sequence

from omnibal_pl.errors import ConfigError
from omnibal_pl.plan.plan import check_pipeline_sizes


@dataclass(frozen=True)
class PipelineConfig:
    """How the pipeline runs: ``pp`` ranks, ``micro_batches`` per step, the schedule, ``virtual_stages``
    chunks per rank (interleaved only), ``hop_s`` seconds per point-to-point activation/gradient transfer
    between consecutive stages, and the memory budget per rank in bytes (one number for all ranks, one per
    rank, or None for unlimited). ``dp`` and ``zero`` size the communication buffers a stage holds
(:func:`~omnibal_pl.plan.costs.transient_bytes`); they do not change the simulation.
    """

    pp: int
    micro_batches: int
    schedule: str = "1f1b"
    virtual_stages: int = 1
    hop_s: float = 0.0
    memory_budget_bytes: float | tuple[float, ...] | None = None
    dp: int = 1
    zero: int = 0

    def __post_init__(self) -> None:
        check_pipeline_sizes(self.pp, self.micro_batches, self.schedule, self.virtual_stages, self.dp, runnable=False)
        if self.hop_s < 0:
            raise ConfigError(f"hop_s={self.hop_s} must be >= 0")
        if isinstance(self.memory_budget_bytes, (list, tuple)):
            object.__setattr__(self, "memory_budget_bytes", tuple(float(b) for b in self.memory_budget_bytes))
            if len(self.memory_budget_bytes) != self.pp:
                raise ConfigError(f"memory_budget_bytes lists {len(self.memory_budget_bytes)} budgets for "
                                  f"pp={self.pp} ranks; give one per rank or a single number")

    @property
    def num_stages(self) -> int:
        """Pipeline stages along the model: ``pp * virtual_stages``."""
        return self.pp * self.virtual_stages

    def rank_of(self, stage: int) -> int:
        return stage % self.pp

    def budget(self, rank: int) -> float:
        """Memory budget of ``rank`` in bytes (``inf`` when unlimited)."""
        b = self.memory_budget_bytes
        if b is None:
            return float("inf")
        return b[rank] if isinstance(b, tuple) else float(b)


class Op(NamedTuple):
    """One forward (``backward=False``) or backward of micro-batch ``micro_batch`` on ``stage``."""

    stage: int
    micro_batch: int
    backward: bool


def _warmup(schedule: str, p: int, v: int, m: int, rank: int) -> int:
    if schedule == "gpipe":
        return m
    if schedule == "1f1b":
        return min(p - rank - 1, m)
    # Megatron: with as many micro-batches as ranks every forward runs first; otherwise two per
    # downstream rank (forward and its gradient) plus one round of the other chunks.
    if m == p:
        return m * v
    return min((p - rank - 1) * 2 + (v - 1) * p, m * v)


def _visit_order(p: int, v: int, m: int, rank: int, backward: bool) -> list[Op]:
    """Megatron's order of (chunk, micro-batch) visits on one rank: groups of ``p`` micro-batches go
    through chunk 0, 1, ..., v-1 (forward) or v-1, ..., 0 (backward). With v=1 this is 0, 1, ..., m-1."""
    ops = []
    for k in range(m * v):
        in_group = k % (p * v)
        chunk = in_group // p
        if backward:
            chunk = v - 1 - chunk
        micro_batch = (k // (p * v)) * p + in_group % p if v > 1 else k
        ops.append(Op(chunk * p + rank, micro_batch, backward))
    return ops


@lru_cache(maxsize=256)
def rank_programs(schedule: str, pp: int, virtual_stages: int, micro_batches: int) -> tuple[tuple[Op, ...], ...]:
    """The op order of every rank: ``programs[rank]`` is a tuple of :class:`Op`."""
    p, v, m = pp, virtual_stages, micro_batches
    programs = []
    for rank in range(p):
        forwards = _visit_order(p, v, m, rank, backward=False)
        backwards = _visit_order(p, v, m, rank, backward=True)
        w = _warmup(schedule, p, v, m, rank)
        order = forwards[:w]
        for f, b in zip(forwards[w:], backwards):
            order += [f, b]
        order += backwards[len(forwards) - w:]
        programs.append(tuple(order))
    return tuple(programs)


@lru_cache(maxsize=256)
def peak_in_flight(schedule: str, pp: int, virtual_stages: int, micro_batches: int) -> tuple[int, ...]:
    """Per stage, the most micro-batches whose forward has started and whose backward has not finished.

    A rank runs its ops one at a time and activations change only at its own ops, so this depends on the
    program alone, not on op durations. 1F1B: stage ``i`` of ``p`` holds ``min(p - i, m)``; GPipe: ``m``.
    """
    programs = rank_programs(schedule, pp, virtual_stages, micro_batches)
    peak = [0] * (pp * virtual_stages)
    for program in programs:
        live = dict.fromkeys((op.stage for op in program), 0)
        for op in program:
            live[op.stage] += -1 if op.backward else 1
            peak[op.stage] = max(peak[op.stage], live[op.stage] + op.backward)
    return tuple(peak)


def stage_multipliers(config: PipelineConfig) -> tuple[int, ...]:
    """:func:`peak_in_flight` for ``config``: how many micro-batches of activations each stage must hold."""
    return peak_in_flight(config.schedule, config.pp, config.virtual_stages, config.micro_batches)


def check_stage_times(config: PipelineConfig, *arrays: Sequence[float]) -> None:
    """Raises :class:`ConfigError` unless every array has one entry per stage."""
    for values in arrays:
        if len(values) != config.num_stages:
            raise ConfigError(f"got {len(values)} per-stage values for {config.num_stages} stages "
                              f"(pp={config.pp} x virtual_stages={config.virtual_stages})")
