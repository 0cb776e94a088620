"""A run's training data, resolved before any Trainer exists: dataset, per-sample statistics and the
micro-batch shape (caps given, or searched once for the run's real DP size).

Order: the dataset is built (synthetic, or a ``_target_`` class); its raw statistics are read from the
cache next to the data or computed and cached (``<file>.lengths-<fingerprint>.obl``, written atomically,
rebuilt with a warning when the data changed); the caps are resolved on them
(:func:`~omnibal_pl.balance.search.resolve_shape`); the token cap becomes the dataset's ``max_tokens``
(its ``overlong`` policy handles longer samples; synthetic texts are truncated). A sample with more
tiles than the tile cap fails here. With ``require_image: true`` in the dataset node only samples with an
image take part (Dynamic-LLaVA trains on the image samples of its mix): the caps are searched on them
and the run's dataset is their subset.

Bad samples (``bad_samples``, ``max_skip_fraction`` in the dataset node; :mod:`~omnibal_pl.data.skips`): the
statistics record the records they cannot read (a second file beside the cache,
``<file>.lengths-<fingerprint>.bad.json``, so a cached run finds the same ones); ``error`` raises the first,
``skip`` leaves them out of the caps search and the dataset's rows, counts them (``TrainingData.skipped``, with
the ``overlong=skip`` ones), logs them and checks the budget.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from torch.utils.data import Dataset, Subset

from omnibal_pl.balance.config import BalanceConfig
from omnibal_pl.balance.search import CapSearch, resolve_shape
from omnibal_pl.data.length_source import dataset_lengths
from omnibal_pl.data.skips import DropUnreadable, SkipCounts, SkipPolicy, check_budget, describe
from omnibal_pl.data.stats import RecordStatistics, compute_statistics
from omnibal_pl.data.synthetic import SyntheticDataset
from omnibal_pl.data.templates import TemplateConfig
from omnibal_pl.data.tiling import TilingConfig
from omnibal_pl.data.synthetic_lengths import adapt_to_model, truncate_text
from omnibal_pl.data.validation_split import HeldOut, split_validation, validation_overrides
from omnibal_pl.errors import ConfigError, OmniBalError
from omnibal_pl.lengths import LengthTable, load_lengths

log = logging.getLogger(__name__)


@dataclass
class ModelSpec:
    """What the data pipeline needs to know of the model: vocabulary, tile size, tokens per tile, and its vision
    family: ``vit`` (fixed-size tiles) or ``qwen2_vl`` / ``qwen2_5_vl`` (patches at each image's resolution; a
    tile is one merge block of ``spatial_merge`` x ``spatial_merge`` patches, one LLM token)."""

    vocab_size: int
    image_size: int
    tokens_per_tile: int
    image_context_id: int
    family: str = "vit"
    spatial_merge: int = 2

    @property
    def merge(self) -> int | None:
        """The collate's ``spatial_merge``: Qwen's merge size; None for fixed-size tiles."""
        return None if self.family == "vit" else self.spatial_merge


@dataclass
class TrainingData:
    """A dataset with its statistics and resolved caps.

    ``lengths`` are the per-sample statistics after the token cap (what the sampler groups);
    ``balance`` has ``vit_cap``/``token_cap`` set (None for the cap-free algorithms) and ``dp`` = the DP size
    they were resolved for; ``search`` says how the caps were found; ``val``: the held-out validation split
    (``dataset.val_fraction``; None without validation); ``skipped``: the samples left out at start, by reason
    (training and separate validation data); ``skip_policy``: the dataset node's bad-sample policy.
    """

    dataset: Dataset
    lengths: LengthTable
    balance: BalanceConfig
    search: CapSearch
    model: ModelSpec
    val: HeldOut | None = None
    skipped: SkipCounts = field(default_factory=lambda: SkipCounts({}))
    skip_policy: SkipPolicy = field(default_factory=SkipPolicy)


def prepare_training_data(dataset: Mapping[str, Any], balance: BalanceConfig, model: ModelSpec) -> TrainingData:
    """The dataset of config ``dataset`` with its statistics and the caps for ``balance.dp`` DP ranks."""
    cfg = dict(dataset)
    check_fits_model(cfg, model)
    image_only = bool(cfg.get("require_image", False))
    policy = SkipPolicy.of(cfg)
    skipped = SkipCounts({})
    if cfg.get("kind") == "synthetic":
        raw = adapt_to_model(dataset_lengths(cfg), model.tokens_per_tile, float(cfg.get("text_scale", 1.0)))
        if image_only:
            raw = raw.subset(image_rows(raw))
        resolved, search = resolve_shape(raw, balance)
        lengths = truncate_text(raw, resolved.token_cap, model.tokens_per_tile) if resolved.token_cap else raw
        data: Dataset = SyntheticDataset(lengths, model.vocab_size, model.image_size, model.tokens_per_tile,
                                         model.image_context_id, seed=int(cfg.get("seed", 0)))
    else:
        data = build_dataset(cfg)
        raw, bad = usable_statistics(data, cfg, policy)
        searched = raw.subset(np.setdiff1d(np.arange(len(raw)), list(bad)))  # bad rows are placeholders
        resolved, search = resolve_shape(searched.subset(image_rows(searched)) if image_only else searched, balance)
        if data.max_tokens is None:
            data.max_tokens = resolved.token_cap
        data, lengths, skipped = cap_and_skip(data, raw, bad, policy, image_only)
    check_tile_cap(lengths, resolved.vit_cap)
    fraction, separate = float(cfg.get("val_fraction") or 0.0), validation_overrides(cfg)
    if separate:
        if fraction or cfg.get("kind") == "synthetic":
            raise ConfigError(f"dataset.val_{next(iter(separate))}: separate validation files need a real dataset "
                              "(_target_) and no dataset.val_fraction; set one of them")
        val, val_skipped = separate_validation({**cfg, "paths": None, **separate}, resolved, image_only, policy)
        skipped = checked_skips(skipped + val_skipped, policy)
        return TrainingData(data, lengths, resolved, search, model, val, skipped, policy)
    data, lengths, val = split_validation(data, lengths, fraction, int(cfg.get("seed", 0)))
    return TrainingData(data, lengths, resolved, search, model, val, checked_skips(skipped, policy), policy)


def check_fits_model(cfg: Mapping[str, Any], model: ModelSpec) -> None:
    """The dataset node's images must be made for the model's vision family: a Qwen model takes ``tiling.mode:
    qwen`` (tiles = merge blocks of its size, one LLM token each), every other model fixed-size tiles; else a
    :class:`ConfigError` naming the key."""
    qwen = model.merge is not None
    if cfg.get("kind") == "synthetic":
        if qwen:
            raise ConfigError(f"dataset {cfg.get('name')!r} (synthetic) makes fixed-size tiles; the model's vision.family "
                              f"{model.family!r} needs images as patches: use a real dataset with tiling.mode: qwen "
                              "(dataset=llava_qwen or chat_qwen)")
        return
    tiling, template = dict(cfg.get("tiling") or {}), dict(cfg.get("template") or {})
    mode = tiling.get("mode", TilingConfig.mode)
    if (mode == "qwen") != qwen:
        want = "qwen (dataset=llava_qwen or chat_qwen)" if qwen else "internvl or llava (qwen makes Qwen2-VL patches)"
        raise ConfigError(f"dataset.tiling.mode={mode!r} does not fit the model's vision.family {model.family!r}: use {want}")
    if not qwen:
        return
    size, tokens = tiling.get("image_size", TilingConfig.image_size), template.get("tokens_per_tile", TemplateConfig.tokens_per_tile)
    if size != model.image_size:
        raise ConfigError(f"dataset.tiling.image_size={size}: a Qwen tile is one merge block, the model's "
                          f"vision.image_size={model.image_size} px")
    if tokens != model.tokens_per_tile:
        raise ConfigError(f"dataset.template.tokens_per_tile={tokens}: a Qwen merge block is one LLM token; set it "
                          f"to the model's tokens_per_tile, {model.tokens_per_tile}")


def check_tile_cap(lengths: LengthTable, vit_cap: int | None) -> None:
    """A sample with more tiles than the tile cap gets a group of its own that no micro-batch of the cap's shape can
    hold: an error naming the count."""
    if vit_cap and int(lengths.vit.max()) > vit_cap:
        over = int((lengths.vit > vit_cap).sum())
        raise ConfigError(f"{over} samples have more tiles than balance.vit_cap={vit_cap} (largest: "
                          f"{int(lengths.vit.max())}); raise balance.vit_cap or lower the dataset's max_tiles")


def separate_validation(cfg: Mapping[str, Any], resolved: BalanceConfig, image_only: bool,
                        policy: SkipPolicy) -> tuple[HeldOut, SkipCounts]:
    """The validation dataset of the node ``cfg`` (the training node with its ``val_*`` entries in place), its
    statistics cached next to its data, capped like the training data (the same token cap and tile check),
    bad samples handled by the same ``policy``; and its samples left out."""
    data = build_dataset(cfg)
    raw, bad = usable_statistics(data, cfg, policy)
    if data.max_tokens is None:
        data.max_tokens = resolved.token_cap
    data, lengths, skipped = cap_and_skip(data, raw, bad, policy, image_only)
    check_tile_cap(lengths, resolved.vit_cap)
    return HeldOut(data, lengths), skipped


def usable_statistics(data: Any, cfg: Mapping[str, Any], policy: SkipPolicy) -> tuple[LengthTable, dict[int, str]]:
    """The raw statistics of a real dataset and its bad records (record -> reason), whose rows are placeholders;
    under ``bad_samples=error`` the first bad record is raised instead, naming it."""
    stats = real_statistics(data, cfg)
    if not policy.skips:
        stats.raise_first_bad(f"; or set dataset.bad_samples=skip to leave bad samples out (they are counted and "
                              f"held to dataset.max_skip_fraction). Once the files are fixed, delete the cached "
                              f"statistics {Path(data.files[0]).name}.lengths-*.obl and .bad.json beside the data")
    for r, b in list(stats.bad.items())[:10]:
        log.warning("left out (%s): %s", b.reason, b.message)
    if len(stats.bad) > 10:
        log.warning("... and %d more bad samples left out", len(stats.bad) - 10)
    return stats.table, {r: b.reason for r, b in stats.bad.items()}


def cap_and_skip(data: Any, raw: LengthTable, bad: dict[int, str], policy: SkipPolicy,
                 image_only: bool) -> tuple[Dataset, LengthTable, SkipCounts]:
    """The dataset and statistics of the rows kept (token cap applied, ``bad`` records left out, image samples
    only under ``require_image``) and the samples left out by reason. Under ``bad_samples=skip`` the dataset
    drops a sample whose image fails to decode in a loader worker (:class:`~omnibal_pl.data.skips.DropUnreadable`)."""
    lengths = data.apply_token_cap(raw, bad)
    skipped = SkipCounts({reason: len(keys) for reason, keys in data.skip_report.skipped.items()}, data.num_records)
    if policy.skips:
        data = DropUnreadable(data)
    if image_only:  # after the cap: under overlong=skip the dataset's rows are the samples that fit
        rows = image_rows(lengths)
        data, lengths = Subset(data, rows.tolist()), lengths.subset(rows)
    return data, lengths, skipped


def checked_skips(skipped: SkipCounts, policy: SkipPolicy) -> SkipCounts:
    """``skipped``, logged, once held to ``policy.max_skip_fraction`` (:class:`~omnibal_pl.data.skips.TooManySkipped`)."""
    if skipped.counts:
        log.warning("%s (of %d records)", describe(skipped.counts), skipped.records)
    check_budget(skipped.counts, skipped.records, policy.max_skip_fraction, "at start")
    return skipped


def image_rows(lengths: LengthTable) -> np.ndarray:
    """Rows of the samples with at least one real image tile (``dataset.require_image``)."""
    rows = np.flatnonzero(lengths.image_flag > 0)
    if rows.size == 0:
        raise ConfigError("dataset.require_image is true but no sample has an image; set it false or use image data")
    return rows


def build_dataset(cfg: Mapping[str, Any]) -> Dataset:
    """A real dataset from its Hydra node (``_target_``: ``LlavaDataset``, ``InternVLDataset``)."""
    if "_target_" not in cfg:
        raise ConfigError(f"dataset {cfg.get('name')!r}: give kind: synthetic or a _target_ "
                          "dataset class (see conf/dataset/llava.yaml, internvl.yaml)")
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    node = {k: v for k, v in cfg.items() if k not in ("name", "kind", "paths", "num_workers", "require_image",
                                                      "bad_samples", "max_skip_fraction") and not k.startswith("val_")}
    try:
        return instantiate(node, _convert_="object")
    except InstantiationException as e:
        if isinstance(e.__cause__, OmniBalError):  # the data's own error (a malformed line: file:line), unwrapped
            raise e.__cause__ from None
        raise


def real_statistics(dataset: Any, cfg: Mapping[str, Any]) -> RecordStatistics:
    """Raw statistics from ``dataset.paths`` (no bad records known), or the cache next to the data, computing
    (and caching) them if missing or stale. The bad records are cached beside the table
    (:func:`bad_records_file`; written first, so a table on disk always has its bad records beside it)."""
    if cfg.get("paths"):
        return RecordStatistics(dataset_lengths(cfg))
    anchor = Path(dataset.files[0])
    cache = anchor.with_name(f"{anchor.name}.lengths-{dataset.fingerprint()}.obl")
    if cache.is_file():
        bad = bad_records_file(cache)
        return RecordStatistics(load_lengths(cache), RecordStatistics.load_bad(bad) if bad.is_file() else {})
    stale = sorted(anchor.parent.glob(f"{anchor.name}.lengths-*.obl"))
    if stale:
        warnings.warn(f"statistics cache {stale[-1]} no longer matches its data; rebuilding {cache}", stacklevel=2)
        for old in stale:
            old.unlink(missing_ok=True)  # another process may have removed it already
            bad_records_file(old).unlink(missing_ok=True)
    stats = compute_statistics(dataset, num_workers=int(cfg.get("num_workers", 0)), progress=True)
    bad = bad_records_file(cache)
    if stats.bad:
        tmp = bad.with_name(f".{os.getpid()}.{bad.name}")
        stats.save_bad(tmp)
        tmp.replace(bad)
    else:
        bad.unlink(missing_ok=True)  # left by a run killed between the two files
    tmp = cache.with_name(f".{os.getpid()}.{cache.name}")
    stats.table.save(tmp)
    tmp.replace(cache)  # atomic: processes starting together never read half a file
    return stats


def bad_records_file(cache: Path) -> Path:
    """The file of the bad records beside the statistics cache ``<file>.lengths-<fingerprint>.obl``."""
    return cache.with_suffix(".bad.json")

