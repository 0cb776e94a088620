"""Bounded failure (omnibal_pl/train/faults.py): a killed or hung rank, and a SIGTERM to a hung run, end every
process of a real 2-process job (gloo) within a bound, naming the rank and the step; non-finite steps are skipped
on every rank alike, counted, and stop the run after ``faults.max_nonfinite_steps`` in a row."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from omnibal_pl.cli.train import train
from omnibal_pl.train.faults import EXIT_SIGTERM, FaultWatch, NonFiniteLossError, NonFiniteSteps

from tests.helpers import FAST, cfg_of, losses_in

DDP = ["cluster.devices=2", "cluster.strategy=ddp"]
PP2 = ["cluster=cpu_pp2", "plan.use=uniform"]


def fail_at(rank: int, step: int, marker: Path, how: str) -> str:
    return (f"trainer.callbacks=[{{_target_:tests.helpers.FailAtStep,rank:{rank},step:{step},"
            f"marker:'{marker}',how:{how}}}]")


def run_job(run_dir: Path, *overrides: str, signal_after_failure: int | None = None,
            limit_s: float = 110) -> tuple[int, str, float]:
    """``omnibal-train`` in its own session; returns (exit status of rank 0, its stderr, seconds from the
    failure written to ``run_dir/failed`` until no process of the session is left). ``signal_after_failure``:
    sent to the whole session 2 s after the failure."""
    run_dir.mkdir(parents=True, exist_ok=True)
    err = open(run_dir / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "omnibal_pl.cli.train", *FAST, *overrides, f"run_dir={run_dir}",
                             "trainer.max_steps=1000"], stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    marker, deadline, sent = run_dir / "failed", time.time() + limit_s, False
    try:
        while time.time() < deadline:
            proc.poll()
            if signal_after_failure and not sent and marker.exists() and time.time() > float(marker.read_text()) + 2:
                os.killpg(proc.pid, signal_after_failure)
                sent = True
            if proc.returncode is not None and not _alive(proc.pid):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the job still runs {limit_s} s after start: {(run_dir / 'stderr.txt').read_text()[-3000:]}")
    finally:
        if _alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        err.close()
    return proc.returncode, (run_dir / "stderr.txt").read_text(), time.time() - float(marker.read_text())


def _alive(session: int) -> bool:
    """Whether any process of the session (process group) ``session`` is left (zombies aside: none are ours)."""
    try:
        os.killpg(session, 0)
    except ProcessLookupError:
        return False
    out = subprocess.run(["ps", "-o", "stat=", "-g", str(session)], capture_output=True, text=True).stdout.split()
    return any(not s.startswith("Z") for s in out)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.parametrize("cluster", [DDP, PP2], ids=["ddp", "cpu_pp2"])
def test_a_killed_rank_ends_the_job_naming_rank_and_step(tmp_path, cluster):
    status, stderr, seconds = run_job(tmp_path, *cluster, fail_at(1, 2, tmp_path / "failed", "kill"))
    assert status != 0 and seconds < 60
    assert "global rank 0 of 2 failed at step 2" in stderr, stderr[-3000:]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_a_hung_rank_ends_the_job(tmp_path):
    """Rank 1 stops making progress outside any collective: rank 0's next collective times out
    (faults.collective_timeout_s) and rank 1's watchdog ends it (faults.step_timeout_s)."""
    status, stderr, seconds = run_job(tmp_path, *DDP, fail_at(1, 2, tmp_path / "failed", "hang"),
                                      "faults.collective_timeout_s=20", "faults.step_timeout_s=40")
    assert status != 0 and seconds < 60
    failure = next((line for line in stderr.splitlines() if "global rank 0 of 2 failed at step 2" in line), "")
    cause = failure.split("If a collective failed")[0].lower()  # gloo's own words, before our explanation
    assert "timeout" in cause, stderr[-3000:]  # gloo timed out after 20 s (not: rank 1 ended, "closed by peer")
    assert "global rank 1 at step 2: no training step finished" in stderr


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_sigterm_ends_a_hung_run(tmp_path):
    """Issue 19's hang: no timeout would fire for 30 minutes, rank 0 is blocked inside a collective (where no
    Python signal handler runs) and Lightning's handler on rank 1 waits in a broadcast; a SIGTERM to every
    process (as SLURM and torchrun send it) still ends the job within faults.sigterm_grace_s."""
    status, stderr, seconds = run_job(tmp_path, *DDP, fail_at(1, 2, tmp_path / "failed", "hang"),
                                      "faults.collective_timeout_s=null", "faults.step_timeout_s=null",
                                      "faults.sigterm_grace_s=5", signal_after_failure=signal.SIGTERM)
    assert status == EXIT_SIGTERM and seconds < 2 + 5 + 15, stderr[-3000:]
    assert "global rank 0 got SIGTERM at step 2" in stderr and "global rank 1 got SIGTERM" in stderr


