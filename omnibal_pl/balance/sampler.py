"""Per-epoch, per-DP-rank balanced micro-batches for a DataLoader, resumable mid-epoch.

Every DP rank builds the same epoch arrangement from (seed, epoch, dp size): group the epoch's samples with
the configured algorithm and caps, arrange the groups into steps of ``dp x micro_batches`` groups
(:func:`~omnibal_pl.balance.steps.arrange`), then yield its own ``micro_batches`` groups of every
step. So all ranks yield the same number of micro-batches (no collective can hang) and the ranks of one
step carry near-equal work.

Nothing is lost: groups that cannot fill a whole step are carried into the next epoch (their samples
join that epoch's grouping); after the last epoch they are reported by :meth:`BalancedSampler.leftover`.
Epoch ``e``'s arrangement depends on epoch ``e - 1``'s carry, so arrangements are built in order from epoch 0 and
cached. While a rank iterates epoch ``e``, epoch ``e + 1``'s arrangement is built in a background thread (the
C++ grouping releases the GIL), so the next epoch starts without waiting for its grouping: the build, a second
of CPU at 1.2M samples, is taken off the training loop's critical path instead of being paid at every epoch start.

Lightning calls ``set_epoch`` only on ``loader.sampler`` and ``loader.batch_sampler.sampler``, never on
a batch sampler itself: hence two classes, :class:`BalancedSampler` (the epoch arrangement, ``set_epoch``,
state) and :class:`BalancedBatchSampler` (what the DataLoader iterates), the first reachable as the
second's ``.sampler``.
"""
from __future__ import annotations

import functools
import hashlib
import threading
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import numpy as np
from torch.utils.data import Sampler

from omnibal_pl.balance.config import CAPPED_ALGORITHMS, PACKERS, BalanceConfig
from omnibal_pl.balance.cost import load_time_model, steps_weight
from omnibal_pl.balance.grouping import Grouping, group_samples
from omnibal_pl.balance.metrics import balance_metrics
from omnibal_pl.balance.steps import Steps, arrange
from omnibal_pl.errors import ConfigError
from omnibal_pl.lengths import LengthTable


