"""omnibal-balance end to end: real files in, JSON report and plot out; bad keys fail clearly."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REAL_LENGTH_FILES

REPORT_KEYS = {"algorithm", "samples", "samples_grouped", "samples_lost", "groups", "avg_group_size", "vit_cap",
               "token_cap", "vit_dist_ratio", "llm_dist_ratio", "pad_ratio", "vit_fill", "token_fill",
               "seconds_grouping", "seconds_search", "per_source"}


def run_cli(*args: str, cwd: Path, multirun: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "omnibal_pl.cli.balance", *(["-m"] if multirun else []),
           f"hydra.run.dir={cwd}/run", f"hydra.sweep.dir={cwd}/sweep", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.skipif(len(REAL_LENGTH_FILES) != 4, reason="real statistics not beside the checkout")
def test_cli_on_real_files_writes_report_and_plot(tmp_path):
    report, plot = tmp_path / "r.json", tmp_path / "p.png"
    paths = ",".join(str(p) for p in REAL_LENGTH_FILES)
    out = run_cli(f"dataset.paths=[{paths}]", "balance.dp=8", f"report={report}", f"plot={plot}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.loads(report.read_text())
    assert REPORT_KEYS <= data.keys()
    assert data["algorithm"] == "balanced" and data["samples"] == 70706 and data["samples_lost"] == 0
    assert data["samples_grouped"] == 70706
    assert data["vit_dist_ratio"] <= 0.005 and data["llm_dist_ratio"] <= 0.005
    assert min(data["vit_fill"], data["token_fill"]) >= 0.95
    assert set(data["per_source"]) == {p.stem for p in REAL_LENGTH_FILES}
    assert sum(s["samples"] for s in data["per_source"].values()) == 70706
    assert plot.stat().st_size > 10_000
    assert "llm dist ratio" in out.stdout and (tmp_path / "run" / "balance_report.json").is_file()


def test_cli_isf_with_fixed_caps_on_embedded_default(tmp_path):
    report = tmp_path / "isf.json"
    out = run_cli("balance=isf", "balance.vit_cap=9", "balance.token_cap=4096", f"report={report}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.loads(report.read_text())
    assert (data["vit_cap"], data["token_cap"], data["seconds_search"]) == (9, 4096, 0.0)
    assert data["step_order"] == "megatron" and data["samples_lost"] == 0
    assert data["llm_dist_ratio"] > 0.2  # the published defaults are badly balanced


def test_cli_sweep_over_algorithms(tmp_path):
    out = run_cli("balance.algorithm=random,length_grouped", "balance.samples_per_group=4", cwd=tmp_path,
                  multirun=True)
    assert out.returncode == 0, out.stderr
    reports = sorted((tmp_path / "sweep").glob("*/balance_report.json"))
    assert [json.loads(r.read_text())["algorithm"] for r in reports] == ["random", "length_grouped"]


@pytest.mark.parametrize("arg, message", [
    ("balance.algoritm=isf", "algoritm"),
    ("balance.dp=zero", "balance.dp"),
    ("balance.algorithm=magic", "choose one of balanced, isf"),
    ("dataset.paths=[/nowhere/x.json]", "matches no file"),
])
def test_cli_bad_input_fails_with_a_clear_message(tmp_path, arg, message):
    out = run_cli(arg, cwd=tmp_path)
    assert out.returncode != 0
    assert message in out.stderr + out.stdout


def test_cli_baselines_report_modelled_time(tmp_path):
    model = tmp_path / "time_model.json"
    model.write_text('{"terms": ["tiles", "tokens", "tokens_sq", "samples"], "coefficients": [1e-3, 2e-6, 1e-9, 5e-3]}')
    out = run_cli("balance.algorithm=balanced,disttrain,llamafactory", f"balance.time_model={model}", cwd=tmp_path,
                  multirun=True)
    assert out.returncode == 0, out.stderr
    reports = {r["algorithm"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/balance_report.json"))}
    assert set(reports) == {"balanced", "disttrain", "llamafactory"}
    assert all(r["samples_lost"] == 0 and r["max_mean_time"] >= 1.0 for r in reports.values())
    assert reports["llamafactory"]["token_cap"] == reports["balanced"]["token_cap"]  # same token budget
    assert reports["balanced"]["time_dist_ratio"] < reports["llamafactory"]["time_dist_ratio"]
    assert "max/mean time per step" in out.stdout
