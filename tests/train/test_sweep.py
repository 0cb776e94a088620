"""Sweeps that optimise: omnibal-train's task returns the last validation loss (else the final training loss), so
the Optuna sweeper (experiment=optuna_lr) finds the best of its trials."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.helpers import FAST


@pytest.mark.slow  # two trials in a subprocess: ~40 s on a loaded machine
def test_two_optuna_trials_return_their_validation_loss_and_the_best_is_reported(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    out = subprocess.run([sys.executable, "-m", "omnibal_pl.cli.train", "-m", "experiment=optuna_lr",
                          "hydra.sweeper.n_trials=2", "trainer.max_steps=4", "trainer.val_check_interval=2", *FAST,
                          f"hydra.sweep.dir={tmp_path}"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/summary.json"))]
    assert len(summaries) == 2
    for s in summaries:  # the objective is the last validation loss, not the training loss
        assert s["objective"] == s["val_loss"] and s["val_loss"] != s["loss_end"]
    result = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(min(s["objective"] for s in summaries), rel=1e-12)
    lrs = [yaml.safe_load((tmp_path / str(k) / ".hydra" / "overrides.yaml").read_text()) for k in range(2)]
    assert all(any(o.startswith("optim.lr=") for o in trial) for trial in lrs)  # Optuna chose each trial's rate
