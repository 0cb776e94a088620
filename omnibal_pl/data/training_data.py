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
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from torch.utils.data import Dataset, Subset

from omnibal_pl.balance.config import BalanceConfig
from omnibal_pl.balance.search import CapSearch, resolve_shape
from omnibal_pl.data.length_source import dataset_lengths
from omnibal_pl.data.synthetic import SyntheticDataset
from omnibal_pl.data.templates import TemplateConfig
from omnibal_pl.data.tiling import TilingConfig
from omnibal_pl.data.synthetic_lengths import adapt_to_model, truncate_text
from omnibal_pl.data.validation_split import HeldOut, split_validation, validation_overrides
from omnibal_pl.errors import ConfigError
from omnibal_pl.lengths import LengthTable, load_lengths


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
    (``dataset.val_fraction``; None without validation).
    """

    dataset: Dataset
    lengths: LengthTable
    balance: BalanceConfig
    search: CapSearch
    model: ModelSpec
    val: HeldOut | None = None


def prepare_training_data(dataset: Mapping[str, Any], balance: BalanceConfig, model: ModelSpec) -> TrainingData:
    """The dataset of config ``dataset`` with its statistics and the caps for ``balance.dp`` DP ranks."""
    cfg = dict(dataset)
    check_fits_model(cfg, model)
    image_only = bool(cfg.get("require_image", False))
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
        raw = real_lengths(data, cfg)
        resolved, search = resolve_shape(raw.subset(image_rows(raw)) if image_only else raw, balance)
        if data.max_tokens is None:
            data.max_tokens = resolved.token_cap
        lengths = data.apply_token_cap(raw)
        if image_only:  # after the cap: under overlong=skip the dataset's rows are the samples that fit
            rows = image_rows(lengths)
            data, lengths = Subset(data, rows.tolist()), lengths.subset(rows)
    check_tile_cap(lengths, resolved.vit_cap)
    fraction, separate = float(cfg.get("val_fraction") or 0.0), validation_overrides(cfg)
    if separate:
        if fraction or cfg.get("kind") == "synthetic":
            raise ConfigError(f"dataset.val_{next(iter(separate))}: separate validation files need a real dataset "
                              "(_target_) and no dataset.val_fraction; set one of them")
        return TrainingData(data, lengths, resolved, search, model,
                            separate_validation({**cfg, "paths": None, **separate}, resolved, image_only))
    data, lengths, val = split_validation(data, lengths, fraction, int(cfg.get("seed", 0)))
    return TrainingData(data, lengths, resolved, search, model, val)


def check_fits_model(cfg: Mapping[str, Any], model: ModelSpec) -> None:
    """The dataset node's images must be made for the model's vision family: a Qwen model takes ``tiling.mode:
    qwen`` (tiles = merge blocks of its size, one LLM token each), every other model fixed-size tiles; else a
    :class:`ConfigError` naming the key."""
    qwen = model.merge is not None
    if cfg.get("kind") == "synthetic":
        if qwen:
            raise ConfigError(f"dataset {cfg.get('name')!r} (synthetic) makes fixed-size tiles; the model's vision.family "
                              f"{model.family!r} needs images as patches: use a real dataset with tiling.mode: qwen "
                              "(e.g. dataset=llava_qwen)")
        return
    tiling, template = dict(cfg.get("tiling") or {}), dict(cfg.get("template") or {})
    mode = tiling.get("mode", TilingConfig.mode)
    if (mode == "qwen") != qwen:
        want = "qwen (e.g. dataset=llava_qwen)" if qwen else "internvl or llava (qwen makes Qwen2-VL patches)"
        raise ConfigError(f"dataset.tiling.mode={mode!r} does not fit the model's vision.family {model.family!r}: use {want}")
    if not qwen:
        return
    size, tokens = tiling.get("image_size", TilingConfig.image_size), template.get("tokens_per_tile", TemplateConfig.tokens_per_tile)
    if size != model.image_size:
        raise ConfigError(f"dataset.tiling.image_size={size}: a Qwen tile is one merge block, the model's "
                          f"vision.image_size={model.image_size} px")
    if tokens != model.tokens_per_tile:
        raise ConfigError(f"dataset.template.tokens_per_tile={tokens}: a Qwen merge block is {model.tokens_per_tile} "
                          "LLM token; set it to 1")


def check_tile_cap(lengths: LengthTable, vit_cap: int | None) -> None:
    """A sample with more tiles than the tile cap gets a group of its own that no micro-batch of the cap's shape can
    hold: an error naming the count."""
    if vit_cap and int(lengths.vit.max()) > vit_cap:
        over = int((lengths.vit > vit_cap).sum())
        raise ConfigError(f"{over} samples have more tiles than balance.vit_cap={vit_cap} (largest: "
                          f"{int(lengths.vit.max())}); raise balance.vit_cap or lower the dataset's max_tiles")


def separate_validation(cfg: Mapping[str, Any], resolved: BalanceConfig, image_only: bool) -> HeldOut:
    """The validation dataset of the node ``cfg`` (the training node with its ``val_*`` entries in place), its
    statistics cached next to its data, capped like the training data (the same token cap and tile check)."""
    data = build_dataset(cfg)
    raw = real_lengths(data, cfg)
    if data.max_tokens is None:
        data.max_tokens = resolved.token_cap
    lengths = data.apply_token_cap(raw)
    if image_only:
        rows = image_rows(lengths)
        data, lengths = Subset(data, rows.tolist()), lengths.subset(rows)
    check_tile_cap(lengths, resolved.vit_cap)
    return HeldOut(data, lengths)


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
    from hydra.utils import instantiate

    node = {k: v for k, v in cfg.items()
            if k not in ("name", "kind", "paths", "num_workers", "require_image") and not k.startswith("val_")}
    return instantiate(node, _convert_="object")


def real_lengths(dataset: Any, cfg: Mapping[str, Any]) -> LengthTable:
    """Raw statistics from ``dataset.paths``, or the cache next to the data, computing (and caching) them if
    missing or stale."""
    if cfg.get("paths"):
        return dataset_lengths(cfg)
    anchor = Path(dataset.files[0])
    cache = anchor.with_name(f"{anchor.name}.lengths-{dataset.fingerprint()}.obl")
    if cache.is_file():
        return load_lengths(cache)
    stale = sorted(anchor.parent.glob(f"{anchor.name}.lengths-*.obl"))
    if stale:
        warnings.warn(f"statistics cache {stale[-1]} no longer matches its data; rebuilding {cache}", stacklevel=2)
        for old in stale:
            old.unlink(missing_ok=True)  # another process may have removed it already
    table = dataset.raw_lengths(num_workers=int(cfg.get("num_workers", 0)), progress=True)
    tmp = cache.with_name(f".{os.getpid()}.{cache.name}")
    table.save(tmp)
    tmp.replace(cache)  # atomic: processes starting together never read half a file
    return table

