"""Length statistics of a dataset, computed without decoding pixels, in parallel processes.

A dataset that supports this exposes ``num_records``, ``sources`` and ``record_lengths(r)`` returning
``(vit, tokens, image_flag, source)`` for record ``r``; these are exactly the counts its
``__getitem__`` produces (image sizes come from file headers, tokens from the same tokenisation).
A record that cannot be read raises :class:`~omnibal_pl.data.skips.BadSampleError`:
:func:`compute_statistics` records it and goes on, :func:`compute_lengths` raises it.
"""
from __future__ import annotations

import json
import multiprocessing as mp
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from omnibal_pl.data.skips import BadSampleError
from omnibal_pl.lengths import LengthTable

PLACEHOLDER_ROW = (1, 1, 0, 0)  # (vit, tokens, image_flag, source) of a bad record's row: valid, never trained on


@dataclass
class BadRecord:
    """A record whose statistics could not be read: why (``reason``, one of ``skips.BAD_REASONS``) and the
    error's message (naming the record's file:line and the file at fault)."""

    reason: str
    message: str


@dataclass
class RecordStatistics:
    """The statistics of every record: ``table`` has one row per record; the row of a record in ``bad``
    (record -> :class:`BadRecord`) is :data:`PLACEHOLDER_ROW`, which callers must leave out or refuse."""

    table: LengthTable
    bad: dict[int, BadRecord] = field(default_factory=dict)

    def raise_first_bad(self, hint: str = "") -> None:
        """Raises the error of the first bad record (with the count of the others and ``hint``), if any."""
        if self.bad:
            first = min(self.bad)
            others = f" (and {len(self.bad) - 1} more bad records)" if len(self.bad) > 1 else ""
            raise BadSampleError(f"{self.bad[first].message}{others}{hint}", self.bad[first].reason)

    def save_bad(self, path: Path) -> None:
        """Writes ``bad`` as JSON ``{"<record>": [reason, message]}`` (what :meth:`load_bad` reads)."""
        path.write_text(json.dumps({str(r): [b.reason, b.message] for r, b in sorted(self.bad.items())}))

    @staticmethod
    def load_bad(path: Path) -> dict[int, BadRecord]:
        return {int(r): BadRecord(reason, message) for r, (reason, message) in json.loads(path.read_text()).items()}


class SupportsRecordLengths(Protocol):
    num_records: int
    sources: list[str]

    def record_lengths(self, r: int) -> tuple[int, int, int, int]: ...


def compute_lengths(
    dataset: SupportsRecordLengths, num_workers: int = 0, progress: bool = False, chunk_size: int = 256
) -> LengthTable:
    """The dataset's :class:`LengthTable`, one row per record in record order; raises the first bad record's
    :class:`~omnibal_pl.data.skips.BadSampleError` (missing image, bad conversation) after reading them all."""
    stats = compute_statistics(dataset, num_workers, progress, chunk_size)
    stats.raise_first_bad()
    return stats.table


def compute_statistics(
    dataset: SupportsRecordLengths, num_workers: int = 0, progress: bool = False, chunk_size: int = 256
) -> RecordStatistics:
    """Every record's statistics, in record order, and the records that could not be read.

    ``num_workers`` > 0 spreads chunks of ``chunk_size`` records over that many processes;
    ``progress`` shows a tqdm bar. Errors other than :class:`~omnibal_pl.data.skips.BadSampleError`
    propagate unchanged.
    """
    n = dataset.num_records
    rows = np.empty((n, 4), np.int64)
    bad: dict[int, BadRecord] = {}
    spans = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    with tqdm(total=n, disable=not progress, desc="omnibal-stats", unit="sample") as bar:
        if num_workers <= 0:
            for start, end in spans:
                rows[start:end], part_bad = _rows(dataset, (start, end))
                bad.update(part_bad)
                bar.update(end - start)
        else:
            with mp.Pool(num_workers, initializer=_init_worker, initargs=(dataset,)) as pool:
                for start, (part, part_bad) in pool.imap_unordered(_worker_rows, spans):
                    rows[start : start + len(part)] = part
                    bad.update(part_bad)
                    bar.update(len(part))
    table = LengthTable(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3], dataset.sources)
    table.validate("computed statistics")
    return RecordStatistics(table, dict(sorted(bad.items())))


def _rows(dataset: SupportsRecordLengths, span: tuple[int, int]) -> tuple[np.ndarray, dict[int, BadRecord]]:
    """Rows of records ``span[0]..span[1]-1``; a bad record gets :data:`PLACEHOLDER_ROW` and an entry in the dict."""
    rows, bad = [], {}
    for r in range(*span):
        try:
            rows.append(dataset.record_lengths(r))
        except BadSampleError as e:
            bad[r] = BadRecord(e.reason, str(e))
            rows.append(PLACEHOLDER_ROW)
    return np.asarray(rows, np.int64).reshape(-1, 4), bad


_worker_dataset: SupportsRecordLengths | None = None


def _init_worker(dataset: SupportsRecordLengths) -> None:
    global _worker_dataset
    _worker_dataset = dataset


def _worker_rows(span: tuple[int, int]) -> tuple[int, tuple[np.ndarray, dict[int, BadRecord]]]:
    return span[0], _rows(_worker_dataset, span)
