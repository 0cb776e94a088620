"""Per-sample length statistics: how much vision work (tiles) and LLM work (tokens) each sample carries.

A :class:`LengthTable` is columnar: one numpy array per field, row ``i`` is sample ``i`` of the
dataset. It is the only input the balance algorithms see.

Formats read and written here:

- OmniBal's JSON list ``[{"vit_num": int, "token_num": int, "image_flags": int}, ...]``;
- OmniBal's wrapper JSON ``{name: {"token_lengths": path, ...}, ...}`` naming several such lists
  (relative paths are resolved against the wrapper's folder);
- our compact binary format (``.obl``): a small JSON header followed by the raw little-endian columns,
  so a million rows load in a few milliseconds.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from omnibal_pl.errors import LengthDataError

BINARY_SUFFIX = ".obl"
_MAGIC = b"OMNIBAL-LENGTHS\x00"
_VERSION = 1
_COLUMNS = ("vit", "tokens", "image_flag", "source")
_DTYPES = {"vit": "<i4", "tokens": "<i4", "image_flag": "<i4", "source": "<i2"}
_JSON_KEYS = (("vit_num", "vit"), ("token_num", "tokens"), ("image_flags", "image_flag"))


@dataclass
class LengthTable:
    """Columnar per-sample statistics.

    Invariants (checked by :meth:`validate`): all columns have one row per sample; ``vit >= 1``
    (a text-only sample carries one dummy tile); ``tokens >= 1`` (LLM length, image tokens included);
    ``0 <= image_flag <= vit`` (real tiles); ``source`` indexes ``sources``.
    """

    vit: np.ndarray
    tokens: np.ndarray
    image_flag: np.ndarray
    source: np.ndarray
    sources: list[str] = field(default_factory=lambda: ["default"])

    def __post_init__(self) -> None:
        self.vit = np.ascontiguousarray(self.vit, dtype=np.int32)
        self.tokens = np.ascontiguousarray(self.tokens, dtype=np.int32)
        self.image_flag = np.ascontiguousarray(self.image_flag, dtype=np.int32)
        self.source = np.ascontiguousarray(self.source, dtype=np.int16)
        self.sources = list(self.sources)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_arrays(
        cls,
        vit: Sequence[int] | np.ndarray,
        tokens: Sequence[int] | np.ndarray,
        image_flag: Sequence[int] | np.ndarray | None = None,
        source: Sequence[int] | np.ndarray | None = None,
        sources: Sequence[str] | None = None,
    ) -> "LengthTable":
        """Builds a table; ``image_flag`` defaults to ``vit`` (all tiles real), ``source`` to 0."""
        vit = np.asarray(vit)
        n = len(vit)
        table = cls(
            vit=vit,
            tokens=np.asarray(tokens),
            image_flag=np.asarray(vit if image_flag is None else image_flag),
            source=np.zeros(n, np.int16) if source is None else np.asarray(source),
            sources=list(sources) if sources is not None else ["default"],
        )
        table.validate()
        return table

    @classmethod
    def concat(cls, tables: Sequence["LengthTable"]) -> "LengthTable":
        """Concatenates tables in order; source names are merged so equal names share one id."""
        if not tables:
            raise LengthDataError("no length tables to concatenate: give at least one file")
        names: list[str] = []
        parts = {c: [] for c in _COLUMNS}
        for t in tables:
            remap = np.empty(len(t.sources), np.int16)
            for i, name in enumerate(t.sources):
                if name not in names:
                    names.append(name)
                remap[i] = names.index(name)
            for c in _COLUMNS[:3]:
                parts[c].append(getattr(t, c))
            parts["source"].append(remap[t.source] if len(t) else t.source)
        return cls(**{c: np.concatenate(parts[c]) for c in _COLUMNS}, sources=names)

    # ------------------------------------------------------------------ basic facts
    def __len__(self) -> int:
        return int(self.vit.shape[0])

    @property
    def total_vit(self) -> int:
        """Tiles over all samples."""
        return int(self.vit.sum(dtype=np.int64))

    @property
    def total_tokens(self) -> int:
        """LLM tokens over all samples."""
        return int(self.tokens.sum(dtype=np.int64))

    def subset(self, index: np.ndarray | Sequence[int]) -> "LengthTable":
        """Rows ``index`` in that order (repeats allowed)."""
        idx = np.asarray(index, dtype=np.int64)
        return LengthTable(self.vit[idx], self.tokens[idx], self.image_flag[idx], self.source[idx], self.sources)

    def resample(self, n: int, seed: int) -> "LengthTable":
        """``n`` rows drawn uniformly with replacement (a scale stand-in for a larger mix)."""
        rng = np.random.default_rng(seed)
        return self.subset(rng.integers(0, len(self), size=n))

    def fingerprint(self) -> str:
        """A short content hash, for caches keyed by the data."""
        import hashlib

        h = hashlib.sha256()
        for c in _COLUMNS:
            h.update(getattr(self, c).tobytes())
        h.update(json.dumps(self.sources).encode())
        return h.hexdigest()[:16]

    def validate(self, origin: str = "length table") -> None:
        """Raises :class:`LengthDataError` naming the first bad row and field."""
        n = len(self)
        for c in _COLUMNS:
            if getattr(self, c).shape != (n,):
                raise LengthDataError(f"{origin}: column {c!r} has shape {getattr(self, c).shape}, expected ({n},)")
        checks = (
            ("vit_num", self.vit < 1, "must be >= 1 (a text-only sample carries one dummy tile)"),
            ("token_num", self.tokens < 1, "must be >= 1 (zero-token samples cannot be trained on)"),
            ("image_flags", (self.image_flag < 0) | (self.image_flag > self.vit), "must be in [0, vit_num]"),
            ("source", (self.source < 0) | (self.source >= len(self.sources)), f"must index {len(self.sources)} sources"),
        )
        for name, bad, rule in checks:
            rows = np.flatnonzero(bad)
            if rows.size:
                r = int(rows[0])
                raise LengthDataError(
                    f"{origin}: row {r}, field {name!r}: {rule}; found vit_num={self.vit[r]}, "
                    f"token_num={self.tokens[r]}, image_flags={self.image_flag[r]} ({rows.size} bad rows in all). "
                    "Fix or drop these rows and recompute the statistics (omnibal-stats)."
                )

    # ------------------------------------------------------------------ I/O
    def save(self, path: str | Path) -> Path:
        """Writes the compact binary format (suffix ``.obl`` is added if missing)."""
        path = Path(path)
        if path.suffix != BINARY_SUFFIX:
            path = path.with_suffix(path.suffix + BINARY_SUFFIX)
        header = json.dumps({"rows": len(self), "sources": self.sources, "columns": _DTYPES}).encode()
        with open(path, "wb") as f:
            f.write(_MAGIC)
            f.write(struct.pack("<II", _VERSION, len(header)))
            f.write(header)
            for c in _COLUMNS:
                f.write(getattr(self, c).astype(_DTYPES[c], copy=False).tobytes())
        return path


def load_lengths(paths: str | Path | Iterable[str | Path]) -> LengthTable:
    """Loads one or several files (OmniBal JSON list, OmniBal wrapper JSON, or ``.obl``), concatenated.

    Each JSON list becomes its own source, named after its file (or its wrapper key).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    tables = [_load_one(Path(p)) for p in paths]
    return LengthTable.concat(tables)


