"""Every way a run can stop making progress ends it, within a bounded time, naming the rank and the step.

A dead or hung rank leaves the others waiting; three bounds end the wait:

- **collective timeout** (``faults.collective_timeout_s``): the process group's timeout, given to the DDP
  strategy and to :class:`~omnibal_pl.parallel.OmniBalStrategy` (:func:`strategy_with_timeout`). Gloo raises
  when a peer closes its connection (a killed process) or when the timeout passes; NCCL's watchdog aborts
  the communicator after it;
- **step watchdog** (``faults.step_timeout_s``, :class:`FaultWatch`): a thread that ends the process when no
  training batch has finished for that long (a hang outside any collective, or a backend that does not
  honour the timeout), after printing every thread's stack;
- **SIGTERM deadline** (``faults.sigterm_grace_s``): SLURM (time limit, preemption) and torchrun stop jobs
  with SIGTERM. Lightning's own handler stops at the end of the current batch, which never comes when the
  main thread is blocked in a collective (a Python signal handler only runs between bytecodes). The same
  thread learns of the signal through :func:`signal.set_wakeup_fd` and ends the process after the grace
  period unless it has ended by then.

An exception out of ``trainer.fit`` that is not one of the package's own is re-raised as :class:`RankFailure`
naming this rank, the step and the epoch (:func:`rank_and_step_on_failure`).

Non-finite steps (:class:`NonFiniteSteps`): a step whose global loss or gradient norm is not finite is not
applied. Both numbers are global (all-reduced or broadcast before they are read), so every rank takes the
same decision without another collective. ``faults.max_nonfinite_steps`` consecutive ones stop the run.
"""
from __future__ import annotations

import contextlib
import faulthandler
import inspect
import logging
import math
import os
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional

import lightning.pytorch as pl
from lightning.pytorch.strategies import Strategy, StrategyRegistry

from omnibal_pl.errors import ConfigError, OmniBalError

log = logging.getLogger(__name__)

EXIT_HUNG = 3  # the watchdog's exit status: no training progress for faults.step_timeout_s
EXIT_SIGTERM = 128 + signal.SIGTERM  # the shell's status of a process ended by SIGTERM


@dataclass
class FaultConfig:
    """The ``faults`` group of ``omnibal-train``. Times in seconds; a ``None`` timeout switches that bound off.

    ``collective_timeout_s``: how long a collective waits for its peers before it raises (also the start-up
    rendezvous: keep it above the time the slowest rank takes to start);
    ``step_timeout_s``: longest time without a finished training or validation batch (the first included) before
    the watchdog ends the process: set it above the slowest step plus a checkpoint save;
    ``sigterm_grace_s``: time between SIGTERM and the process's forced end, for Lightning's own stop at the
    end of the batch;
    ``max_nonfinite_steps``: this many consecutive optimizer steps with a non-finite loss or gradient norm
    stop the run (each one is skipped); 0 never stops.
    """

    collective_timeout_s: Optional[float] = 600.0
    step_timeout_s: Optional[float] = 1800.0
    sigterm_grace_s: float = 30.0
    max_nonfinite_steps: int = 3


class RankFailure(OmniBalError):
    """A rank's training failed with an error that is not one of the package's own (a collective whose peer
    died or timed out, a crash in a kernel); the message names the rank and the step."""


class NonFiniteLossError(OmniBalError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient norm."""


def collective_timeout(cfg: FaultConfig) -> timedelta | None:
    """The process groups' timeout (None: the backend's default)."""
    return None if cfg.collective_timeout_s is None else timedelta(seconds=float(cfg.collective_timeout_s))


def strategy_with_timeout(name: str, timeout: timedelta | None) -> str | Strategy:
    """Lightning's registered strategy ``name`` (``ddp``, ``ddp_spawn``, ``fsdp``, ...) built with the collective
    ``timeout``; ``name`` itself when it takes none (``auto``, ``single_device``) or no timeout is set."""
    if timeout is None or name not in StrategyRegistry:
        return name
    entry = StrategyRegistry[name]
    if "timeout" not in inspect.signature(entry["strategy"].__init__).parameters:
        return name
    return entry["strategy"](**{**entry["init_params"], "timeout": timeout})


@contextlib.contextmanager
def rank_and_step_on_failure(trainer: pl.Trainer, timeout: timedelta | None) -> Iterator[None]:
    """Re-raises an error out of the block (``trainer.fit``) as :class:`RankFailure` naming this rank and the
    step; the package's own errors pass unchanged (they already say what is wrong)."""
    try:
        yield
    except OmniBalError:
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0]
        waited = f"{timeout.total_seconds():.0f} s (faults.collective_timeout_s)" if timeout else "the backend's timeout"
        raise RankFailure(
            f"global rank {trainer.global_rank} of {trainer.world_size} failed at step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}): {type(err).__name__}: {first}. If a collective failed, another rank "
            f"died or did not answer within {waited}: its own log names its error. Resume with ckpt_path=auto."
        ) from err


