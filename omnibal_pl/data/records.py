"""Annotation files -> :class:`Record` lists: JSON / JSONL annotations and InternVL meta files.

A row is a LLaVA / ShareGPT sample ``{id, image | images, conversations: [{from, value}]}`` or a chat-format
one ``{id, images, messages: [{role, content}]}`` (content a string or text and image parts; see
:mod:`~omnibal_pl.data.messages`). A record is one sample: its messages normalised to ``{role, content}``
with one ``<image>`` placeholder per image, its image paths, plus where it came from (``origin``,
"file:line" or "file[item]") for error messages. Nothing is decoded here.
"""
from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omnibal_pl.data.messages import normalize_messages
from omnibal_pl.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """One annotated sample. ``key``: its ``id`` field (or ``origin`` when it has none); ``conversations``: its
    messages, normalised (:func:`~omnibal_pl.data.messages.normalize_messages`). ``problem``: why the row is not a
    sample (a JSONL line that does not parse, a row that is not a sample object), kept as a record so that
    ``dataset.bad_samples`` decides, as for any bad sample, whether it stops the run or is skipped and counted."""

    key: str
    origin: str
    images: tuple[Path, ...]
    conversations: list
    source: int = 0
    problem: str | None = None


def read_annotation(path: str | Path, image_root: str | Path | None = None, source: int = 0) -> list[Record]:
    """Records of an annotation: a JSON list, or JSONL (one object per line) for ``.jsonl``.

    Image paths are resolved against ``image_root`` (default: the annotation's folder). A line (or item) that is
    not a sample becomes a record with its ``problem`` (file:line and what is wrong); a ``.json`` file that does not
    parse as a whole raises :class:`DataError` with file:line:column.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such annotation file")
    root = Path(image_root) if image_root is not None else path.parent
    if path.suffix != ".jsonl":
        data = _parse(path.read_text(encoding="utf-8"), str(path))
        if not isinstance(data, list):
            raise DataError(f"{path}: top level is {type(data).__name__}; a LLaVA annotation is a JSON list of samples "
                            "(use the .jsonl suffix for one sample per line)")
        return [_row(item, f"{path}[{i}]", root, source) for i, item in enumerate(data)]
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            origin = f"{path}:{lineno}"
            try:
                item = _parse(line, str(path), lineno)
            except DataError as e:
                records.append(_problem(origin, e, source))
                continue
            records.append(_row(item, origin, root, source))
    return records


def read_internvl_meta(meta: str | Path, seed: int = 0) -> tuple[list[Record], list[str], list[Path]]:
    """Records, source names and annotation files of an InternVL meta JSON ``{name: {root, annotation, repeat_time, length}}``.

    ``repeat_time`` r: ``floor(r)`` full copies plus a deterministic (per ``seed`` and name) subsample of
    ``(r - floor(r)) x len`` records, kept in file order; so r < 1 subsamples and r > 1 repeats.
    ``length``, when given, must match the annotation's line count (a warning otherwise).
    Relative ``root``/``annotation`` paths are resolved against the meta file's folder.
    """
    meta = Path(meta)
    if not meta.is_file():
        raise DataError(f"{meta}: no such meta file")
    data = _parse(meta.read_text(encoding="utf-8"), str(meta))
    if not isinstance(data, dict) or not data:
        raise DataError(f"{meta}: expected a non-empty JSON object mapping names to {{root, annotation, repeat_time, length}}")
    records: list[Record] = []
    files = [meta]
    for source, (name, entry) in enumerate(data.items()):
        if not isinstance(entry, dict) or "annotation" not in entry:
            raise DataError(f"{meta}: entry {name!r} needs an 'annotation' (JSONL path) and a 'root' (image folder)")
        ann = _resolve(meta.parent, entry["annotation"])
        part = read_annotation(ann, _resolve(meta.parent, entry.get("root", ".")), source)
        files.append(ann)
        if "length" in entry and entry["length"] != len(part):
            log.warning("%s: entry %r says length=%s but %s has %d samples; using the file", meta, name, entry["length"], ann, len(part))
        repeat = entry.get("repeat_time", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, (int, float)) or repeat < 0:
            raise DataError(f"{meta}: entry {name!r}: repeat_time={repeat!r} must be a number >= 0")
        records.extend(repeat_records(part, float(repeat), seed + zlib.crc32(name.encode())))
    return records, list(data), files


def repeat_records(records: list[Record], repeat_time: float, seed: int) -> list[Record]:
    """``floor(repeat_time)`` copies, then a deterministic subsample for the fractional part."""
    whole = int(repeat_time)
    extra = int(len(records) * (repeat_time - whole))
    picked = np.sort(np.random.default_rng(seed).permutation(len(records))[:extra])
    return records * whole + [records[i] for i in picked]


def _resolve(base: Path, p: str) -> Path:
    p = Path(p)
    return p if p.is_absolute() else base / p


def _row(item, origin: str, root: Path, source: int) -> Record:
    """The record of one parsed item, or the record of its problem."""
    try:
        return _record(item, origin, root, source)
    except DataError as e:
        return _problem(origin, e, source)


def _problem(origin: str, error: DataError, source: int) -> Record:
    return Record(key=origin, origin=origin, images=(), conversations=[], source=source, problem=str(error))


def _parse(text: str, file: str, lineno: int | None = None):
    """Parses JSON; ``lineno`` is the line of ``text`` in ``file`` (JSONL), else the error's own position."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"{file}:{lineno}" if lineno is not None else f"{file}:{e.lineno}:{e.colno}"
        raise DataError(f"{where}: malformed JSON ({e.msg}); fix or remove this entry") from e


def _record(item, origin: str, root: Path, source: int) -> Record:
    if not isinstance(item, dict):
        raise DataError(f"{origin}: a sample must be an object, found {type(item).__name__}")
    turns = item.get("messages", item.get("conversations"))
    if turns is None:
        raise DataError(f"{origin}: a sample needs 'messages' ([{{role, content}}]) or 'conversations' ([{{from, value}}])")
    try:
        messages, part_images = normalize_messages(turns, origin)
    except DataError:  # refused (with this message) when tokenised, where dataset.bad_samples decides error or skip
        messages, part_images = turns, []
    field = "images" if "images" in item else "image"
    image = item.get(field)
    if image is None:
        images = part_images
    elif part_images:
        raise DataError(f"{origin}: images are named both in the content parts and in {field!r}; name them in one place")
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and all(isinstance(p, str) for p in image):
        images = image
    else:
        raise DataError(f"{origin}: field {field!r} must be a path or a list of paths, found {image!r}")
    key = str(item["id"]) if "id" in item else origin
    return Record(key=key, origin=origin, images=tuple(root / p for p in images), conversations=messages, source=source)
