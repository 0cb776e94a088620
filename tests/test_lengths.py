"""LengthTable: loading OmniBal's formats and ours, and a clear error for every bad input."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from omnibal_pl.errors import LengthDataError
from omnibal_pl.lengths import LengthTable, load_lengths


def write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


ROWS = [{"vit_num": 3, "token_num": 800, "image_flags": 3}, {"vit_num": 1, "token_num": 300, "image_flags": 0}]


def test_real_files_totals(real_lengths):
    assert len(real_lengths) == 70706
    assert real_lengths.total_vit == 279376
    assert real_lengths.total_tokens == 80285377
    assert len(real_lengths.sources) == 4
    assert set(np.unique(real_lengths.vit)) == {1, 3, 4, 5}


def test_json_list_and_wrapper(tmp_path):
    a = write(tmp_path, "a.json", ROWS)
    b = write(tmp_path, "b.json", ROWS[:1])
    wrapper = write(tmp_path, "meta.json", {"first": {"token_lengths": "a.json"}, "second": {"token_lengths": str(b)}})
    t = load_lengths(wrapper)
    assert t.vit.tolist() == [3, 1, 3]
    assert t.tokens.tolist() == [800, 300, 800]
    assert t.image_flag.tolist() == [3, 0, 3]
    assert [t.sources[s] for s in t.source] == ["first", "first", "second"]
    both = load_lengths([a, b])
    assert both.sources == ["a", "b"] and both.source.tolist() == [0, 0, 1]


def test_binary_round_trip_is_exact_and_fast(tmp_path):
    rng = np.random.default_rng(0)
    n = 1_200_000
    vit = rng.integers(1, 13, n)
    t = LengthTable.from_arrays(vit, rng.integers(1, 8000, n), rng.integers(0, 1, n) * vit, rng.integers(0, 3, n),
                                ["x", "y", "z"])
    path = t.save(tmp_path / "stats")
    assert path.suffix == ".obl"
    start = time.perf_counter()
    back = load_lengths(path)
    assert time.perf_counter() - start < 1.0
    for col in ("vit", "tokens", "image_flag", "source"):
        np.testing.assert_array_equal(getattr(back, col), getattr(t, col))
    assert back.sources == ["x", "y", "z"]
    assert back.fingerprint() == t.fingerprint()


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"vit_num": 1, "token_num": 5}], r"row 0 lacks field 'image_flags'"),
        ([ROWS[0], {"vit_num": -1, "token_num": 5, "image_flags": 0}], r"row 1, field 'vit_num': -1 is negative"),
        ([{"vit_num": 1.5, "token_num": 5, "image_flags": 0}], r"row 0, field 'vit_num': 1.5 is not an integer"),
        ([{"vit_num": 1, "token_num": "5", "image_flags": 0}], r"field 'token_num': '5' is not an integer"),
        ([{"vit_num": True, "token_num": 5, "image_flags": 0}], r"field 'vit_num': True is not an integer"),
        ([ROWS[0], {"vit_num": 1, "token_num": 0, "image_flags": 0}], r"row 1, field 'token_num': must be >= 1"),
        ([{"vit_num": 0, "token_num": 9, "image_flags": 0}], r"row 0, field 'vit_num': must be >= 1"),
        ([{"vit_num": 2, "token_num": 9, "image_flags": 3}], r"row 0, field 'image_flags': must be in \[0, vit_num\]"),
        ([], r"empty list"),
        ([5], r"row 0 is int"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, rows, match):
    path = write(tmp_path, "bad.json", rows)
    with pytest.raises(LengthDataError, match=match) as info:
        load_lengths(path)
    assert str(path) in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(LengthDataError, match="no such file"):
        load_lengths(tmp_path / "missing.json")
    with pytest.raises(LengthDataError, match="not valid JSON"):
        load_lengths(write(tmp_path, "broken.json", '[{"vit_num": 1,'))
    with pytest.raises(LengthDataError, match="top level is str"):
        load_lengths(write(tmp_path, "str.json", '"hello"'))
    with pytest.raises(LengthDataError, match="has no 'token_lengths'"):
        load_lengths(write(tmp_path, "w.json", {"x": {"path": "a.json"}}))
    with pytest.raises(LengthDataError, match="bad magic"):
        load_lengths(write(tmp_path, "junk.obl", "not a table"))
    good = LengthTable.from_arrays([1, 2], [3, 4]).save(tmp_path / "t.obl")
    good.write_bytes(good.read_bytes()[:-3])
    with pytest.raises(LengthDataError, match="corrupt"):
        load_lengths(good)
