"""Pipeline simulator and schedules against the closed forms (Narayanan et al., SC'21)."""
from __future__ import annotations

import pytest

from omnibal_pl.errors import ConfigError
from omnibal_pl.plan.schedule import PipelineConfig, peak_in_flight, rank_programs
from omnibal_pl.plan.simulator import save_gantt, simulate, step_time


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(1, 1), (1, 5), (2, 1), (2, 4), (4, 8), (4, 3), (8, 16), (3, 7)])
def test_equal_stages_match_closed_form(schedule: str, p: int, m: int) -> None:
    tf, tb = 0.7, 1.9
    result = simulate(PipelineConfig(pp=p, micro_batches=m, schedule=schedule), [tf] * p, [tb] * p)
    assert result.step_s == pytest.approx((m + p - 1) * (tf + tb))
    assert result.bubble_fraction == pytest.approx((p - 1) / m)
    assert result.busy_s == pytest.approx([m * (tf + tb)] * p)
    assert result.idle_s == pytest.approx([(p - 1) * (tf + tb)] * p)


@pytest.mark.parametrize("p,v,m", [(2, 2, 4), (4, 2, 8), (4, 3, 8), (3, 2, 6), (4, 2, 4), (2, 4, 8)])
def test_interleaved_matches_closed_form(p: int, v: int, m: int) -> None:
    """A rank's work (tf, tb) split into v equal chunks: step m (tf + tb) + (p - 1)(tf + tb) / v,
    bubble (p - 1) / (v m)."""
    tf, tb = 1.0, 2.0
    cfg = PipelineConfig(pp=p, micro_batches=m, schedule="interleaved", virtual_stages=v)
    result = simulate(cfg, [tf / v] * (p * v), [tb / v] * (p * v))
    assert result.step_s == pytest.approx(m * (tf + tb) + (p - 1) * (tf + tb) / v)
    assert result.bubble_fraction == pytest.approx((p - 1) / (v * m))


def test_hops_add_two_per_boundary_on_the_critical_path() -> None:
    p, m, tf, tb, hop = 4, 8, 1.0, 2.0, 0.1
    closed = (m + p - 1) * (tf + tb) + 2 * (p - 1) * hop  # fill and drain cross p - 1 boundaries each way
    assert step_time(PipelineConfig(pp=p, micro_batches=m, schedule="gpipe", hop_s=hop), [tf] * p, [tb] * p) == \
        pytest.approx(closed)
    # 1F1B also waits for round trips in its steady state: never less than the fill/drain path
    assert step_time(PipelineConfig(pp=p, micro_batches=m, hop_s=hop), [tf] * p, [tb] * p) >= closed - 1e-9


def test_unequal_stages_bottleneck_dominates() -> None:
    """The longest path: micro-batch 0 reaches the slowest stage, which runs all m micro-batches, then
    the last gradient flows back; the stage after it overlaps. REFERENCE's approximate form
    sum T + (m - 1) max T is an upper bound here."""
    p, m = 4, 8
    forward, backward = [1.0, 1.0, 3.0, 1.0], [2.0, 2.0, 6.0, 2.0]
    step = step_time(PipelineConfig(pp=p, micro_batches=m), forward, backward)
    times = [f + b for f, b in zip(forward, backward)]
    assert step == pytest.approx(sum(forward[:2]) + m * times[2] + sum(backward[:2]))
    assert step <= sum(times) + (m - 1) * max(times)


@pytest.mark.parametrize("p,m", [(4, 8), (4, 2), (8, 3), (1, 4), (5, 5)])
def test_1f1b_in_flight_is_min_p_minus_i_m(p: int, m: int) -> None:
    assert peak_in_flight("1f1b", p, 1, m) == tuple(min(p - i, m) for i in range(p))
    assert peak_in_flight("gpipe", p, 1, m) == (m,) * p


@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2)])
def test_programs_run_every_op_once(schedule: str, v: int) -> None:
    p, m = 4, 8
    for rank, program in enumerate(rank_programs(schedule, p, v, m)):
        expected = {(c * p + rank, mb, back) for c in range(v) for mb in range(m) for back in (False, True)}
        assert len(program) == len(expected) and set(program) == expected


def test_peak_memory_counts_in_flight_activations() -> None:
    p, m = 4, 8
    act, static = [10.0, 20.0, 30.0, 40.0], [1.0, 2.0, 3.0, 4.0]
    result = simulate(PipelineConfig(pp=p, micro_batches=m), [1.0] * p, [2.0] * p, act, static)
    assert result.peak_memory_bytes == pytest.approx([s + min(p - i, m) * a for i, (a, s) in enumerate(zip(act, static))])
    gpipe = simulate(PipelineConfig(pp=p, micro_batches=m, schedule="gpipe"), [1.0] * p, [2.0] * p, act, static)
    assert gpipe.peak_memory_bytes == pytest.approx([s + m * a for a, s in zip(act, static)])


def test_bad_pipeline_configs() -> None:
    with pytest.raises(ConfigError, match="schedule"):
        PipelineConfig(pp=2, micro_batches=4, schedule="zero_bubble")
    with pytest.raises(ConfigError, match="multiple of pp"):
        PipelineConfig(pp=4, micro_batches=6, schedule="interleaved", virtual_stages=2)
    with pytest.raises(ConfigError, match="per-stage values"):
        simulate(PipelineConfig(pp=2, micro_batches=4), [1.0], [1.0])


def test_gantt_png(tmp_path) -> None:
    result = simulate(PipelineConfig(pp=2, micro_batches=4), [1.0, 1.5], [2.0, 3.0])
    path = tmp_path / "gantt.png"
    save_gantt(result, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_hops_are_charged_only_between_ranks(schedule: str) -> None:
    """pp = 2, m = 1: F0 [0, 1], hop, F1 [1.1, 2.1], B1 on the same rank [2.1, 4.1], hop, B0 [4.2, 6.2]."""
    config = PipelineConfig(pp=2, micro_batches=1, schedule=schedule, hop_s=0.1)
    assert step_time(config, [1.0, 1.0], [2.0, 2.0]) == pytest.approx(6.2)
    for m in (1, 4):  # one rank: no input ever crosses ranks
        one_rank = PipelineConfig(pp=1, micro_batches=m, schedule=schedule, hop_s=0.1)
        assert step_time(one_rank, [1.0], [2.0]) == pytest.approx(m * 3.0)
