"""bench_train's per-step timing: each rank keeps its fastest run, and the runs go round the ranks."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


def load_bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Step:
    """Stands in for a rank's micro-batch: ``to`` returns itself, as a batch already on the device does."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def to(self, device) -> "Step":
        return self


class Modelled:
    """A micro-batch whose only feature is its modelled seconds."""

    def __init__(self, seconds: float, samples: int) -> None:
        self.seconds, self.num_samples = seconds, samples


def test_time_ranks_keeps_each_ranks_fastest_run_and_goes_round_the_ranks(monkeypatch):
    bench = load_bench_train()
    order: list[int] = []
    scripted = iter([3.0, 5.0, 1.0, 2.0, 4.0, 6.0])  # rep 0: ranks 0, 1, 2; rep 1: ranks 0, 1, 2

    def fake_time(model, batch, device, reps):
        assert reps == 1
        order.append(batch.rank)
        return next(scripted)

    monkeypatch.setattr(bench, "time_micro_batch", fake_time)
    runs = bench.time_ranks(None, [Step(0), Step(1), Step(2)], torch.device("cpu"), reps=2)
    assert order == [0, 1, 2, 0, 1, 2]
    assert runs == [[3.0, 2.0], [5.0, 4.0], [1.0, 6.0]]
    one_each = [[r] for r in runs]  # one micro-batch per rank
    assert bench.fastest(one_each, 2) == [2.0, 4.0, 1.0] and bench.fastest(one_each, 1) == [3.0, 5.0, 1.0]


def test_a_ranks_time_in_a_step_sums_the_fastest_runs_of_its_micro_batches(monkeypatch):
    """Two ranks of two micro-batches each (ids 0, 1 and 2, 3), two runs: the runs go round all four micro-batches
    of the step, each rank's come back in its order, and a rank's time is the sum over its micro-batches of each
    one's fastest run: 1 + 2 and 3 + 0.5 (its slowest micro-batch alone would give 2 and 3, every run's sum 6 and 9,
    the fastest of the rank's runs 1 and 0.5)."""
    bench = load_bench_train()
    order: list[int] = []
    scripted = iter([1.0, 2.0, 3.0, 4.0, 5.0, 3.0, 6.0, 0.5])

    def fake_time(model, batch, device, reps):
        order.append(batch.rank)
        return next(scripted)

    monkeypatch.setattr(bench, "time_micro_batch", fake_time)
    runs = bench.time_step(None, [[Step(0), Step(1)], [Step(2), Step(3)]], torch.device("cpu"), reps=2)
    assert order == [0, 1, 2, 3, 0, 1, 2, 3]
    assert runs == [[[1.0, 5.0], [2.0, 3.0]], [[3.0, 6.0], [4.0, 0.5]]]
    assert bench.fastest(runs, 2) == [3.0, 3.5] and bench.fastest(runs, 1) == [3.0, 7.0]


def test_idle_by_runs_keeps_each_ranks_fastest_of_its_first_k_runs():
    """Two steps of two ranks, two runs each. Fastest of 1: ranks 4, 2 and 3, 3: mean ranks 3 + 3, slowest 4 + 3,
    idle 1/7. Fastest of 2: 2, 2 and 3, 1: mean ranks 2 + 2, slowest 2 + 3, idle 1/5 (every run's minimum for every
    k would give 1/5 twice)."""
    bench = load_bench_train()
    steps = [[[[4.0, 2.0]], [[2.0, 2.0]]], [[[3.0, 3.0]], [[3.0, 1.0]]]]  # [step][rank][micro-batch][run]
    idles = bench.idle_by_runs(steps, 2)
    assert abs(idles[0] - 1 / 7) < 1e-12 and abs(idles[1] - 1 / 5) < 1e-12


