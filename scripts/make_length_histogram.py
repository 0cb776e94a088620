"""Summarises real length statistics into the histogram behind the embedded default data.

    python scripts/make_length_histogram.py ../shared/data/omnibal_lengths/*.json

writes omnibal_pl/data/length_histogram.json: counts of samples per (tiles, real tiles, 32-token bin),
a summary, not the data itself. The synthetic generator (omnibal_pl/data/synthetic_lengths.py)
draws from it.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from omnibal_pl.data.synthetic_lengths import HISTOGRAM_PATH, TOKEN_BIN
from omnibal_pl.lengths import load_lengths


def main(paths: list[str]) -> None:
    table = load_lengths(paths)
    cells = Counter(zip(table.vit.tolist(), table.image_flag.tolist(), (table.tokens // TOKEN_BIN).tolist()))
    rows = [[v, f, b, c] for (v, f, b), c in sorted(cells.items())]
    summary = {
        "about": "samples per (vit_num, image_flags, token bin) of the InternVL-1.2M SFT subsets "
                 "ai2d, chartqa, docvqa, synthdog_en (OmniBal's published statistics)",
        "token_bin": TOKEN_BIN,
        "samples": len(table),
        "columns": ["vit", "image_flag", "token_bin", "count"],
        "cells": rows,
    }
    Path(HISTOGRAM_PATH).write_text(json.dumps(summary, separators=(",", ":")) + "\n")
    print(f"{len(rows)} cells from {len(table)} samples -> {HISTOGRAM_PATH}")


if __name__ == "__main__":
    main(sys.argv[1:])
