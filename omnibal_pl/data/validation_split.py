"""The validation data of a run: a held-out split of the training data (``dataset.val_fraction``), or a dataset of
its own (``dataset.val_<key>`` entries, e.g. ``val_annotation``: the training node with those keys replaced).

A seeded random ``fraction`` of the samples (at least one) is held out; the rest is the training data. Both
keep their rows aligned with their statistics, so the validation samples are grouped, balanced and packed
by the same sampler and collate as the training ones, at the same micro-batch shape (the caps are resolved
once, before the split). Validation uses epoch 0's arrangement of the held-out samples every time; the few
samples that arrangement leaves out of its last full step are not validated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from torch.utils.data import Dataset, Subset

from omnibal_pl.errors import ConfigError
from omnibal_pl.lengths import LengthTable


@dataclass
class HeldOut:
    """The validation samples and their statistics (row ``i`` of ``lengths`` describes ``dataset[i]``)."""

    dataset: Dataset
    lengths: LengthTable


def split_validation(dataset: Dataset, lengths: LengthTable, fraction: float,
                     seed: int) -> tuple[Dataset, LengthTable, HeldOut | None]:
    """(training dataset, its statistics, the held-out split); ``fraction`` 0 holds out nothing (None)."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"dataset.val_fraction={fraction}: must be in [0, 1) (0: no validation)")
    if fraction == 0.0:
        return dataset, lengths, None
    n = len(lengths)
    held = max(1, round(fraction * n))
    if held >= n:
        raise ConfigError(f"dataset.val_fraction={fraction} holds out all {n} samples; lower it")
    order = np.random.default_rng(seed).permutation(n)
    val_rows, train_rows = np.sort(order[:held]), np.sort(order[held:])
    held_out = HeldOut(Subset(dataset, val_rows.tolist()), lengths.subset(val_rows))
    return Subset(dataset, train_rows.tolist()), lengths.subset(train_rows), held_out


def validation_overrides(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``{<key>: value}`` of the node's ``val_<key>`` entries other than ``val_fraction`` (``val_annotation``,
    ``val_meta``, ``val_image_root``, ...): the node of a separate validation dataset is the training node with
    these keys replaced; empty when there are none."""
    return {k[len("val_"):]: v for k, v in cfg.items() if k.startswith("val_") and k != "val_fraction" and v is not None}
