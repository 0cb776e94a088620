"""A non-editable install ships the config tree: the CLIs run from any directory, and reject unknown keys."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_wheel_install_runs_the_clis_from_another_directory(tmp_path):
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)], check=True,
                   timeout=600)
    wheel = next(wheels.glob("omnibal_pl-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True, timeout=120)
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)

    where = run(sys.executable, "-c", "import omnibal_pl.conf as c; print(c.CONF_DIR)")
    assert where.stdout.strip() == str(site / "omnibal_pl" / "conf")  # the installed copy, not the checkout
    balance = run(site / "bin" / "omnibal-balance", "dataset.generator.samples=2000", "hydra.run.dir=balance")
    assert balance.returncode == 0, balance.stderr[-2000:]
    assert (elsewhere / "balance" / "balance_report.json").is_file()
    train = run(site / "bin" / "omnibal-train", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
                "dataset.generator.samples=600", "run_dir=train")
    assert train.returncode == 0, train.stderr[-2000:]
    assert (elsewhere / "train" / "summary.json").is_file()
    unknown = run(site / "bin" / "omnibal-train", "+foo=1", "run_dir=unknown")
    assert unknown.returncode == 2 and "unknown top-level keys ['foo']" in unknown.stderr