def test_modelled_idle_and_rates_are_means_over_slowest_summed_over_steps(monkeypatch):
    """Modelled times 4, 2 (step 1) and 3, 3 (step 2), 10 samples: mean ranks 3 + 3 = 6, slowest 4 + 3 = 7, idle
    1/7 (the mean of per-step idles would be 1/8; a sum instead of the mean rank, 1 - 12/7 < 0); samples/s 10/7, at
    no idle 10/6. The same times split into two micro-batches per rank (a rank's time their sum) give the same
    figures; a rank priced by its dearest micro-batch would not."""
    from omnibal_pl.balance import TimeModel

    bench = load_bench_train()
    monkeypatch.setattr(bench, "batch_features", lambda batch: [batch.seconds, 0.0, 0.0, 0.0])
    model = TimeModel([1.0, 0.0, 0.0, 0.0])
    steps = [[[Modelled(4.0, 3)], [Modelled(2.0, 1)]], [[Modelled(3.0, 2)], [Modelled(3.0, 4)]]]
    idle, rate, no_idle = bench.modelled(model, steps)
    assert abs(idle - 1 / 7) < 1e-12 and abs(rate - 10 / 7) < 1e-12 and abs(no_idle - 10 / 6) < 1e-12
    split = [[[Modelled(1.0, 1), Modelled(3.0, 2)], [Modelled(1.0, 0), Modelled(1.0, 1)]],
             [[Modelled(2.0, 1), Modelled(1.0, 1)], [Modelled(1.5, 2), Modelled(1.5, 2)]]]
    assert bench.modelled(model, split) == pytest.approx((1 / 7, 10 / 7, 10 / 6), abs=1e-12)


def test_micro_batches_per_rank_give_disttrain_something_to_deal():
    """The tiny model's 256 samples at DP 4. With 4 micro-batches per rank and step every rank's step holds 4, and
    DistTrain's LPT deal evens the ranks' tokens (mean over steps of max / mean rank tokens <= 1.06; random's
    arrangement of the same samples 1.15 here). With one micro-batch per rank its deal can only hand each rank one
    of the step's micro-batches: the same tokens per rank as random's. Steps left at one micro-batch per rank while
    the sampler forms them for 4 would break the first part."""
    import argparse

    bench = load_bench_train()
    cfg = bench.load_model_config("tiny")

    def token_ratio(steps) -> float:
        per_rank = [[sum(b.num_tokens for b in work) for work in step] for step in steps]
        return sum(max(t) / (sum(t) / len(t)) for t in per_rank) / len(per_rank)

    def steps_of(algorithm: str, micro_batches: int):
        args = argparse.Namespace(dp=4, micro_batches=micro_batches, steps=0, samples=256, samples_per_group=2,
                                  text_scale=0.25)
        return bench.sampler_steps(algorithm, cfg, args, None)

    dealt, drawn = steps_of("disttrain", 4), steps_of("random", 4)
    assert {len(work) for step in dealt + drawn for work in step} == {4}
    assert sum(b.num_samples for step in dealt for work in step for b in work) == 256
    assert token_ratio(dealt) <= 1.06 and token_ratio(drawn) >= 1.10
    assert token_ratio(steps_of("disttrain", 1)) == pytest.approx(token_ratio(steps_of("random", 1)))


def test_timing_order_interleaves_the_samplers_step_by_step():
    """Every sampler's every step once per repeat; step i of all samplers before step i + 1 of any (one sampler's
    steps back to back would let a slow spell fall on it alone); the first sampler rotates with the repeat."""
    bench = load_bench_train()
    steps = {"balanced": 2, "random": 3, "identical": 2}
    assert bench.timing_order(steps, 0) == [("balanced", 0), ("random", 0), ("identical", 0),
                                            ("balanced", 1), ("random", 1), ("identical", 1), ("random", 2)]
    assert bench.timing_order(steps, 1)[:3] == [("random", 0), ("identical", 0), ("balanced", 0)]
    assert sorted(bench.timing_order(steps, 2)) == sorted((a, i) for a, n in steps.items() for i in range(n))


