"""bench_split's measure: the same samples as one micro-batch against two, each timed by its fastest run."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_bench_split():
    sys.path.insert(0, str(SCRIPTS))  # bench_split imports bench_train from its folder
    try:
        import bench_split
    finally:
        sys.path.remove(str(SCRIPTS))
    return bench_split


def test_merged_over_parts_is_the_merged_fastest_run_over_the_parts_fastest_sum():
    """A's runs 2.0, 1.0; B's 3.0, 2.0; A + B's 4.0, 3.6: 3.6 / (1 + 2) = 1.2. Means of runs would give 3.8 / 4
    = 0.95, the slowest runs 4 / 5 = 0.8, the ratio inverted 0.83: each a bug this catches."""
    bench = load_bench_split()
    assert bench.merged_over_parts([[2.0, 1.0], [3.0, 2.0], [4.0, 3.6]]) == pytest.approx(1.2)


def test_pair_ids_are_disjoint_halves_of_the_asked_size():
    bench = load_bench_split()
    pairs = bench.pair_ids(10, 3, 5, seed=1)
    assert len(pairs) == 5
    for a, b in pairs:
        assert len(a) == len(b) == 3 and not set(a) & set(b) and all(0 <= i < 10 for i in a + b)
    assert pairs != bench.pair_ids(10, 3, 5, seed=2)  # the seed draws, not a fixed pattern


def test_bench_split_runs_end_to_end_on_the_tiny_model():
    """Halves of 2 on ``tiny``: a row per pair with a positive ratio, and the summary's minimum is the smallest
    printed."""
    done = subprocess.run([sys.executable, str(SCRIPTS / "bench_split.py"), "--model", "tiny", "--halves", "2",
                           "--pairs", "2", "--reps", "1", "--threads", "1", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("    2")]
    assert len(rows) == 2 and all(float(r[-1]) > 0 for r in rows)
    summary = next(line for line in done.stdout.splitlines() if line.startswith("halves of 2"))
    assert f"{sorted(float(r[-1]) for r in rows)[0]:.3f}" in summary
