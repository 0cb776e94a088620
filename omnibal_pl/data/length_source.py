"""The LengthTable of a dataset config: given statistics files, or the embedded synthetic generator."""
from __future__ import annotations

import glob
from typing import Any, Mapping

from omnibal_pl.data.synthetic_lengths import synthetic_lengths
from omnibal_pl.errors import ConfigError, LengthDataError
from omnibal_pl.lengths import LengthTable, load_lengths


def expand_paths(patterns: list[str]) -> list[str]:
    """Glob patterns expanded in order; a pattern that matches nothing raises :class:`LengthDataError`."""
    out: list[str] = []
    for p in patterns:
        hits = sorted(glob.glob(str(p)))
        if not hits:
            raise LengthDataError(f"dataset.paths: {p!r} matches no file; give existing length-statistics files "
                                  "(OmniBal JSON, wrapper JSON or .obl)")
        out.extend(hits)
    return out


def dataset_lengths(dataset: Mapping[str, Any]) -> LengthTable:
    """Statistics for ``dataset``: ``dataset.paths`` when set, else the synthetic generator's."""
    paths = list(dataset.get("paths") or [])
    if paths:
        return load_lengths(expand_paths(paths))
    if dataset.get("kind") == "synthetic":
        gen = dataset.get("generator") or {}
        return synthetic_lengths(int(gen.get("samples", 70706)), int(gen.get("seed", 0)), gen.get("max_tokens"))
    raise ConfigError(f"dataset {dataset.get('name')!r} (kind {dataset.get('kind')!r}) has no dataset.paths; "
                      "compute its statistics with omnibal-stats and pass the .obl file in dataset.paths")
