"""Soak test: a long run killed and restarted automatically, against the same run uninterrupted.

    python scripts/soak.py            # the tiny model, 20 epochs, a kill every 300 steps (about an hour on a CPU)
    python scripts/soak.py --quick    # CI-sized: 3 kills on a small data set (a few minutes)

Both runs are ``omnibal-train ... ckpt_path=auto`` under torchrun (one process); the soaked one has
``--max-restarts`` and the worker is killed with SIGKILL every ``--kill-every`` optimizer steps (found from its
:class:`~omnibal_pl.train.callbacks.SampleLog`), so torchrun restarts it and it resumes from its newest complete
checkpoint. Printed (and written to ``<out>/soak.json``): steps, restarts, the micro-batches and samples lost or
repeated (the soaked run's surviving micro-batches against the uninterrupted run's, in order), the final loss
of both, and the resident memory growth of each process (last reading over the one after warm-up). The script
exits non-zero when a sample was lost or repeated, the final losses differ, or memory grew more than 5%.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from itertools import groupby
from pathlib import Path

from omnibal_pl.data.datamodule import OmniBalDataModule
from omnibal_pl.train.assemble import resolve_run
from omnibal_pl.train.callbacks import committed_micro_batches
from omnibal_pl.train.schemas import parse_run_config

MAX_RSS_GROWTH = 0.05
WARMUP_FRACTION = 0.25  # an attempt's memory is measured from this share of its micro-batches on


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_module

    with initialize_config_module(config_module="omnibal_pl.conf", version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def steps_per_epoch(overrides: list[str], scratch: Path) -> int:
    """Optimizer steps of epoch 0 of this configuration (one DP rank)."""
    run = resolve_run(parse_run_config(compose([*overrides, f"run_dir={scratch}"])), scratch)
    datamodule = OmniBalDataModule(run.data, run.cfg.packing, run.cfg.loader, dp_rank=0)
    datamodule.setup()
    return datamodule.sampler.arrangement(0).steps.num_steps


def launch(run_dir: Path, overrides: list[str], restarts: int) -> subprocess.Popen:
    samples = run_dir / "samples"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           f"--max-restarts={restarts}", "--monitor-interval=1", "-m", "omnibal_pl.cli.train", *overrides,
           f"run_dir={run_dir}", "ckpt_path=auto",
           f"trainer.callbacks=[{{_target_:omnibal_pl.train.callbacks.SampleLog,folder:'{samples}'}}]"]
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # see omnibal_pl/train/checkpoints.py
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "launcher.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def last_row(path: Path) -> dict | None:
    if not path.exists():
        return None
    lines = path.read_text().splitlines()
    return json.loads(lines[-1]) if lines else None


def soak(run_dir: Path, overrides: list[str], kills: int, kill_every: int) -> int:
    """Runs with a SIGKILL every ``kill_every`` steps (``kills`` of them); returns the number of kills done."""
    proc = launch(run_dir, overrides, restarts=kills)
    log, done, killed_pids = run_dir / "samples" / "rank0.jsonl", 0, set()
    while proc.poll() is None:
        row = last_row(log)
        if (row and done < kills and row["pid"] not in killed_pids and row["loss"] is not None
                and row["step"] >= (done + 1) * kill_every):
            os.kill(row["pid"], signal.SIGKILL)
            killed_pids.add(row["pid"])
            done += 1
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"the soaked run failed (exit {proc.returncode}): see {run_dir / 'launcher.log'}")
    return done


def uninterrupted(run_dir: Path, overrides: list[str]) -> None:
    proc = launch(run_dir, overrides, restarts=0)
    if proc.wait() != 0:
        raise SystemExit(f"the uninterrupted run failed (exit {proc.returncode}): see {run_dir / 'launcher.log'}")


def rss_growth(path: Path) -> list[float]:
    """Per attempt (process): last resident memory reading over the reading after warm-up, minus 1."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    growth = []
    for _, group in groupby(rows, key=lambda r: r["pid"]):
        rss = [r["rss_mb"] for r in group]
        if len(rss) >= 8:
            growth.append(rss[-1] / rss[int(len(rss) * WARMUP_FRACTION)] - 1)
    return growth