def test_a_time_model_of_another_setting_is_refused_before_any_timing(tmp_path):
    from omnibal_pl.balance import TimeModel

    setting = {"model": "tiny", "model_config": "0", "device": "cpu", "precision": "bf16-mixed", "attention": "sdpa",
               "pad_to": "multiple"}
    TimeModel([0.2, 3e-3, 5e-6, 0.1], 0.01, 24, 0.03, setting).save(tmp_path / "tm.json")
    done = subprocess.run([sys.executable, str(SCRIPT), "--models", "tiny", "--samples", "64", "--algorithms", "random",
                           "--time-model", str(tmp_path / "tm.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "time model loaded" not in done.stdout
    assert "measured in another setting than this run's (model_config: model '0'" in done.stderr


def test_calibration_is_timed_with_its_own_runs_per_micro_batch(monkeypatch):
    """``--calibration-reps`` sets the runs per calibration micro-batch (the samplers keep ``--reps``); unset, the
    calibration takes ``--reps``. The fit sees the scripted times: 0.3 s per tile, 0.2 s per sample."""
    import argparse

    bench = load_bench_train()
    grid = [(tiles, samples) for tiles in range(1, 7) for samples in range(1, 4)]
    batches = [Modelled(0.0, samples) for _, samples in grid]
    for batch, (tiles, _) in zip(batches, grid):
        batch.tiles = tiles
    reps_seen: list[int] = []

    def fake_time(model, batch, device, reps):
        reps_seen.append(reps)
        return 0.3 * batch.tiles + 0.2 * batch.num_samples

    monkeypatch.setattr(bench, "calibration_batches", lambda cfg, args, design, count: batches)
    monkeypatch.setattr(bench, "batch_features", lambda b: [b.tiles, 0.0, 0.0, b.num_samples])
    monkeypatch.setattr(bench, "bench_setting", lambda cfg, device: {"device": "cpu"})
    monkeypatch.setattr(bench, "time_micro_batch", fake_time)
    args = argparse.Namespace(calibration=len(batches), reps=2, calibration_reps=5)
    fitted = bench.fit_on_calibration(None, None, args, torch.device("cpu"), "d_optimal", None)
    assert reps_seen == [5] * len(batches)
    assert abs(fitted.coefficients[0] - 0.3) < 1e-6 and abs(fitted.coefficients[3] - 0.2) < 1e-6
    reps_seen.clear()
    bench.fit_on_calibration(None, None, argparse.Namespace(calibration=len(batches), reps=2, calibration_reps=None),
                             torch.device("cpu"), "d_optimal", None)
    assert reps_seen == [2] * len(batches)


def test_refit_on_the_samplers_runs_shows_which_sampler_the_terms_misprice():
    """Sampler ``a``'s micro-batches cost 0.3 s per tile + 0.2 s per sample, ``b``'s the same plus 25% the terms do
    not see. Fitted on both, the model sits between: it over-prices ``a`` (positive bias) and under-prices ``b``
    (negative). A sign reversed, a fit on one sampler's runs only, or an absolute error would each break this."""
    bench = load_bench_train()
    plain = [([float(t), 0.0, 0.0, float(n)], 0.3 * t + 0.2 * n) for t in range(1, 7) for n in range(1, 4)]
    measured = {"a": [[[row]] for row in plain], "b": [[[(f, 1.25 * s)]] for f, s in plain]}
    under = bench.refit_on_runs(measured, {"device": "cpu"})
    assert 0.05 < under["a"].bias < 0.2 and -0.2 < under["b"].bias < -0.05
    assert bench.refit_on_runs({"a": [[[row]] for row in plain]}, {})["a"].bias == pytest.approx(0.0, abs=1e-9)


def test_refit_prices_each_samplers_steps_idle_from_its_predictions():
    """Sampler ``a``: steps of two ranks whose costs differ by their terms (exactly 0.3 s per tile + 0.2 s per
    sample), so the exact refit's idle is 1 - sum of step means / sum of step maxima of those costs. Sampler ``b``:
    every rank of a step the same micro-batch, one rank measured 30% slower (noise no term sees), so the refit prices
    its steps at no idle although they measure 13% idle. Sampler ``c``: ``a``'s steps with rank 1's micro-batch
    split in two (same terms in all), so a rank priced as the sum of its micro-batches gives ``a``'s idle. An idle
    taken from the measured seconds, a step's sum or mean where its slowest rank belongs, or a rank priced by one
    of its micro-batches breaks one of the three."""
    bench = load_bench_train()
    cost = [([float(t), 0.0, 0.0, float(n)], 0.3 * t + 0.2 * n) for t in range(1, 7) for n in range(1, 4)]
    steps_a = [[[cost[i]], [cost[-1 - i]]] for i in range(len(cost) // 2)]
    steps_b = [[[(f, s)], [(f, 1.3 * s)]] for f, s in cost]
    steps_c = [[x, [([v / 2 for v in y[0][0]], y[0][1] / 2)] * 2] for x, y in steps_a]
    under = bench.refit_on_runs({"a": steps_a}, {"device": "cpu"})
    expected = 1 - sum((x[0][1] + y[0][1]) / 2 for x, y in steps_a) / sum(max(x[0][1], y[0][1]) for x, y in steps_a)
    assert expected > 0.2 and under["a"].idle == pytest.approx(expected, abs=1e-9)
    assert bench.refit_on_runs({"a": steps_a, "b": steps_b}, {"device": "cpu"})["b"].idle == pytest.approx(0.0, abs=1e-9)
    assert bench.refit_on_runs({"a": steps_a, "c": steps_c}, {"device": "cpu"})["c"].idle == pytest.approx(expected,
                                                                                                           abs=1e-9)


def test_save_timings_writes_every_timed_run(tmp_path):
    """One step of ``random`` at DP 2 with 2 micro-batches per rank, 2 runs per micro-batch: four rows, one per rank
    and micro-batch, each with the model's four features and both runs' seconds."""
    out = tmp_path / "timings.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--models", "tiny", "--samples", "64", "--algorithms", "random",
                           "--dp", "2", "--micro-batches", "2", "--steps", "1", "--repeats", "1", "--reps", "2", "--calibration", "0",
                           "--threads", "1", "--save-timings", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    saved = json.loads(out.read_text())
    assert saved["terms"] == ["tiles", "tokens", "tokens_sq", "samples"]
    assert [(r["sampler"], r["step"], r["rank"], r["micro_batch"]) for r in saved["runs"]] == [
        ("random", 0, 0, 0), ("random", 0, 0, 1), ("random", 0, 1, 0), ("random", 0, 1, 1)]
    assert all(len(r["features"]) == 4 and r["features"][3] == 2 and len(r["seconds"]) == 2 and min(r["seconds"]) > 0
               for r in saved["runs"])


def test_refit_timings_groups_saved_runs_by_sampler_and_step():
    """A saved file's rows, out of order and over two repeats, come back as each sampler's steps (repeat, step
    order), ranks in order, each rank's micro-batches in order, each one's fastest run: what ``refit_on_runs`` needs
    to price the steps' idle. A row without a micro-batch (a file written before ``--micro-batches``) is the rank's
    only one."""
    bench = load_bench_train()

    def row(algo: str, repeat: int, step: int, rank: int, seconds: list[float], micro_batch: int = 0) -> dict:
        return {"sampler": algo, "repeat": repeat, "step": step, "rank": rank, "micro_batch": micro_batch,
                "features": [float(rank), float(micro_batch), 0.0, 1.0], "seconds": seconds}

    older = row("a", 1, 0, 0, [4.0])
    del older["micro_batch"]
    saved = {"model": "tiny", "runs": [row("b", 0, 0, 1, [2.0, 1.5]), older, row("b", 0, 0, 0, [3.0], 1),
                                       row("a", 0, 0, 1, [1.0, 0.5]), row("a", 0, 0, 0, [0.7]),
                                       row("b", 0, 0, 0, [2.5])]}
    measured = bench.measured_from_timings(saved)
    assert measured == {"b": [[[([0.0, 0.0, 0.0, 1.0], 2.5), ([0.0, 1.0, 0.0, 1.0], 3.0)],
                               [([1.0, 0.0, 0.0, 1.0], 1.5)]]],
                        "a": [[[([0.0, 0.0, 0.0, 1.0], 0.7)], [([1.0, 0.0, 0.0, 1.0], 0.5)]],
                              [[([0.0, 0.0, 0.0, 1.0], 4.0)]]]}


FAULTS_OF_A_REUSED_ALLOCATION = """
import ctypes, ctypes.util, resource, sys
sys.path.insert(0, sys.argv[1])
import bench_train
if sys.argv[2] == "heap":
    bench_train.keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def faults_of_filled_block(size):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(block)
    return faults
faults_of_filled_block(64 << 20)
print(faults_of_filled_block(48 << 20))
"""


def test_heap_allocator_reuses_freed_memory_where_glibc_faults_it_in_again():
    """64 MiB malloc'd, filled and freed, then 48 MiB (above glibc's largest mmap threshold, 32 MiB): under glibc's
    default the 48 MiB are mapped afresh and their 12,288 pages fault in; with ``keep_freed_memory`` they come out of
    the freed 64 MiB, already resident. Dropping either mallopt brings the faults back: without the no-mmap one the
    block is mapped, without the no-trim one the freed block (the heap's top) is trimmed back to the OS."""
    faults = {}
    for allocator in ("system", "heap"):
        done = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REUSED_ALLOCATION, str(SCRIPT.parent), allocator],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        faults[allocator] = int(done.stdout.split()[-1])
    assert faults["system"] > 10000 and faults["heap"] < 1000, faults