def test_watchdog_ends_a_process_without_progress_and_spares_one_with_progress():
    ended: list[int] = []
    watch = FaultWatch(step_timeout_s=0.5, sigterm_grace_s=30, exit=ended.append)
    trainer = type("T", (), {"global_rank": 0, "global_step": 7})()
    watch.on_train_start(trainer, None)
    try:
        for _ in range(8):  # 1.6 s of steps of 0.2 s each: never idle for 0.5 s
            time.sleep(0.2)
            watch.on_train_batch_end(trainer, None, None, None, 0)
        assert ended == []
        time.sleep(1.5)
        assert ended == [3]
    finally:
        watch._shutdown()


def test_the_end_of_training_stops_the_watcher_at_once_and_twice_is_harmless():
    # no step timeout and no SIGTERM: the watcher has no deadline and sleeps until woken; _shutdown's byte wakes
    # it (without it the join gives up after 5 s with the thread still alive)
    watch = FaultWatch(step_timeout_s=None, sigterm_grace_s=30, exit=pytest.fail)
    trainer = type("T", (), {"global_rank": 0, "global_step": 0})()
    watch.on_train_start(trainer, None)
    thread, previous = watch._thread, signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(previous)  # read back: the watcher's socket is the process's wakeup fd while it runs
    assert previous != -1
    watch.on_train_end(trainer, None)
    assert not thread.is_alive()
    assert signal.set_wakeup_fd(-1) == -1  # restored to what it was before training (none)
    watch.on_exception(trainer, None, RuntimeError())  # Lightning may call both: nothing left to stop


# ---------------------------------------------------------------- non-finite steps

def test_nonfinite_steps_are_counted_and_stop_at_the_limit():
    guard = NonFiniteSteps(limit=2)
    assert guard.admit(1.0, 2.0, 0, list)
    assert not guard.admit(math.nan, 2.0, 1, list)
    assert guard.admit(1.0, 2.0, 2, list)  # a finite step resets the run of non-finite ones
    assert not guard.admit(1.0, math.inf, 3, list)
    with pytest.raises(NonFiniteLossError, match=r"2 consecutive .* at step 4 .* samples \[5, 9\]"):
        guard.admit(math.nan, math.nan, 4, lambda: [5, 9])
    assert guard.skipped == 3


def nan_at(*steps: int) -> str:
    return f"trainer.callbacks=[{{_target_:tests.helpers.NaNLossAtSteps,steps:{list(steps)}}}]"


def checkpoint_states(folder: Path, steps: tuple[int, ...]) -> dict[int, dict[str, torch.Tensor]]:
    """The model tensors of ``step<N>.ckpt`` (a Lightning file, or a distributed checkpoint folder converted)."""
    states = {}
    for step in steps:
        path = folder / f"step{step:06d}.ckpt"
        if path.is_dir():
            dcp_to_torch_save(path, folder / "converted.pt")
            path = folder / "converted.pt"
        ckpt = torch.load(path, weights_only=True)
        states[step] = {k: v for k, v in ckpt["state_dict"].items() if isinstance(v, torch.Tensor)}
    return states


def check_step_3_skipped(run_dir: Path) -> None:
    states = checkpoint_states(run_dir / "checkpoints", (3, 4, 5))
    for name, value in states[3].items():  # step 3 (the 4th) was skipped: the weights are those after step 2
        assert torch.equal(states[4][name], value), name
    assert any(not torch.equal(states[5][n], v) for n, v in states[4].items())  # step 4 trained again
    losses = losses_in(run_dir)
    assert sorted(losses) == list(range(6))  # the skipped step still counts: 6 steps logged, max_steps honoured
    assert math.isnan(losses[3]) and all(math.isfinite(v) for s, v in losses.items() if s != 3)


def test_a_nonfinite_step_leaves_the_model_as_it_was(tmp_path):
    summary = train(cfg_of(*FAST, "balance.micro_batches=2", "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=1",
                           nan_at(3), f"run_dir={tmp_path}"))
    assert summary["skipped_steps"] == 1
    check_step_3_skipped(tmp_path)
    ckpts = tmp_path / "checkpoints"
    moments = [torch.load(ckpts / f"step00000{s}.ckpt", weights_only=True)["optimizer_states"][0]["state"][0]
               for s in (3, 4)]
    assert moments[1]["step"] == moments[0]["step"] and torch.equal(moments[1]["exp_avg"], moments[0]["exp_avg"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_nonfinite_pipeline_step_is_skipped(tmp_path):
    out = subprocess.run([sys.executable, "-m", "omnibal_pl.cli.train", *FAST, "cluster.strategy=omnibal",
                          "plan.use=uniform", "balance.micro_batches=2", "trainer.max_steps=6",
                          "trainer.checkpoint_every_n_steps=1", nan_at(3), f"run_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    check_step_3_skipped(tmp_path)


def test_consecutive_nonfinite_steps_stop_the_run_naming_step_and_samples(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"at step 3 .* on samples \[\d+"):
        train(cfg_of(*FAST, "balance.micro_batches=2", "trainer.max_steps=6", "faults.max_nonfinite_steps=2",
                     nan_at(2, 3), f"run_dir={tmp_path}"))
