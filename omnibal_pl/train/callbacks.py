"""Lightning callbacks of the training loop."""
from __future__ import annotations

import json
import os
import resource
from itertools import groupby
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from omnibal_pl.batch import PackedBatch

from omnibal_pl.model.sparsify import Sparsifier, gumbel_tau


class GumbelTemperature(pl.Callback):
    """Sets the predictors' Gumbel temperature before every training batch: :func:`gumbel_tau` at
    ``trainer.global_step`` over ``trainer.estimated_stepping_batches``, start/end from the config."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        for m in pl_module.modules():
            if isinstance(m, Sparsifier):
                m.tau = gumbel_tau(trainer.global_step, max(int(trainer.estimated_stepping_batches), 1),
                                   m.cfg.tau_start, m.cfg.tau_end)


class SampleLog(pl.Callback):
    """Appends one JSON line per training micro-batch to ``<folder>/rank<global rank>.jsonl``: ``pid`` (one
    process = one attempt of the run), ``epoch``, ``batch_idx`` (loader item of the epoch), ``micro`` (its
    micro-batch), ``step`` (optimizer steps done after it), ``ids`` (dataset indices), ``rss_mb`` (the
    process's resident memory now) and ``loss`` (the global loss of the step this item finished, else None).
    Written and flushed at the end of every loader item, so a killed process leaves every line it wrote.

    Reads each micro-batch's ids from the device: an audit tool (``scripts/soak.py``, the restart tests), not for
    production runs. :func:`committed_micro_batches` reads a file back as the run that survived restarts."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self._file = None
        self._step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._file = open(self.folder / f"rank{trainer.global_rank}.jsonl", "a")
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        micro_batches = batch if isinstance(batch, (list, tuple)) else [batch]
        finished, self._step = trainer.global_step > self._step, trainer.global_step
        losses = getattr(pl_module, "losses", [])
        common = dict(pid=os.getpid(), epoch=trainer.current_epoch, batch_idx=batch_idx, step=trainer.global_step,
                      rss_mb=_rss_mb(), loss=losses[-1] if finished and losses else None)
        for k, mb in enumerate(micro_batches):
            ids = mb.sample_ids.tolist() if isinstance(mb, PackedBatch) else []
            self._file.write(json.dumps({**common, "micro": k, "ids": ids}) + "\n")
        self._file.flush()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _rss_mb() -> float:
    """Resident memory of this process now, MiB (Linux ``/proc``; the peak where that is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def committed_micro_batches(path: Path) -> list[dict]:
    """The micro-batches of a :class:`SampleLog` file that count: each attempt (a run of lines with one ``pid``)
    resumes at a checkpoint, so what an earlier attempt trained at or after the next attempt's first
    (epoch, batch_idx) was lost with it and is dropped. The result is in training order."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    attempts = [list(group) for _, group in groupby(rows, key=lambda r: r["pid"])]
    kept: list[dict] = []
    for attempt in attempts:
        start = (attempt[0]["epoch"], attempt[0]["batch_idx"])
        kept = [r for r in kept if (r["epoch"], r["batch_idx"]) < start] + attempt
    return kept