@dataclass
class EpochArrangement:
    """One epoch: groups of dataset indices and their arrangement into steps."""

    epoch: int
    grouping: Grouping  # indices are dataset sample ids
    steps: Steps
    carried_in: np.ndarray  # sample ids carried from the previous epoch's tail
    leftover: np.ndarray  # sample ids of groups in no full step (carried to the next epoch)
    vit_sums: np.ndarray  # tiles per group
    token_sums: np.ndarray  # tokens per group

    def step_loads(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Tiles and tokens of each DP rank in ``step`` ([dp] each)."""
        groups = self.steps.groups[step]
        return self.vit_sums[groups].sum(axis=1), self.token_sums[groups].sum(axis=1)

    def rank_groups(self, dp_rank: int) -> np.ndarray:
        """Group ids this DP rank runs, in order: step by step, micro-batch by micro-batch."""
        return self.steps.groups[:, dp_rank, :].reshape(-1)

    @functools.cached_property
    def digest(self) -> str:
        """A digest of the groups and step order (the same on every rank), hashed once: checkpoints store it."""
        h = hashlib.blake2b(digest_size=16)
        for a in (self.grouping.indices, self.grouping.offsets, self.steps.groups):
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        return h.hexdigest()


def epoch_seed(seed: int, epoch: int) -> int:
    """The grouping seed of an epoch (distinct streams per epoch, same on every rank)."""
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63)


class _Background:
    """``fn()`` run in a background thread; :meth:`result` waits for it.

    Not a daemon thread: the interpreter's exit waits for the build (seconds at most). A daemon thread still in
    the C++ grouping, which runs with the GIL released, is ended by the finalising interpreter as it takes the
    GIL back; that unwinds through pybind11's noexcept GIL guard and aborts the process (``terminate called
    without an active exception``, exit status 134) after its work is done. bench_data did, returning right after
    an epoch of 1.2M samples; ``omnibal-train`` with ``max_steps=2`` on 10M samples did not (its end of run outlasted
    the build), but nothing ordered the two.
    """

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="omnibal-next-epoch")
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as e:  # re-raised in the thread that asks for the result
            self._error = e

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class BalancedSampler(Sampler[int]):
    """The epoch arrangement of one DP rank; iterating it gives the rank's sample ids in training order.

    ``cfg`` must have both caps set (resolve them once with
    :func:`~omnibal_pl.balance.search.resolve_caps` and pass the resolved config): every rank and every
    epoch use the same shapes. ``dp_rank``/``dp_size`` are the data-parallel ones; with pipeline
    parallelism all ranks of one pipeline share a DP rank and so get the same micro-batches.
    """

    def __init__(self, lengths: LengthTable, cfg: BalanceConfig, dp_rank: int = 0, dp_size: int | None = None) -> None:
        dp_size = cfg.dp if dp_size is None else dp_size
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"DP rank {dp_rank} is outside [0, {dp_size}); check the strategy's DP size")
        missing_caps = (cfg.algorithm in CAPPED_ALGORITHMS and (cfg.vit_cap is None or cfg.token_cap is None)) or \
            (cfg.algorithm in PACKERS and cfg.token_cap is None)
        if missing_caps:
            raise ConfigError("BalancedSampler needs resolved caps: pass the config returned with "
                              "balance.vit_cap/token_cap set (see omnibal_pl.balance.resolve_caps)")
        self.lengths = lengths
        self.cfg = replace(cfg, dp=dp_size)
        self.time_model = load_time_model(self.cfg)  # reported under; steps weigh groups by it under cost=fitted
        self.dp_rank = dp_rank
        self.epoch = 0
        self._arrangements: dict[int, EpochArrangement] = {}
        self._next: tuple[int, _Background] | None = None  # (epoch, its arrangement being built)
        self._resume: tuple[int, int] | None = None  # (epoch, micro-batches already consumed)

    @property
    def dp_size(self) -> int:
        return self.cfg.dp

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch to iterate (Lightning calls this at every epoch start)."""
        self.epoch = int(epoch)

    def arrangement(self, epoch: int | None = None) -> EpochArrangement:
        """The arrangement of ``epoch`` (default: the current one), built after all earlier ones."""
        epoch = self.epoch if epoch is None else epoch
        start = max((e for e in self._arrangements if e <= epoch), default=-1)
        for e in range(start + 1, epoch + 1):
            if self._next is not None and self._next[0] == e:
                self._arrangements[e], self._next = self._next[1].result(), None  # not held past its epoch
            else:
                carried = self._arrangements[e - 1].leftover if e > 0 else np.zeros(0, np.int64)
                self._arrangements[e] = self._build(e, carried)
            self._arrangements.pop(e - 2, None)  # keep memory bounded: only the last two are needed
        return self._arrangements[epoch]

    def prefetch_next(self) -> None:
        """Starts building the arrangement of the epoch after the current one in the background (once)."""
        nxt = self.epoch + 1
        if nxt in self._arrangements or (self._next is not None and self._next[0] == nxt):
            return
        carried = self.arrangement().leftover
        self._next = (nxt, _Background(lambda: self._build(nxt, carried)))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_next": None}  # a thread does not cross a pickle; the epoch is built again if asked

    def _build(self, epoch: int, carried: np.ndarray) -> EpochArrangement:
        pool = np.concatenate([np.arange(len(self.lengths), dtype=np.int64), carried])
        table = self.lengths.subset(pool)
        seed = epoch_seed(self.cfg.seed, epoch)
        local, steps = arrange(table, group_samples(table, self.cfg, seed=seed), self.cfg, seed,
                               steps_weight(self.cfg, self.time_model))
        grouping = replace(local, indices=pool[local.indices])
        vit_sums, token_sums = local.sums(table)
        leftover = np.concatenate([grouping.group(g) for g in steps.leftover]) if len(steps.leftover) else np.zeros(0, np.int64)
        return EpochArrangement(epoch, grouping, steps, carried, leftover, vit_sums, token_sums)

    def micro_batches_per_epoch(self, epoch: int | None = None) -> int:
        """Micro-batches every rank yields in ``epoch`` (equal on all ranks)."""
        arr = self.arrangement(epoch)
        return arr.steps.num_steps * self.cfg.micro_batches

    def leftover(self, epoch: int | None = None) -> np.ndarray:
        """Sample ids that ``epoch`` could not place in a full step: trained next epoch, or never if it is the last."""
        return self.arrangement(epoch).leftover

    def report(self, epoch: int | None = None) -> dict[str, Any]:
        """Balance metrics of the epoch's grouping and steps (all ranks), plus carry-over counts."""
        arr = self.arrangement(epoch)
        table = self.lengths.subset(arr.grouping.indices)  # one row per grouped sample (carried ones too)
        local = replace(arr.grouping, indices=np.arange(len(table), dtype=np.int64))
        out = balance_metrics(table, local, arr.steps, self.time_model)
        out.update(epoch=arr.epoch, samples_carried_in=int(len(arr.carried_in)),
                   samples_carried_out=int(len(arr.leftover)), dp_rank=self.dp_rank, dp_size=self.cfg.dp,
                   micro_batches=self.cfg.micro_batches)
        return out

    # ------------------------------------------------------------------ resume
    def state_dict(self, batches_done: int = 0) -> dict[str, Any]:
        """Rank-independent position: seed, epoch and micro-batches consumed in it (by every rank), and what the
        epoch's arrangement was made of (its shape settings and a digest of its groups), so a resume that would
        arrange the epoch differently is refused instead of seeing some samples twice and others never."""
        return {"seed": int(self.cfg.seed), "epoch": int(self.epoch), "batches_done": int(batches_done),
                "dp_size": int(self.cfg.dp), "shape": self._shape(), "arrangement": self.arrangement().digest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next iteration of ``state['epoch']`` skips the micro-batches already consumed. Raises
        :class:`ConfigError` when this sampler would arrange that epoch differently from the saving run (states
        written before the digest existed are taken as they are)."""
        if int(state["seed"]) != self.cfg.seed or int(state.get("dp_size", self.cfg.dp)) != self.cfg.dp:
            raise ConfigError(f"sampler state is for seed {state['seed']} and DP size {state.get('dp_size')}, "
                              f"this run has seed {self.cfg.seed} and DP size {self.cfg.dp}: resume with the same "
                              "balance.seed and data-parallel size, or start a new run")
        epoch = int(state["epoch"])
        if "arrangement" in state and state["arrangement"] != self.arrangement(epoch).digest:
            saved, here = state.get("shape", {}), self._shape()
            changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in here.items() if saved.get(k) != v)
            raise ConfigError(f"the checkpoint's epoch {epoch} was arranged differently from how this run arranges it "
                              f"({'changed: ' + changed if changed else 'same caps and algorithm: the data or the grouping code changed'}); "
                              "resuming would see some samples twice and others never: resume with the saving run's data, "
                              "settings and version, or start a new run")
        self.epoch = epoch
        self._resume = (self.epoch, int(state["batches_done"]))

    def _shape(self) -> dict[str, Any]:
        weight = steps_weight(self.cfg, self.time_model)
        return {"algorithm": self.cfg.algorithm, "vit_cap": self.cfg.vit_cap, "token_cap": self.cfg.token_cap,
                "vit_quantum": self.cfg.vit_quantum, "samples": len(self.lengths), "step_order": self.cfg.step_order,
                "cost": self.cfg.cost, "exchange_sweeps": self.cfg.exchange_sweeps,
                "time_model": None if weight is None else [*weight.coefficients, weight.fixed_s]}

    def take_skip(self) -> int:
        """Micro-batches to skip at the start of the current epoch (once, after a resume)."""
        if self._resume is None or self._resume[0] != self.epoch:
            return 0
        skip = self._resume[1]
        self._resume = None
        return skip

    def __iter__(self) -> Iterator[int]:
        arr = self.arrangement()
        for g in arr.rank_groups(self.dp_rank):
            yield from arr.grouping.group(g).tolist()

    def __len__(self) -> int:
        arr = self.arrangement()
        return int(arr.grouping.sizes()[arr.rank_groups(self.dp_rank)].sum())


class BalancedBatchSampler(Sampler[list]):
    """Yields this DP rank's micro-batches (lists of dataset indices) for the current epoch, one per item;
    with ``whole_steps`` one item is the list of a step's ``micro_batches`` micro-batches.

    ``len()`` is the full epoch in items, also after a mid-epoch resume (Lightning counts the skipped
    items as done). Use with ``DataLoader(dataset, batch_sampler=...)`` and
    ``Trainer(use_distributed_sampler=False)``.
    """

    def __init__(self, sampler: BalancedSampler, whole_steps: bool = False) -> None:
        self.sampler = sampler
        self.whole_steps = whole_steps

    def __iter__(self) -> Iterator[list]:
        arrangement = self.sampler.arrangement()
        self.sampler.prefetch_next()
        skip = self.sampler.take_skip()
        groups = [arrangement.grouping.group(g).tolist() for g in arrangement.rank_groups(self.sampler.dp_rank)[skip:]]
        if not self.whole_steps:
            yield from groups
            return
        m = self.sampler.cfg.micro_batches
        for k in range(0, len(groups), m):
            yield groups[k : k + m]

    def __len__(self) -> int:
        return self.sampler.micro_batches_per_epoch() // (self.sampler.cfg.micro_batches if self.whole_steps else 1)