def _load_one(path: Path) -> LengthTable:
    if not path.is_file():
        raise LengthDataError(f"{path}: no such file; give the path of a length-statistics file (.json or .obl)")
    if path.suffix == BINARY_SUFFIX:
        return _load_binary(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LengthDataError(f"{path}: not valid JSON ({e}); expected a list of "
                              "{vit_num, token_num, image_flags} objects or a wrapper mapping names to files") from e
    if isinstance(data, list):
        return _table_from_rows(data, str(path), path.stem)
    if isinstance(data, dict):
        return _load_wrapper(data, path)
    raise LengthDataError(f"{path}: top level is {type(data).__name__}; expected a JSON list or object")


def _load_wrapper(data: dict, path: Path) -> LengthTable:
    tables = []
    for name, entry in data.items():
        if not isinstance(entry, dict) or "token_lengths" not in entry:
            raise LengthDataError(f"{path}: entry {name!r} has no 'token_lengths' path; "
                                  "a wrapper maps each name to {\"token_lengths\": file, ...}")
        target = Path(entry["token_lengths"])
        if not target.is_absolute():
            target = path.parent / target
        t = _load_one(target)
        t.sources = [name] * len(t.sources) if len(t.sources) == 1 else [f"{name}/{s}" for s in t.sources]
        tables.append(t)
    if not tables:
        raise LengthDataError(f"{path}: wrapper names no files")
    return LengthTable.concat(tables)


def _table_from_rows(rows: list, origin: str, source_name: str) -> LengthTable:
    if not rows:
        raise LengthDataError(f"{origin}: empty list; a statistics file needs at least one sample")
    cols = {c: np.empty(len(rows), np.int64) for _, c in _JSON_KEYS}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise LengthDataError(f"{origin}: row {i} is {type(row).__name__}, expected an object")
        for key, col in _JSON_KEYS:
            if key not in row:
                raise LengthDataError(f"{origin}: row {i} lacks field {key!r}; every row needs "
                                      "vit_num, token_num and image_flags")
            v = row[key]
            if isinstance(v, bool) or not isinstance(v, int):
                raise LengthDataError(f"{origin}: row {i}, field {key!r}: {v!r} is not an integer")
            if v < 0:
                raise LengthDataError(f"{origin}: row {i}, field {key!r}: {v} is negative")
            cols[col][i] = v
    n32 = np.iinfo(np.int32).max
    for _, col in _JSON_KEYS:
        if cols[col].max() > n32:
            r = int(np.argmax(cols[col]))
            raise LengthDataError(f"{origin}: row {r}, field {col!r}: {cols[col][r]} exceeds int32")
    table = LengthTable(cols["vit"], cols["tokens"], cols["image_flag"], np.zeros(len(rows), np.int16), [source_name])
    table.validate(origin)
    return table


def _load_binary(path: Path) -> LengthTable:
    raw = path.read_bytes()
    if not raw.startswith(_MAGIC):
        raise LengthDataError(f"{path}: not an omnibal length file (bad magic); rebuild it with omnibal-stats")
    off = len(_MAGIC)
    try:
        version, hlen = struct.unpack_from("<II", raw, off)
        off += 8
        header = json.loads(raw[off : off + hlen])
        off += hlen
        n = int(header["rows"])
        cols = {}
        for c in _COLUMNS:
            dt = np.dtype(header["columns"][c])
            size = n * dt.itemsize
            if off + size > len(raw):
                raise ValueError(f"column {c} truncated")
            cols[c] = np.frombuffer(raw, dtype=dt, count=n, offset=off)
            off += size
    except (struct.error, KeyError, ValueError, json.JSONDecodeError) as e:
        raise LengthDataError(f"{path}: corrupt binary length file ({e}); rebuild it with omnibal-stats") from e
    if version != _VERSION:
        raise LengthDataError(f"{path}: format version {version}, this omnibal_pl reads {_VERSION}; rebuild it")
    table = LengthTable(**cols, sources=header["sources"])
    table.validate(str(path))
    return table
