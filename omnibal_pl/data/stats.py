"""Length statistics of a dataset, computed without decoding pixels, in parallel processes.

A dataset that supports this exposes ``num_records``, ``sources`` and ``record_lengths(r)`` returning
``(vit, tokens, image_flag, source)`` for record ``r``; these are exactly the counts its
``__getitem__`` produces (image sizes come from file headers, tokens from the same tokenisation).
"""
from __future__ import annotations

import multiprocessing as mp
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from omnibal_pl.lengths import LengthTable


class SupportsRecordLengths(Protocol):
    num_records: int
    sources: list[str]

    def record_lengths(self, r: int) -> tuple[int, int, int, int]: ...


def compute_lengths(
    dataset: SupportsRecordLengths, num_workers: int = 0, progress: bool = False, chunk_size: int = 256
) -> LengthTable:
    """The dataset's :class:`LengthTable`, one row per record in record order.

    ``num_workers`` > 0 spreads chunks of ``chunk_size`` records over that many processes;
    ``progress`` shows a tqdm bar. Errors raised for a record (missing image, bad conversation)
    propagate unchanged.
    """
    n = dataset.num_records
    rows = np.empty((n, 4), np.int64)
    spans = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    with tqdm(total=n, disable=not progress, desc="omnibal-stats", unit="sample") as bar:
        if num_workers <= 0:
            for span in spans:
                rows[span[0] : span[1]] = _rows(dataset, span)
                bar.update(span[1] - span[0])
        else:
            with mp.Pool(num_workers, initializer=_init_worker, initargs=(dataset,)) as pool:
                for start, part in pool.imap_unordered(_worker_rows, spans):
                    rows[start : start + len(part)] = part
                    bar.update(len(part))
    table = LengthTable(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3], dataset.sources)
    table.validate("computed statistics")
    return table


def _rows(dataset: SupportsRecordLengths, span: tuple[int, int]) -> np.ndarray:
    return np.asarray([dataset.record_lengths(r) for r in range(*span)], np.int64).reshape(-1, 4)


_worker_dataset: SupportsRecordLengths | None = None


def _init_worker(dataset: SupportsRecordLengths) -> None:
    global _worker_dataset
    _worker_dataset = dataset


def _worker_rows(span: tuple[int, int]) -> tuple[int, np.ndarray]:
    return span[0], _rows(_worker_dataset, span)
