"""What a run's summary covers, carried through its checkpoints, so a resumed run reports the whole run.

A run killed and resumed from a checkpoint (torchrun ``--max-restarts``, a requeued job, ``ckpt_path=...``) is a
new process. Without this record its summary would count only the last attempt's steps, losses, throughput and
skipped updates. The record holds the global loss and gradient norm of every optimizer step, the sum and count of
every logged step metric (the summary's means), and the attempts: the global step each later one resumed at, and
the training time of the earlier ones up to the checkpoint the next one resumed from. Work done after that
checkpoint was lost and is done again by the next attempt, so it is not counted.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

CHECKPOINT_KEY = "omnibal_run_record"


@dataclass
class RunRecord:
    """The run's optimizer steps so far; every value is global (the same on every rank). ``resumed_at``: the global
    step each attempt after the first resumed at; ``seconds_before`` (s): the earlier attempts' training time up to
    the checkpoint resumed from."""

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    resumed_at: list[int] = field(default_factory=list)
    seconds_before: float = 0.0
    _attempt_start: float | None = field(default=None, repr=False)

    @property
    def attempts(self) -> int:
        return 1 + len(self.resumed_at)

    def add_step(self, loss: float, grad_norm: float, metrics: dict[str, float]) -> None:
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def mean(self, key: str) -> float:
        """The mean of metric ``key`` over every step of the run that logged it (NaN if none did)."""
        return self.sums[key] / self.counts[key] if self.counts.get(key) else math.nan

    def start_attempt(self) -> None:
        """Training of this attempt begins now (its time counts from here)."""
        self._attempt_start = time.monotonic()

    def training_seconds(self) -> float:
        """The earlier attempts' training time up to the checkpoint resumed from, plus this attempt's so far."""
        running = time.monotonic() - self._attempt_start if self._attempt_start is not None else 0.0
        return self.seconds_before + running

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms), "sums": dict(self.sums),
                "counts": dict(self.counts), "resumed_at": list(self.resumed_at), "seconds": self.training_seconds()}

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        """The record of the checkpoint this attempt resumes from, at global step ``step``."""
        self.losses, self.grad_norms = list(state["losses"]), list(state["grad_norms"])
        self.sums, self.counts = dict(state["sums"]), dict(state["counts"])
        self.resumed_at = [*state["resumed_at"], step]
        self.seconds_before = float(state["seconds"])
