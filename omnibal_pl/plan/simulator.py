"""Exact dependency simulation of one pipeline step (GPipe, 1F1B, interleaved 1F1B).

Model: each rank runs its program (:mod:`omnibal_pl.plan.schedule`) one op at a time; an op starts when
the rank is free and its input is ready: the forward of stage ``s`` needs the forward of stage ``s - 1``
for the same micro-batch, the backward of stage ``s`` needs the backward of stage ``s + 1`` (the last
stage: its own forward). An input that crosses ranks arrives ``hop_s`` seconds after it was produced;
sends do not block the sender. Op durations are the per-stage forward and backward seconds per
micro-batch (backward including any recomputation). The step ends when the last op ends (the optimizer
step is not included).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from omnibal_pl.plan.schedule import PipelineConfig, check_stage_times, peak_in_flight, rank_programs


@lru_cache(maxsize=256)
def _compiled(schedule: str, pp: int, v: int, m: int) -> tuple[tuple[int, int, int, bool, int, bool], ...]:
    """All ops in an order that respects both rank order and data dependencies, as tuples
    ``(rank, stage, micro_batch, backward, index of the input op or -1, input crosses ranks)``."""
    programs = rank_programs(schedule, pp, v, m)
    last = pp * v - 1
    done: dict[tuple[int, int, bool], int] = {}
    cursor = [0] * pp
    order = []
    while len(order) < sum(len(p) for p in programs):
        progressed = False
        for rank, program in enumerate(programs):
            while cursor[rank] < len(program):
                stage, mb, backward = program[cursor[rank]]
                if backward:
                    dep = (stage + 1, mb, True) if stage < last else (stage, mb, False)
                else:
                    dep = (stage - 1, mb, False) if stage > 0 else None
                if dep is not None and dep not in done:
                    break
                dep_index = done[dep] if dep is not None else -1
                crosses = dep is not None and dep[0] % pp != rank
                done[(stage, mb, backward)] = len(order)
                order.append((rank, stage, mb, backward, dep_index, crosses))
                cursor[rank] += 1
                progressed = True
        if not progressed:  # a schedule bug, not a user error
            raise RuntimeError(f"schedule {schedule} (pp={pp}, v={v}, m={m}) deadlocks")
    return tuple(order)


def _run(config: PipelineConfig, forward_s: Sequence[float], backward_s: Sequence[float]
         ) -> tuple[list[float], list[float]]:
    """Start and end time (seconds) of every op of :func:`_compiled`."""
    ops = _compiled(config.schedule, config.pp, config.virtual_stages, config.micro_batches)
    free = [0.0] * config.pp
    start, end = [0.0] * len(ops), [0.0] * len(ops)
    hop = config.hop_s
    for i, (rank, stage, _, backward, dep, crosses) in enumerate(ops):
        t = free[rank]
        if dep >= 0:
            ready = end[dep] + hop if crosses else end[dep]
            if ready > t:
                t = ready
        start[i] = t
        end[i] = free[rank] = t + (backward_s[stage] if backward else forward_s[stage])
    return start, end


def step_time(config: PipelineConfig, forward_s: Sequence[float], backward_s: Sequence[float]) -> float:
    """Simulated step time in seconds; the fast path of :func:`simulate` for searches."""
    return max(_run(config, forward_s, backward_s)[1])


@dataclass
class SimResult:
    """One simulated step. Per-rank lists have ``pp`` entries, per-stage lists ``pp * virtual_stages``.

    ``bubble_fraction`` is total idle time over total busy time across ranks (Narayanan et al.'s bubble
    time fraction: ``(p - 1) / m`` for 1F1B with equal stages). ``peak_memory_bytes[r]`` is rank ``r``'s
    static bytes plus the peak over time of the activation bytes its in-flight micro-batches hold.
    ``ops`` holds ``(rank, stage, micro_batch, backward, start_s, end_s)`` for the Gantt chart.
    """

    config: PipelineConfig
    step_s: float
    bubble_fraction: float
    busy_s: list[float]
    idle_s: list[float]
    peak_in_flight: list[int]
    peak_memory_bytes: list[float]
    ops: list[tuple[int, int, int, bool, float, float]]


def simulate(config: PipelineConfig, forward_s: Sequence[float], backward_s: Sequence[float],
             activation_bytes: Sequence[float] | None = None,
             static_bytes: Sequence[float] | None = None) -> SimResult:
    """Simulates one step. Inputs are per stage: forward and backward seconds per micro-batch,
    activation bytes kept per in-flight micro-batch, static bytes (parameters, gradients, optimizer)."""
    n = config.num_stages
    activation_bytes = [0.0] * n if activation_bytes is None else activation_bytes
    static_bytes = [0.0] * n if static_bytes is None else static_bytes
    check_stage_times(config, forward_s, backward_s, activation_bytes, static_bytes)
    compiled = _compiled(config.schedule, config.pp, config.virtual_stages, config.micro_batches)
    start, end = _run(config, forward_s, backward_s)
    step = max(end)
    m = config.micro_batches
    busy = [0.0] * config.pp
    for stage in range(n):
        busy[config.rank_of(stage)] += m * (forward_s[stage] + backward_s[stage])
    idle = [step - b for b in busy]

    peak_memory = []
    for rank, program in enumerate(rank_programs(config.schedule, config.pp, config.virtual_stages, m)):
        live = peak = 0.0
        for stage, _, backward in program:
            if not backward:
                live += activation_bytes[stage]
                peak = max(peak, live)
            else:
                live -= activation_bytes[stage]
        stages = range(rank, n, config.pp)
        peak_memory.append(sum(static_bytes[s] for s in stages) + peak)

    total_busy = sum(busy)
    return SimResult(
        config=config, step_s=step,
        bubble_fraction=sum(idle) / total_busy if total_busy > 0 else 0.0,
        busy_s=busy, idle_s=idle,
        peak_in_flight=list(peak_in_flight(config.schedule, config.pp, config.virtual_stages, m)),
        peak_memory_bytes=peak_memory,
        ops=[(r, s, mb, b, t0, t1) for (r, s, mb, b, _, _), t0, t1 in zip(compiled, start, end)],
    )


def save_gantt(result: SimResult, path: str, title: str = "") -> None:
    """Writes a Gantt chart PNG of ``result``: one row per rank, forwards light, backwards dark, one
    colour per model chunk, micro-batch numbers on the bars where they fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result.config
    fig, ax = plt.subplots(figsize=(12, 0.6 * cfg.pp + 1.5))
    colours = plt.get_cmap("tab10")
    for rank, stage, mb, backward, t0, t1 in result.ops:
        chunk = stage // cfg.pp
        ax.barh(cfg.pp - 1 - rank, t1 - t0, left=t0, height=0.8, color=colours(chunk % 10),
                alpha=1.0 if backward else 0.45, edgecolor="black", linewidth=0.3)
        if t1 - t0 > result.step_s / 80:
            ax.text((t0 + t1) / 2, cfg.pp - 1 - rank, str(mb), ha="center", va="center", fontsize=6)
    ax.set_yticks(range(cfg.pp), [f"rank {r}" for r in reversed(range(cfg.pp))])
    ax.set_xlabel("seconds")
    ax.set_title(title or f"{cfg.schedule}, pp={cfg.pp}, v={cfg.virtual_stages}, m={cfg.micro_batches}: "
                          f"step {result.step_s:.4g} s, bubble {result.bubble_fraction:.1%}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
