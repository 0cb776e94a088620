"""Conversation datasets (LLaVA-1.5 and InternVL formats) producing :class:`Sample` s.

Row ``i`` of a dataset is one sample: its tiles (images tiled per :class:`TilingConfig`; a text-only
sample gets one zero dummy tile with flag 0) and its tokens (chat template, each ``<image>`` expanded to
``tokens_per_tile x tiles`` image-context tokens).

Token cap (``max_tokens``, usually the balance token cap) with policy ``overlong``:
``error`` (raise, naming the samples), ``truncate`` (keep the first ``max_tokens`` tokens, as the
originals' tokenizer truncation does; a sample whose image tokens do not all fit in them is refused
by :meth:`~ConversationDataset.lengths`, naming it, since a cut image breaks the tile/token contract)
or ``skip`` (leave the sample out; :attr:`ConversationDataset.skip_report` says which).
Skipping changes the row numbering, so it is applied by :meth:`~ConversationDataset.apply_token_cap`
(called by :meth:`~ConversationDataset.lengths`) before samples are read.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from omnibal_pl.data.records import Record, read_annotation, read_internvl_meta
from omnibal_pl.data.skips import (BAD_CONVERSATION, MALFORMED_ROW, MISSING_IMAGE, OVERLONG, UNREADABLE_IMAGE,
                                   UNUSABLE_IMAGE, BadSampleError)
from omnibal_pl.data.stats import compute_lengths
from omnibal_pl.data.templates import ChatTokenizer, TemplateConfig, TextTokenizer, load_tokenizer
from omnibal_pl.data.tiling import TilingConfig, count_tiles, dummy_tiles, patch_grid, tile_image
from omnibal_pl.errors import ConfigError, DataError
from omnibal_pl.lengths import LengthTable
from omnibal_pl.pixels import PixelNorm

OVERLONG_POLICIES = ("error", "skip", "truncate")
# Part of every statistics fingerprint: bump it when the code changes the tiles or tokens a record gets
# for the same files and configuration (2: InternVL's own formats and multi-image tile range, issue 18).
LENGTHS_VERSION = 2


@dataclass
class Sample:
    """One training sample. ``n`` tokens, ``t`` tiles (``t >= 1``; ``image_flags`` marks real tiles).

    The ``image_context_id`` positions of ``input_ids`` hold ``tokens_per_tile`` features of each
    flagged tile, in tile order. ``labels`` is -100 where no loss is taken. Qwen's images (tiling mode
    ``qwen``): a tile is one merge block of 4 patch rows, ``image_grids`` the (t, h, w) patch grid of each image.
    """

    input_ids: torch.Tensor  # [n] int64
    labels: torch.Tensor  # [n] int64
    pixel_values: torch.Tensor  # [t, 3, H, W] float32; Qwen: [t, 4, 3 * 2 * 14 * 14] (merge blocks of patches)
    image_flags: torch.Tensor  # [t] int64
    sample_id: int
    image_grids: tuple[tuple[int, int, int], ...] = ()  # Qwen only: one per image, in order

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tiles(self) -> int:
        return int(self.pixel_values.shape[0])


@dataclass
class SkipReport:
    """Samples left out, by reason: ``{reason: [record keys]}``."""

    skipped: dict[str, list[str]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def __str__(self) -> str:
        if not self.skipped:
            return "no samples skipped"
        return "; ".join(f"{len(keys)} skipped ({reason}): {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
                         for reason, keys in self.skipped.items())


class ConversationDataset(torch.utils.data.Dataset):
    """Samples from annotation records: images tiled, conversation tokenised (see the module docstring).

    ``sources``: names indexed by ``Record.source``; ``files``: the annotation files the records came
    from (for :meth:`fingerprint`).
    """

    def __init__(
        self,
        records: list[Record],
        sources: list[str],
        tokenizer: str | Path | TextTokenizer,
        template: TemplateConfig,
        tiling: TilingConfig,
        max_tokens: int | None = None,
        overlong: str = "error",
        files: Sequence[Path] = (),
    ) -> None:
        if not records:
            raise DataError(f"dataset {sources}: no samples; check the annotation files (and repeat_time)")
        if overlong not in OVERLONG_POLICIES:
            raise ConfigError(f"overlong={overlong!r}: expected one of {OVERLONG_POLICIES}")
        if max_tokens is not None and max_tokens < 1:
            raise ConfigError(f"max_tokens={max_tokens}: must be >= 1 or null")
        self.records = records
        self.sources = list(sources)
        self.files = [Path(f) for f in files]
        tok = tokenizer if isinstance(tokenizer, TextTokenizer) else load_tokenizer(tokenizer)
        self.chat = ChatTokenizer(tok, template)
        self.tiling = tiling
        self.max_tokens = max_tokens
        self.overlong = overlong
        self.index = np.arange(len(records))  # dataset row -> record
        self.skip_report = SkipReport()

    # ------------------------------------------------------------------ statistics
    @property
    def num_records(self) -> int:
        return len(self.records)

    def record_lengths(self, r: int) -> tuple[int, int, int, int]:
        """``(vit, tokens, image_flag, source)`` of record ``r``, uncapped, reading image headers only."""
        tiles, ids = self._record_tokens(r)
        return max(1, sum(tiles)), len(ids), sum(tiles), self.records[r].source

    def fingerprint(self) -> str:
        """A short hash of what the statistics depend on: the annotation ``files`` (path, size, mtime), which
        records were taken (repeat_time subsamples), the chat format's definition, the template config, the
        tokenizer's full definition, the tiling config and :data:`LENGTHS_VERSION`. Key a statistics cache
        with it. Image files are not included
        (checking them costs as much as recomputing): replacing an image in place needs a manual rebuild.
        """
        h = hashlib.sha256()
        for f in self.files:
            st = f.stat() if f.is_file() else None
            h.update(f"{f.resolve()}|{st and st.st_size}|{st and st.st_mtime_ns}\n".encode())
        h.update("\n".join(r.origin for r in self.records).encode())
        h.update(f"{LENGTHS_VERSION}|{self.chat.fingerprint()}|{self.tiling!r}".encode())
        return h.hexdigest()[:16]

    def raw_lengths(self, num_workers: int = 0, progress: bool = False) -> LengthTable:
        """Uncapped statistics, one row per record (what ``omnibal-stats`` writes)."""
        return compute_lengths(self, num_workers=num_workers, progress=progress)

    def apply_token_cap(self, raw: LengthTable, bad: Mapping[int, str] | None = None) -> LengthTable:
        """Applies ``max_tokens``/``overlong`` to the records' raw statistics and leaves out the ``bad`` records
        (record -> reason, see :mod:`~omnibal_pl.data.skips`; their rows of ``raw`` are placeholders); returns
        the table of the rows.

        The dataset's rows become the records kept (see :attr:`skip_report`: reasons ``overlong`` and the bad ones).
        """
        if len(raw) != self.num_records:
            raise DataError(f"statistics have {len(raw)} rows but the dataset has {self.num_records} records; "
                            "they belong to other data: recompute them (omnibal-stats)")
        self.index = np.arange(self.num_records)
        self.skip_report = SkipReport()
        bad = dict(bad or {})
        for r in sorted(bad):
            self.skip_report.skipped.setdefault(bad[r], []).append(self.records[r].key)
        cap = self.max_tokens
        over = np.flatnonzero(raw.tokens > cap) if cap is not None else np.empty(0, np.int64)
        table, drop = raw, np.asarray(sorted(bad), np.int64)
        if over.size:
            keys = [self.records[r].key for r in over]
            if self.overlong == "error":
                shown = "; ".join(f"{self.records[r].origin} (id {self.records[r].key})" for r in over[:10])
                raise DataError(f"{len(keys)} samples are longer than max_tokens={cap}: {shown}"
                                f"{' ...' if len(keys) > 10 else ''}; raise max_tokens or set overlong=skip or "
                                "overlong=truncate")
            if self.overlong == "truncate":
                cut = [self.records[r].key for r in over if raw.image_flag[r] and self._image_end(int(r)) > cap]
                if cut:
                    raise DataError(f"{len(cut)} samples have image tokens beyond the first max_tokens={cap} tokens, "
                                    f"which truncation keeps: {', '.join(cut[:10])}{' ...' if len(cut) > 10 else ''}; an "
                                    "image is never cut: raise max_tokens, lower tiling.max_tiles or set overlong=skip")
                table = LengthTable(raw.vit, np.minimum(raw.tokens, cap), raw.image_flag, raw.source, raw.sources)
            else:
                drop = np.union1d(drop, over)
                self.skip_report.skipped[OVERLONG] = keys
        if drop.size == 0:
            return table
        keep = np.setdiff1d(np.arange(self.num_records), drop)
        if keep.size == 0:
            raise DataError(f"every sample was left out ({self.skip_report}): nothing left to train on")
        self.index = keep
        return table.subset(keep)

    def lengths(self, num_workers: int = 0, progress: bool = False) -> LengthTable:
        """Statistics of the dataset's rows, cap policy applied: row ``i`` matches ``self[i]``."""
        return self.apply_token_cap(self.raw_lengths(num_workers, progress))

    # ------------------------------------------------------------------ samples
    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Sample:
        rec = self.records[int(self.index[i])]
        pixels, sizes = [], []
        for path in rec.images:  # decoded inside tile_image, at the scale its tiles need (tiling.reduced_decode)
            with _image_errors(path, rec.origin), Image.open(path) as image:
                sizes.append(image.size)
                pixels.append(tile_image(image, self.tiling, len(rec.images)))
        ids, labels = self.chat(rec.conversations, [p.shape[0] for p in pixels], rec.origin)
        ids, labels = self._fit_cap(ids, labels, rec)
        if pixels:
            pixel_values = pixels[0] if len(pixels) == 1 else torch.cat(pixels)
            flags = torch.ones(pixel_values.shape[0], dtype=torch.int64)
        else:
            pixel_values = dummy_tiles(1, self.tiling)
            flags = torch.zeros(1, dtype=torch.int64)
        grids = tuple(patch_grid(w, h, self.tiling) for w, h in sizes) if self.tiling.mode == "qwen" else ()
        return Sample(torch.from_numpy(ids), torch.from_numpy(labels), pixel_values, flags, int(i), grids)

    def _tiles_per_image(self, rec: Record) -> list[int]:
        """Tiles of each image of ``rec`` from its header; an image the tiling cannot take (Qwen: more than 200
        times longer than wide) is a bad sample naming the record and the file."""
        sizes = [_image_size(p, rec.origin) for p in rec.images]
        tiles = []
        for path, (w, h) in zip(rec.images, sizes):
            try:
                tiles.append(count_tiles(w, h, self.tiling, len(sizes)))
            except DataError as e:
                raise BadSampleError(f"{rec.origin}: image file {path}: {e}", UNUSABLE_IMAGE) from e
        return tiles

    def _record_tokens(self, r: int) -> tuple[list[int], np.ndarray]:
        """Tiles per image (from image headers) and the uncapped ``input_ids`` of record ``r``; a record that
        cannot be read raises :class:`~omnibal_pl.data.skips.BadSampleError` with its reason."""
        rec = self.records[r]
        if rec.problem is not None:
            raise BadSampleError(rec.problem, MALFORMED_ROW)
        tiles = self._tiles_per_image(rec)
        try:
            return tiles, self.chat(rec.conversations, tiles, rec.origin)[0]
        except DataError as e:
            raise BadSampleError(str(e), BAD_CONVERSATION) from e

    def _image_end(self, r: int) -> int:
        """How many leading tokens of record ``r`` hold all its image tokens (0 without images)."""
        image = np.flatnonzero(np.isin(self._record_tokens(r)[1], self.chat.image_token_ids))
        return int(image[-1]) + 1 if image.size else 0

    def _fit_cap(self, ids: np.ndarray, labels: np.ndarray, rec: Record) -> tuple[np.ndarray, np.ndarray]:
        cap = self.max_tokens
        if cap is None or len(ids) <= cap:
            return ids, labels
        if self.overlong != "truncate":
            hint = "it should have been skipped: call lengths() or apply_token_cap() first" if self.overlong == "skip" else \
                "raise max_tokens or set overlong=skip or overlong=truncate"
            raise DataError(f"{rec.origin} (id {rec.key}): {len(ids)} tokens > max_tokens={cap}; {hint}")
        if np.isin(ids[cap:], self.chat.image_token_ids).any():
            raise DataError(f"{rec.origin} (id {rec.key}): image tokens beyond the first max_tokens={cap} tokens; "
                            "lengths() refuses such samples: call it (or apply_token_cap()) before reading samples")
        return ids[:cap], labels[:cap]


