"""Packing collate: one balanced group of samples -> one :class:`PackedBatch` (varlen, fixed shapes).

Samples are laid end to end in group order: tokens along one sequence (``cu_seqlens`` marks where each
sample starts, ``position_ids`` restart per sample), tiles along the tile dimension. The token dimension
is padded per ``pad_to``; the tile dimension to ``vit_cap`` with zero tiles of flag 0 when ``pad_to`` is
``cap`` (static shapes), else not at all (padding tiles would cost a full ViT pass each). Labels stay
aligned with ``input_ids`` (unshifted, HF convention); every sample starts with an unsupervised token.
The batch carries its host facts (segment lengths, real tiles, image-context tokens), counted here on the
CPU so the training step reads no device tensor for them.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.data import Dataset

from omnibal_pl.batch import IGNORE_INDEX, PackedBatch
from omnibal_pl.data.datasets import Sample
from omnibal_pl.data.skips import DroppedSample
from omnibal_pl.errors import ConfigError, DataError
from omnibal_pl.pixels import PixelNorm
from omnibal_pl.qwen_batch import QwenPackedBatch, QwenVisionFields, pack_qwen_vision

PAD_MODES = ("cap", "multiple", "none")
LOSS_WEIGHTINGS = ("token", "sample", "square")


@dataclass
class PackingCollate:
    """Packs a group (a list of :class:`Sample`) into a :class:`PackedBatch`.

    ``token_cap``/``vit_cap``: the group caps (Q_t tokens, Q_v tiles); a group over either raises
    :class:`DataError`. ``pad_to``: ``cap`` (L = token_cap), ``multiple`` (L = the group's tokens rounded
    up to ``multiple``, at most token_cap) or ``none`` (L = the group's tokens). ``loss_weighting``:
    per supervised token 1 (``token``), 1/n (``sample``) or 1/sqrt(n) (``square``), n = supervised
    tokens of its sample; the loss divides by the global weight sum. ``image_context_id`` and
    ``tokens_per_tile``, when both given, check that each sample has ``tokens_per_tile`` image tokens per
    flagged tile (the contract the model relies on). ``spatial_merge`` (Qwen2-VL / Qwen2.5-VL; None: fixed-size
    tiles): a tile is one merge block of ``spatial_merge^2`` patch rows and the batch a :class:`QwenPackedBatch`
    (:mod:`omnibal_pl.qwen_batch`): the real blocks first, padding blocks to ``vit_cap`` under ``pad_to: cap``
    (else one dummy block for a group without images), M-RoPE positions from ``image_context_id``. ``pixel_norm``:
    the samples' tiles are ``uint8`` (``tiling.pixels: uint8``) and the batch carries the (mean, std) the model
    normalises them with on the device. A :class:`~omnibal_pl.data.skips.DroppedSample` in the group
    (a sample whose image failed to decode, under ``dataset.bad_samples=skip``) is left out of the batch and
    counted in its ``skipped``; a group of nothing else becomes a micro-batch of padding only (no sample, its
    dummy tile's shape; Qwen: padding blocks, no image), so every DP rank still runs the step.
    """

    token_cap: int
    vit_cap: int
    pad_to: str = "cap"
    multiple: int = 64
    loss_weighting: str = "token"
    pad_token_id: int = 0
    image_context_id: int | None = None
    tokens_per_tile: int | None = None
    spatial_merge: int | None = None
    pixel_norm: PixelNorm | None = None

    def __post_init__(self) -> None:
        if self.spatial_merge is not None and (self.spatial_merge < 1 or self.image_context_id is None):
            raise ConfigError(f"spatial_merge={self.spatial_merge}: Qwen packing needs spatial_merge >= 1 and the "
                              "image_context_id its M-RoPE positions are placed by")
        if self.pad_to not in PAD_MODES:
            raise ConfigError(f"pad_to={self.pad_to!r}: expected one of {PAD_MODES}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"loss_weighting={self.loss_weighting!r}: expected one of {LOSS_WEIGHTINGS}")
        if self.token_cap < 1 or self.vit_cap < 1 or self.multiple < 1:
            raise ConfigError(f"token_cap={self.token_cap}, vit_cap={self.vit_cap}, multiple={self.multiple}: must be >= 1")

    def __call__(self, samples: Sequence[Sample | DroppedSample]) -> PackedBatch:
        if not samples:
            raise DataError("packing an empty group: the sampler yielded a group with no samples")
        dropped = [s for s in samples if isinstance(s, DroppedSample)]
        samples = [s for s in samples if not isinstance(s, DroppedSample)]
        skipped: dict[str, int] = {}
        for d in dropped:
            skipped[d.reason] = skipped.get(d.reason, 0) + 1
        lengths = [s.num_tokens for s in samples]
        n_tokens, n_tiles = sum(lengths), sum(s.num_tiles for s in samples)
        ids = [s.sample_id for s in samples]
        if n_tokens > self.token_cap:
            raise DataError(f"group {ids} has {n_tokens} tokens > token cap {self.token_cap}; the grouping must respect "
                            "the token cap (or raise it)")
        if n_tiles > self.vit_cap:
            raise DataError(f"group {ids} has {n_tiles} tiles > tile cap {self.vit_cap}; the grouping must respect "
                            "the tile cap (or raise it)")
        self._check_image_tokens(samples)
        length = max(self._padded_length(n_tokens), 1)  # 0 only for a group of dropped samples: one padding token
        pad = length - n_tokens

        input_ids = torch.full((length,), self.pad_token_id, dtype=torch.int64)
        labels = torch.full((length,), IGNORE_INDEX, dtype=torch.int64)
        loss_weight = torch.zeros(length, dtype=torch.float32)
        segments = lengths + ([pad] if pad else [])
        cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(segments), 0)
        for k, s in enumerate(samples):
            a, b = int(cu[k]), int(cu[k + 1])
            input_ids[a:b] = s.input_ids
            labels[a:b] = s.labels
            supervised = s.labels != IGNORE_INDEX
            loss_weight[a:b] = supervised * self._weight(int(supervised.sum()))

        first = (samples or dropped)[0].pixel_values  # the tile (Qwen: patch row) shape of the padding
        if self.spatial_merge:
            vision = self._qwen_vision(samples, length, first.shape[-1])
            make = functools.partial(QwenPackedBatch, image_grids=vision.image_grids)
            position_ids, pixel_values, image_flags = vision.position_ids, vision.pixel_values, vision.image_flags
        else:
            if (first.dtype == torch.uint8) != (self.pixel_norm is not None):
                raise DataError(f"samples with {first.dtype} tiles but pixel_norm={self.pixel_norm}: uint8 tiles "
                                "(tiling.pixels=uint8) need the (mean, std) the model normalises them with, float ones none")
            n_tile_rows = self.vit_cap if self.pad_to == "cap" else max(n_tiles, 1)
            pixel_values = first.new_zeros(n_tile_rows, *first.shape[1:])
            image_flags = torch.zeros(n_tile_rows, dtype=torch.int64)
            if samples:
                pixel_values[:n_tiles] = torch.cat([s.pixel_values for s in samples])
                image_flags[:n_tiles] = torch.cat([s.image_flags for s in samples])
            make, position_ids = PackedBatch, torch.cat([torch.arange(n) for n in segments])[None]  # restart per segment
        return make(
            input_ids=input_ids[None],
            labels=labels[None],
            position_ids=position_ids,
            cu_seqlens=cu,
            max_seqlen=max(segments),
            pixel_values=pixel_values,
            image_flags=image_flags,
            loss_weight=loss_weight[None],
            sample_ids=torch.tensor(ids, dtype=torch.int64),
            num_samples=len(samples),
            seqlens=tuple(segments),
            num_tiles=int((image_flags == 1).sum()),
            image_tokens=self._count_image_tokens(input_ids),
            skipped=skipped,
            pixel_norm=self.pixel_norm,
        )

    def _qwen_vision(self, samples: Sequence[Sample], length: int, patch_dim: int) -> QwenVisionFields:
        """M-RoPE positions [3, length] and the real merge blocks' patch rows of ``samples`` (a text-only sample's
        dummy block left out), padded to the block cap."""
        blocks = [s.pixel_values[s.image_flags == 1] for s in samples]  # [b_k, m^2, patch dim]
        real = sum(b.shape[0] for b in blocks)
        cap = self.vit_cap if self.pad_to == "cap" else max(real, 1)  # a group without images still runs the encoder
        return pack_qwen_vision([s.input_ids for s in samples], [b.flatten(0, 1) for b in blocks],
                                [s.image_grids for s in samples], self.image_context_id, self.spatial_merge, length, cap,
                                patch_dim)

    def _padded_length(self, n_tokens: int) -> int:
        if self.pad_to == "cap":
            return self.token_cap
        if self.pad_to == "multiple":
            return min(math.ceil(n_tokens / self.multiple) * self.multiple, self.token_cap)
        return n_tokens

    def _weight(self, n: int) -> float:
        if n == 0 or self.loss_weighting == "token":
            return 1.0
        return 1.0 / n if self.loss_weighting == "sample" else 1.0 / math.sqrt(n)

    def _count_image_tokens(self, input_ids: torch.Tensor) -> int | None:
        """Positions of ``input_ids`` (a host tensor) holding ``image_context_id``; None when it is not given."""
        return None if self.image_context_id is None else int((input_ids == self.image_context_id).sum())

    def _check_image_tokens(self, samples: Sequence[Sample]) -> None:
        if self.image_context_id is None or self.tokens_per_tile is None:
            return
        for s in samples:
            have = int((s.input_ids == self.image_context_id).sum())
            want = int(s.image_flags.sum()) * self.tokens_per_tile
            if have != want:
                raise DataError(f"sample {s.sample_id}: {have} image-context tokens but {int(s.image_flags.sum())} real "
                                f"tiles x {self.tokens_per_tile} tokens_per_tile = {want}; dataset and model disagree "
                                "on tokens_per_tile or image_context_id")


class GroupsDataset(Dataset):
    """``dataset`` indexed by a whole group: ``groups[[3, 7, 9]]`` is the list of those samples. Lets a
    DataLoader whose batch sampler yields a step's groups (lists of lists) fetch them group by group."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, group: Sequence[int]) -> list[Sample]:
        return [self.dataset[i] for i in group]

    def __len__(self) -> int:
        return len(self.dataset)


class StepCollate:
    """Collates a step's groups (from :class:`GroupsDataset`) into its list of packed micro-batches."""

    def __init__(self, collate: PackingCollate) -> None:
        self.collate = collate

    def __call__(self, groups: Sequence[Sequence[Sample]]) -> list[PackedBatch]:
        return [self.collate(group) for group in groups]