def final_loss(rows: list[dict]) -> float:
    return next(r["loss"] for r in reversed(rows) if r["loss"] is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized: 3 kills, a small data set, 3 epochs")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--samples", type=int, default=600, help="synthetic samples in the data set")
    parser.add_argument("--kill-every", type=int, default=300, help="optimizer steps between kills")
    parser.add_argument("--kills", type=int, default=None, help="default: as many as the run has room for")
    parser.add_argument("--checkpoint-every", type=int, default=25, help="optimizer steps between checkpoints")
    parser.add_argument("--out", type=Path, default=Path("outputs/soak"))
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.samples, args.kill_every, args.kills, args.checkpoint_every = 3, 160, 20, 3, 7
    shutil.rmtree(args.out, ignore_errors=True)
    base = ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=10", "optim.warmup_ratio=0.05",
            f"dataset.generator.samples={args.samples}", f"trainer.checkpoint_every_n_steps={args.checkpoint_every}"]
    per_epoch = steps_per_epoch(base, args.out / "resolve")
    steps = args.epochs * per_epoch
    kills = args.kills if args.kills is not None else max((steps - 1) // args.kill_every, 0)
    if kills * args.kill_every >= steps:
        raise SystemExit(f"{kills} kills every {args.kill_every} steps do not fit in {steps} steps")
    overrides = [*base, f"trainer.max_steps={steps}"]
    start = time.perf_counter()
    restarts = soak(args.out / "soaked", overrides, kills, args.kill_every)
    soaked_s = time.perf_counter() - start
    uninterrupted(args.out / "uninterrupted", overrides)
    reference_s = time.perf_counter() - start - soaked_s

    soaked_log = args.out / "soaked" / "samples" / "rank0.jsonl"
    reference_log = args.out / "uninterrupted" / "samples" / "rank0.jsonl"
    soaked = committed_micro_batches(soaked_log)
    reference = committed_micro_batches(reference_log)
    key = lambda r: (r["epoch"], r["batch_idx"], r["micro"])  # noqa: E731
    soaked_at = {key(r): r["ids"] for r in soaked}
    reference_at = {key(r): r["ids"] for r in reference}
    differing = sum(soaked_at.get(k) != ids for k, ids in reference_at.items())
    lost = repeated = 0
    for epoch in sorted({r["epoch"] for r in reference}):  # per epoch: each sample as often as uninterrupted
        want = Counter(i for r in reference if r["epoch"] == epoch for i in r["ids"])
        got = Counter(i for r in soaked if r["epoch"] == epoch for i in r["ids"])
        lost += sum((want - got).values())
        repeated += sum((got - want).values())
    growth = rss_growth(soaked_log)
    growth_reference = rss_growth(reference_log)
    result = {
        "epochs": args.epochs, "steps": steps, "steps_done": soaked[-1]["step"], "restarts": restarts,
        "micro_batches": len(reference), "micro_batches_differing": differing + abs(len(soaked) - len(reference)),
        "samples_lost": lost, "samples_repeated": repeated,
        "final_loss": final_loss(soaked), "final_loss_uninterrupted": final_loss(reference),
        "rss_growth_max": max(growth, default=0.0), "rss_growth_uninterrupted": max(growth_reference, default=0.0),
        "soaked_s": soaked_s, "uninterrupted_s": reference_s,
    }
    (args.out / "soak.json").write_text(json.dumps(result, indent=2))
    for k, v in result.items():
        print(f"{k:<28}{v:.6g}" if isinstance(v, float) else f"{k:<28}{v}")
    failures = []
    if result["micro_batches_differing"] or lost or repeated:
        failures.append("micro-batches or samples differ from the uninterrupted run")
    if abs(result["final_loss"] - result["final_loss_uninterrupted"]) > 1e-5 * abs(result["final_loss_uninterrupted"]):
        failures.append("final loss differs from the uninterrupted run")
    if result["rss_growth_max"] > MAX_RSS_GROWTH:
        failures.append(f"resident memory grew more than {MAX_RSS_GROWTH:.0%}")
    if restarts != kills:
        failures.append(f"{restarts} restarts instead of {kills}")
    if failures:
        raise SystemExit("soak FAILED: " + "; ".join(failures))
    print("soak passed")


if __name__ == "__main__":
    main()
