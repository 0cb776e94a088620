"""bench_packing runs end to end: the table's rows, the same samples packed and padded."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_packing.py"


def test_packing_study_prints_a_row_per_tile_count_with_padding_longer_than_packing():
    """Rows for 1 tile and the mixed draw, at DP 2: each has positive ms per sample both ways, and the padded
    micro-batch (every sample padded to the longest) holds more tokens than the packed one. A step's rank times
    taken as lists of runs instead of each micro-batch's fastest run fails the run before any row prints."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiles", "1", "--steps", "1", "--reps", "1", "--dp", "2",
                           "--budget", "512", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["tiles", "img"])
    rows = {line.split()[0]: line.split() for line in lines[header + 1:header + 3]}
    assert set(rows) == {"1", "mixed"}, done.stdout
    for cells in rows.values():
        samples, on_tokens, off_tokens = int(cells[2]), int(cells[3]), int(cells[4])
        times = [float(c) for c in cells[5:]]
        assert samples >= 2 and off_tokens > on_tokens and all(t > 0 for t in times), cells
