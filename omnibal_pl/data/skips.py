"""Bad samples: which ones a run leaves out, why, and when that is too many.

A sample is *bad* when its files cannot be read: an image that is missing or whose header does not
read, a conversation the chat format refuses (``<image>`` placeholders that do not match the images,
an unknown role, malformed turns), an annotation row that is not a sample (a JSONL line cut short or not
JSON, images named twice), or, found only when the pixels are decoded, an image whose data is
corrupt (a truncated JPEG). The dataset node's ``bad_samples`` policy (:class:`SkipPolicy`) decides:

- ``error`` (default): the run stops with a :class:`~omnibal_pl.errors.DataError` naming the record
  (file:line, or file[item]) and the file. Problems the statistics find (headers, conversations) stop it
  at start; a corrupt image is found only when a loader worker decodes it, and stops the run then.
- ``skip``: the sample is left out and counted per reason. Found at start, the record never reaches the
  sampler (the dataset's row index leaves it out, as ``overlong=skip`` does for over-cap samples); found
  mid-run, :class:`DropUnreadable` hands the collate a :class:`DroppedSample` in its place, the collate packs
  the rest of the group and the micro-batch carries the count to the training process
  (``PackedBatch.skipped``).

Budget (``max_skip_fraction``, default 0.001; 0: any bad sample stops the run): the run stops with
:class:`TooManySkipped`, naming the reasons and counts, when the bad samples exceed that fraction of the
dataset's records. At start: the records left out as bad. Mid-run (:class:`~omnibal_pl.train.skip_budget.SkipBudget`):
those plus the samples the loaders of all ranks dropped in the current epoch (a corrupt image is dropped
again every epoch, so each epoch is held to the budget on its own). Samples left out by ``overlong=skip``
are counted and reported with the bad ones but are a filter the configuration asks for, not bad data:
the budget does not count them. Neither does ``require_image``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch.utils.data import Dataset

from omnibal_pl.data.tiling import dummy_tiles
from omnibal_pl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"  # header or pixels do not decode
BAD_CONVERSATION = "bad_conversation"  # placeholder/image mismatch, unknown role, malformed turns
MALFORMED_ROW = "malformed_row"  # a JSONL line that does not parse (a cut download), a row that is not a sample
UNUSABLE_IMAGE = "unusable_image"  # an image the model family cannot take (Qwen: aspect ratio over 200)
OVERLONG = "overlong"  # longer than the token cap under overlong=skip: counted, not bad
BAD_REASONS = (MISSING_IMAGE, UNREADABLE_IMAGE, BAD_CONVERSATION, MALFORMED_ROW, UNUSABLE_IMAGE)  # what the budget counts
LOADER_REASONS = (MISSING_IMAGE, UNREADABLE_IMAGE)  # what a loader worker can find; all-reduced in this order
BAD_SAMPLE_POLICIES = ("error", "skip")


class BadSampleError(DataError):
    """A sample that cannot be read; ``reason`` is one of :data:`BAD_REASONS`. The message names the record."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries (statistics pool, loader workers)
        return type(self), (str(self), self.reason)


class TooManySkipped(DataError):
    """More bad samples than ``dataset.max_skip_fraction`` allows."""


@dataclass
class SkipPolicy:
    """The dataset node's ``bad_samples`` (``error`` | ``skip``) and ``max_skip_fraction`` (see the module
    docstring)."""

    bad_samples: str = "error"
    max_skip_fraction: float = 0.001

    def __post_init__(self) -> None:
        if self.bad_samples not in BAD_SAMPLE_POLICIES:
            raise ConfigError(f"dataset.bad_samples={self.bad_samples!r}: expected one of {BAD_SAMPLE_POLICIES}")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ConfigError(f"dataset.max_skip_fraction={self.max_skip_fraction}: must be in [0, 1] "
                              "(0: any bad sample stops the run)")

    @classmethod
    def of(cls, node: Mapping[str, Any]) -> "SkipPolicy":
        """The policy of a dataset node (its keys absent: the defaults)."""
        default = cls()
        fraction = node.get("max_skip_fraction", default.max_skip_fraction)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise ConfigError(f"dataset.max_skip_fraction={fraction!r}: must be a number in [0, 1]")
        return cls(str(node.get("bad_samples", default.bad_samples)), float(fraction))

    @property
    def skips(self) -> bool:
        return self.bad_samples == "skip"


@dataclass
class SkipCounts:
    """Samples left out at start, by reason (:data:`BAD_REASONS` and :data:`OVERLONG`), out of ``records``
    annotation records (0: no records, e.g. synthetic data)."""

    counts: dict[str, int]
    records: int = 0

    @property
    def bad(self) -> int:
        """Samples the budget counts (every reason but :data:`OVERLONG`)."""
        return sum(n for reason, n in self.counts.items() if reason in BAD_REASONS)

    def __add__(self, other: "SkipCounts") -> "SkipCounts":
        return SkipCounts(add_counts(self.counts, other.counts), self.records + other.records)


def add_counts(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    """Per-reason sums of two count mappings (reasons with 0 dropped)."""
    total = {reason: a.get(reason, 0) + b.get(reason, 0) for reason in {**a, **b}}
    return {reason: n for reason, n in sorted(total.items()) if n}


def check_budget(bad: Mapping[str, int], records: int, limit: float, when: str) -> None:
    """Raises :class:`TooManySkipped` when the bad samples (reasons of :data:`BAD_REASONS` in ``bad``) are more
    than ``limit`` x ``records``."""
    counts = {reason: n for reason, n in bad.items() if reason in BAD_REASONS and n}
    total = sum(counts.values())
    if records and total / records > limit:
        listed = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))
        raise TooManySkipped(f"{when}: {total} of {records} samples are bad ({listed}), more than "
                             f"dataset.max_skip_fraction={limit}; fix or remove them (the log names each one), or "
                             "raise dataset.max_skip_fraction")


def describe(counts: Mapping[str, int]) -> str:
    """``"3 samples skipped: missing_image 2, overlong 1"`` (or ``"no samples skipped"``)."""
    if not any(counts.values()):
        return "no samples skipped"
    return f"{sum(counts.values())} samples skipped: " + ", ".join(f"{r} {n}" for r, n in sorted(counts.items()) if n)


@dataclass(frozen=True)
class DroppedSample:
    """What :class:`DropUnreadable` returns for a sample whose files failed to read in a loader worker; the
    collate leaves it out of its group and counts it. ``pixel_values``: one zero dummy tile (flag 0), the tile
    shape of a micro-batch whose every sample was dropped."""

    sample_id: int
    reason: str
    pixel_values: torch.Tensor


class DropUnreadable(Dataset):
    """``dataset`` (a :class:`~omnibal_pl.data.datasets.ConversationDataset`) under ``bad_samples=skip``: a sample
    whose reading raises :class:`BadSampleError` (its image vanished or does not decode) becomes a
    :class:`DroppedSample` with the same index, logged as a warning."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        try:
            return self.dataset[i]
        except BadSampleError as e:
            log.warning("sample %d dropped from its micro-batch (%s): %s", i, e.reason, e)
            return DroppedSample(int(i), e.reason, dummy_tiles(1, self.dataset.tiling))