class FaultWatch(pl.Callback):
    """The step watchdog and the SIGTERM deadline (see the module docstring), active from ``on_train_start`` to
    the end of the fit in the process's main thread; one daemon thread does both.

    ``exit`` ends the process (``os._exit``: no Python cleanup, which could itself wait on a dead peer); tests
    replace it to observe the decision.
    """

    def __init__(self, step_timeout_s: float | None, sigterm_grace_s: float,
                 exit: Callable[[int], None] = os._exit) -> None:
        self.step_timeout_s = step_timeout_s
        self.sigterm_grace_s = sigterm_grace_s
        self.exit = exit
        self._last_progress = time.monotonic()
        self._step = 0
        self._rank = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._previous_fd: int | None = None  # the wakeup fd before ours, while ours is installed

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rank, self._step = trainer.global_rank, trainer.global_step
        self._last_progress = time.monotonic()
        self._stop.clear()
        read, write = socket.socketpair()  # the watcher sleeps on ``read``; a byte on ``write`` wakes it
        write.setblocking(False)
        self._wakeup = (read, write)
        if threading.current_thread() is threading.main_thread():
            # Python's C-level handler writes every signal that has a Python handler (Lightning's SIGTERM one) here
            self._previous_fd = signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, args=(read,), name="omnibal-fault-watch", daemon=True)
        self._thread.start()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._step = trainer.global_step
        self._last_progress = time.monotonic()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._last_progress = time.monotonic()  # validation inside the epoch is progress too

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._last_progress = time.monotonic()  # a save starts: its time is not a stalled step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._shutdown()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        """Stops the watcher at once (a byte wakes its ``select``) and restores the wakeup fd. Safe to call again,
        also after a signal handler's exception interrupted an earlier call."""
        self._stop.set()
        thread, wakeup = self._thread, self._wakeup
        self._thread = self._wakeup = None
        if wakeup is None:
            return
        if self._previous_fd is not None:  # installed by on_train_start in the main thread, where this runs too
            signal.set_wakeup_fd(self._previous_fd)
            self._previous_fd = None
        with contextlib.suppress(OSError):
            wakeup[1].send(b"\0")  # no signal has number 0
        try:
            if thread is not None:
                thread.join(timeout=5)
        finally:
            for s in wakeup:
                s.close()

    def _watch(self, wakeup: socket.socket) -> None:
        sigterm_at: float | None = None
        while not self._stop.is_set():
            now = time.monotonic()
            waits = []  # seconds to the next deadline; none: sleep until a signal or _shutdown's byte
            if sigterm_at is not None:
                if now - sigterm_at >= self.sigterm_grace_s:
                    self._end(EXIT_SIGTERM, f"SIGTERM {self.sigterm_grace_s:.0f} s ago (faults.sigterm_grace_s) and "
                                            "the run has not stopped")
                    return
                waits.append(self.sigterm_grace_s - (now - sigterm_at))
            if self.step_timeout_s is not None:
                idle = now - self._last_progress
                if idle >= self.step_timeout_s:
                    self._end(EXIT_HUNG, f"no training step finished for {idle:.0f} s (faults.step_timeout_s="
                                         f"{self.step_timeout_s:.0f}): a peer rank died or a collective hangs")
                    return
                waits.append(self.step_timeout_s - idle)
            try:
                ready, _, _ = select.select([wakeup], [], [], max(min(waits), 0.01) if waits else None)
                signals = wakeup.recv(64) if ready else b""
            except (OSError, ValueError):  # closed by _shutdown
                return
            if sigterm_at is None and signal.SIGTERM in signals:
                sigterm_at = time.monotonic()
                print(f"omnibal: global rank {self._rank} got SIGTERM at step {self._step}: stopping; the process "
                      f"ends within {self.sigterm_grace_s:.0f} s", file=sys.stderr, flush=True)

    def _end(self, status: int, why: str) -> None:
        print(f"omnibal: global rank {self._rank} at step {self._step}: {why}; ending the process (exit status "
              f"{status}). Its threads' stacks:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        self.exit(status)


class NonFiniteSteps:
    """Decides per optimizer step whether to apply it: not when the step's global loss or gradient norm is not
    finite. Counts the skipped steps (``skipped``) and raises :class:`NonFiniteLossError` at ``limit``
    consecutive ones (0: never), naming the step and the samples of this rank's batch."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ConfigError(f"faults.max_nonfinite_steps={limit}: use 0 (never stop) or a positive count")
        self.limit = limit
        self.skipped = 0
        self.consecutive = 0

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])

    def admit(self, loss: float, grad_norm: float, step: int, sample_ids: Callable[[], list[int]]) -> bool:
        """True to apply the step; False to skip it (the caller drops its gradients). ``sample_ids`` is called
        only when the run stops (it may read the device)."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        log.warning("step %d: loss %s, gradient norm %s: update skipped (%d in a row, %d in all)", step, loss,
                    grad_norm, self.consecutive, self.skipped)
        if self.limit and self.consecutive >= self.limit:
            raise NonFiniteLossError(
                f"{self.consecutive} consecutive steps with a non-finite loss or gradient norm (faults."
                f"max_nonfinite_steps={self.limit}), the last at step {step} (loss {loss}, gradient norm {grad_norm}) "
                f"on samples {sample_ids()} of this rank; look at those samples, lower optim.lr or resume from an "
                "earlier checkpoint")
        return False