class LlavaDataset(ConversationDataset):
    """LLaVA-1.5 format: a JSON list (or ``.jsonl``) of ``{id, image (path | [paths]), conversations}``.

    Image paths are relative to ``image_root`` (default: the annotation's folder).
    """

    def __init__(
        self,
        annotation: str | Path,
        tokenizer: str | Path | TextTokenizer,
        template: TemplateConfig,
        tiling: TilingConfig,
        image_root: str | Path | None = None,
        max_tokens: int | None = None,
        overlong: str = "error",
    ) -> None:
        records = read_annotation(annotation, image_root)
        super().__init__(records, [Path(annotation).stem], tokenizer, template, tiling, max_tokens, overlong, [Path(annotation)])


class InternVLDataset(ConversationDataset):
    """InternVL format: a meta JSON ``{name: {root, annotation (JSONL), repeat_time, length}}``.

    Each name is one source of the length table; ``seed`` fixes the subsample of fractional repeat_time.
    """

    def __init__(
        self,
        meta: str | Path,
        tokenizer: str | Path | TextTokenizer,
        template: TemplateConfig,
        tiling: TilingConfig,
        max_tokens: int | None = None,
        overlong: str = "error",
        seed: int = 0,
    ) -> None:
        records, names, files = read_internvl_meta(meta, seed)
        super().__init__(records, names, tokenizer, template, tiling, max_tokens, overlong, files)


def pixel_norm_of(dataset: torch.utils.data.Dataset) -> PixelNorm | None:
    """The (mean, std) the model normalises the ``uint8`` tiles of ``dataset`` with (``tiling.pixels: uint8``); None
    when its tiles arrive normalised. Wrappers holding the dataset as ``.dataset`` (``Subset``, the bad-sample
    filter) are looked through."""
    while not isinstance(dataset, ConversationDataset) and isinstance(getattr(dataset, "dataset", None), torch.utils.data.Dataset):
        dataset = dataset.dataset
    return dataset.tiling.pixel_norm if isinstance(dataset, ConversationDataset) else None


def _image_size(path: Path, origin: str) -> tuple[int, int]:
    """(width, height) from the file header; no pixel decoding."""
    with _image_errors(path, origin), Image.open(path) as im:
        return im.size


@contextmanager
def _image_errors(path: Path, origin: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        raise BadSampleError(f"{origin}: image file {path} not found; fix the path or the image root",
                             MISSING_IMAGE) from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadSampleError(f"{origin}: image file {path} is corrupt or unreadable ({e}); replace or remove it",
                             UNREADABLE_IMAGE) from e
