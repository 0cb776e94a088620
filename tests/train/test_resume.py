"""Crash-safe checkpoints and automatic resume (omnibal_pl/train/checkpoints.py): the newest complete checkpoint is
found, a kill inside a save leaves the previous one loadable and the run continues exactly from it, torchrun's
``--max-restarts`` continues a killed 2-process job with every sample seen once, and a checkpoint carrying a
pickled payload is refused without running it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from omnibal_pl.cli.train import train
from omnibal_pl.data.datamodule import OmniBalDataModule
from omnibal_pl.errors import ConfigError
from omnibal_pl.train.assemble import resolve_run
from omnibal_pl.train.callbacks import committed_micro_batches
from omnibal_pl.train.checkpoints import latest_checkpoint, resolve_ckpt_path
from omnibal_pl.train.schemas import parse_run_config

from tests.helpers import FAST, cfg_of

PIPELINE = ["cluster.strategy=omnibal", "plan.use=uniform"]  # one process, the distributed checkpoint format


def make_checkpoint(folder: Path, name: str, dcp_folder: bool = False, complete: bool = True) -> Path:
    path = folder / name
    if dcp_folder:
        path.mkdir(parents=True)
        (path / ".metadata").write_bytes(b"m")
        if complete:
            (path / "meta.pt").write_bytes(b"m")
    else:
        path.write_bytes(b"c")
    return path


def test_latest_checkpoint_is_the_highest_complete_step(tmp_path):
    assert latest_checkpoint(tmp_path / "none") is None
    make_checkpoint(tmp_path, "step000009.ckpt")
    newest = make_checkpoint(tmp_path, "step000010.ckpt", dcp_folder=True)  # by step, not by name's order
    make_checkpoint(tmp_path, "step000012.ckpt", dcp_folder=True, complete=False)  # a folder without meta.pt
    make_checkpoint(tmp_path, "step000014.ckpt.tmp")  # a save that was killed
    (tmp_path / "step000011.ckpt").touch()  # empty file
    (tmp_path / "last.ckpt").symlink_to("step000012.ckpt")
    assert latest_checkpoint(tmp_path) == newest
    make_checkpoint(tmp_path, "step1000000.ckpt")  # more digits than the pattern pads to
    assert latest_checkpoint(tmp_path).name == "step1000000.ckpt"


def test_ckpt_path_auto_starts_fresh_then_resumes(tmp_path):
    assert resolve_ckpt_path(None, tmp_path) is None
    assert resolve_ckpt_path("auto", tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    found = make_checkpoint(tmp_path / "checkpoints", "step000003.ckpt", dcp_folder=True)
    assert resolve_ckpt_path("auto", tmp_path) == resolve_ckpt_path("last", tmp_path) == str(found)
    with pytest.raises(ConfigError, match="no such checkpoint"):
        resolve_ckpt_path(str(tmp_path / "missing.ckpt"), tmp_path)


def run_cli(run_dir: Path, *overrides: str, failure: str = "", launcher: tuple[str, ...] = ("-m",),
            timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``omnibal-train ... ckpt_path=auto`` with a SampleLog under ``run_dir/samples`` (and the ``failure``
    callback); ``launcher``: how Python starts the module (torchrun's arguments before ``-m``)."""
    callbacks = f"{{_target_:omnibal_pl.train.callbacks.SampleLog,folder:'{run_dir}/samples'}}" + failure
    return subprocess.run([sys.executable, *launcher, "omnibal_pl.cli.train", *FAST, *overrides, f"run_dir={run_dir}",
                           "ckpt_path=auto", f"trainer.callbacks=[{callbacks}]"], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def fail_at(rank: int, step: int, marker: Path, how: str) -> str:
    return f",{{_target_:tests.helpers.FailAtStep,rank:{rank},step:{step},marker:'{marker}',how:{how}}}"


def check_attempts_agree(path: Path) -> int:
    """Micro-batches an earlier attempt trained past the checkpoint the next one resumed from were trained again
    with the same samples and the same loss (an exact resume); returns how many were compared."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    first = {(r["epoch"], r["batch_idx"], r["micro"]): r for r in rows if r["pid"] == rows[0]["pid"]}
    again = [r for r in rows if r["pid"] != rows[0]["pid"] and (r["epoch"], r["batch_idx"], r["micro"]) in first]
    for r in again:
        before = first[(r["epoch"], r["batch_idx"], r["micro"])]
        assert r["ids"] == before["ids"], (r, before)
        assert (r["loss"] is None) == (before["loss"] is None), (r, before)  # the same micro-batches end steps
        assert r["loss"] is None or r["loss"] == pytest.approx(before["loss"], rel=1e-5), (r, before)
    return len(again)


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("strategy", [[], PIPELINE], ids=["lightning_file", "distributed_folder"])
def test_a_kill_inside_a_save_leaves_the_previous_checkpoint_and_the_run_continues_exactly(tmp_path, strategy):
    args = [*strategy, "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=2"]
    killed = run_cli(tmp_path, *args, failure=fail_at(0, 4, tmp_path / "failed", "save"))
    assert killed.returncode != 0 and (tmp_path / "failed").exists(), killed.stderr[-2000:]
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "step000004.ckpt.tmp").exists() and not (ckpts / "step000004.ckpt").exists()
    assert latest_checkpoint(ckpts) == ckpts / "step000002.ckpt"
    assert (ckpts / "last.ckpt").resolve() == (ckpts / "step000002.ckpt").resolve()
    resumed = run_cli(tmp_path, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert latest_checkpoint(ckpts) == ckpts / "step000006.ckpt"
    assert check_attempts_agree(tmp_path / "samples" / "rank0.jsonl") == 2  # steps 3 and 4, trained twice
    committed = committed_micro_batches(tmp_path / "samples" / "rank0.jsonl")
    assert [r["batch_idx"] for r in committed] == list(range(6))


def expected_micro_batches(overrides: list[str], run_dir: Path, rank: int, count: int) -> list[list[int]]:
    """The sample ids of the first ``count`` micro-batches DP rank ``rank`` trains in epoch 0, from the sampler."""
    run = resolve_run(parse_run_config(cfg_of(*FAST, *overrides, f"run_dir={run_dir}")), run_dir)
    datamodule = OmniBalDataModule(run.data, run.cfg.packing, run.cfg.loader, dp_rank=rank)
    datamodule.setup()
    loader = iter(datamodule.train_dataloader())
    return [next(loader).sample_ids.tolist() for _ in range(count)]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_torchrun_restarts_a_killed_job_which_resumes_with_every_sample_once(tmp_path):
    """The whole 2-process job goes down when rank 1 is killed after step 5; torchrun (--max-restarts=1) starts
    it again with the same command, which resumes from the step-4 checkpoint (ckpt_path=auto)."""
    args = ["cluster.devices=2", "cluster.strategy=ddp", "balance.micro_batches=2", "trainer.max_steps=8",
            "trainer.checkpoint_every_n_steps=2"]
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
                "--monitor-interval=1", "-m")
    out = run_cli(tmp_path, *args, failure=fail_at(1, 5, tmp_path / "failed", "kill"), launcher=torchrun, timeout=380,
                  env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})  # see omnibal_pl/train/checkpoints.py
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / "failed").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())  # the run's, through both attempts
    assert (summary["steps"], summary["attempts"], summary["resumed_at"]) == (8, 2, [4])
    seen = []
    for rank in range(2):
        log = tmp_path / "samples" / f"rank{rank}.jsonl"
        assert check_attempts_agree(log) >= 2  # step 5's micro-batches at least, trained again after the restart
        committed = committed_micro_batches(log)
        assert [r["ids"] for r in committed] == expected_micro_batches(args, tmp_path / "resolve", rank, 16)
        seen += [i for r in committed for i in r["ids"]]
    assert len(seen) == len(set(seen))  # no sample twice across ranks and attempts


class SideEffect:
    """Unpickling it opens (creates) ``path``: any code a pickle names would run the same way."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_checkpoint_with_a_pickled_payload_is_refused_without_running_it(tmp_path):
    train(cfg_of(*FAST, "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=2", f"run_dir={tmp_path / 'a'}"))
    good = tmp_path / "a" / "checkpoints" / "step000002.ckpt"
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["payload"] = SideEffect(tmp_path / "ran")
    evil = tmp_path / "evil.ckpt"
    torch.save(checkpoint, evil)
    with pytest.raises(ConfigError, match="not unpickled"):
        train(cfg_of(*FAST, "trainer.max_steps=3", f"ckpt_path={evil}", f"run_dir={tmp_path / 'b'}"))
    assert not (tmp_path / "ran").exists()
    torch.load(evil, weights_only=False)  # the payload is real: unpickled without the guard, it runs
    assert (tmp_path / "ran").exists()
    os.remove(tmp_path / "ran")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_preempted_submitit_job_is_requeued_and_resumes_with_every_sample_once(tmp_path):
    """SLURM's preemption signal (USR2, as submitit asks SLURM to send it) reaches the job's process; submitit's
    handler calls hydra-submitit-launcher's checkpoint hook, which resubmits the same job: it runs again in the
    same run directory (Hydra's resolved sweep folder travels with it) and ckpt_path=auto resumes it. Submitit's
    local executor requeues the same way SLURM does, without scontrol."""
    samples = tmp_path / "samples" / "rank0.jsonl"
    args = ["trainer.max_steps=24", "trainer.checkpoint_every_n_steps=2"]
    proc = subprocess.Popen([sys.executable, "-m", "omnibal_pl.cli.train", "-m", "hydra/launcher=submitit_local",
                             f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.launcher.timeout_min=10", *FAST, *args,
                             "ckpt_path=auto", f"trainer.callbacks=[{{_target_:omnibal_pl.train.callbacks.SampleLog,"
                             f"folder:'{tmp_path / 'samples'}'}}]"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (samples.exists() and len(samples.read_text().splitlines()) >= 5):
            time.sleep(0.1)
        os.kill(json.loads(samples.read_text().splitlines()[-1])["pid"], signal.SIGUSR2)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    job_logs = "\n".join(p.read_text()[-2000:] for p in sorted((tmp_path / "sweep").glob(".submitit/*/*_log.err")))
    assert proc.returncode == 0, stderr[-3000:] + job_logs
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    attempts = {r["pid"]: r["step"] for r in rows}  # each attempt's last step
    assert len(attempts) == 2, f"attempts (pid: last step) {attempts}; the job's log:\n{job_logs}"  # preempted, requeued
    committed = committed_micro_batches(samples)
    assert [r["ids"] for r in committed] == expected_micro_batches(args, tmp_path / "resolve", 0, 24)
    check_attempts_agree(samples)
