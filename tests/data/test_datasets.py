import dataclasses

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnibal_pl.data import InternVLDataset, LlavaDataset, SyntheticDataset, TemplateConfig, TilingConfig, load_tokenizer
from omnibal_pl.batch import IGNORE_INDEX
from omnibal_pl.data.templates import FORMATS
from omnibal_pl.errors import ConfigError, DataError
from omnibal_pl.lengths import LengthTable
from tests.helpers import (
    INTERNVL_TEMPLATE,
    INTERNVL_TILING,
    LLAVA_TEMPLATE,
    LLAVA_TILING,
    TILE,
    conversation,
    llava_records,
    make_image,
    make_tokenizer,
    write_json,
    write_jsonl,
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok")))


def llava(path, tok, **kw):
    return LlavaDataset(path, tok, LLAVA_TEMPLATE, LLAVA_TILING, **kw)


def internvl(path, tok, **kw):
    return InternVLDataset(path, tok, INTERNVL_TEMPLATE, INTERNVL_TILING, **kw)


def test_llava_json_and_jsonl_give_the_same_samples(tmp_path, tok):
    recs = llava_records(tmp_path)
    a = llava(write_json(tmp_path / "a.json", recs), tok)
    b = llava(write_jsonl(tmp_path / "b.jsonl", recs), tok)
    assert len(a) == len(b) == len(recs)
    for i in range(len(a)):
        sa, sb = a[i], b[i]
        assert torch.equal(sa.input_ids, sb.input_ids) and torch.equal(sa.pixel_values, sb.pixel_values)
        assert sa.sample_id == i


def test_llava_sample_shapes(tmp_path, tok):
    ds = llava(write_json(tmp_path / "a.json", llava_records(tmp_path)), tok)
    ctx = tok.token_id("<image>")
    single, text, multi = ds[1], ds[5], ds[6]
    assert single.pixel_values.shape == (1, 3, TILE, TILE) and single.image_flags.tolist() == [1]
    assert (single.input_ids == ctx).sum() == 9
    assert text.pixel_values.shape == (1, 3, TILE, TILE) and text.image_flags.tolist() == [0]
    assert not text.pixel_values.any() and (text.input_ids == ctx).sum() == 0
    assert multi.image_flags.tolist() == [1, 1] and (multi.input_ids == ctx).sum() == 18
    for s in (single, text, multi):
        assert s.input_ids.dtype == s.labels.dtype == s.image_flags.dtype == torch.int64
        assert s.labels[0] == IGNORE_INDEX and (s.labels != IGNORE_INDEX).any()


def test_internvl_meta_dynamic_tiles_and_sources(tmp_path, tok):
    recs = llava_records(tmp_path / "imgs")
    write_jsonl(tmp_path / "a.jsonl", recs)
    write_jsonl(tmp_path / "b.jsonl", recs[:2])
    meta = write_json(tmp_path / "meta.json", {
        "first": {"root": "imgs", "annotation": "a.jsonl", "repeat_time": 1, "length": len(recs)},
        "second": {"root": str(tmp_path / "imgs"), "annotation": str(tmp_path / "b.jsonl"), "repeat_time": 2},
    })
    ds = internvl(meta, tok)
    assert len(ds) == len(recs) + 4
    table = ds.lengths()
    assert table.sources == ["first", "second"]
    assert table.source.tolist() == [0] * len(recs) + [1] * 4
    s = ds[3]  # 200x150 image, 28 px tiles, <= 6 tiles: 3x2 grid + thumbnail
    assert s.pixel_values.shape == (7, 3, TILE, TILE) and s.image_flags.sum() == 7
    assert (s.input_ids == tok.token_id("<IMG_CONTEXT>")).sum() == 7 * 4
    assert torch.equal(ds[len(recs) + 2].input_ids, ds[len(recs)].input_ids)  # repeated copy


@pytest.mark.parametrize("repeat", [0.5, 0.25, 1.5])
def test_internvl_fractional_repeat_is_deterministic(tmp_path, tok, repeat):
    rows = [{"id": f"r{k}", "conversations": conversation("hello", "yes", images=0)} for k in range(40)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    meta = write_json(tmp_path / "meta.json", {"d": {"root": ".", "annotation": "a.jsonl", "repeat_time": repeat}})
    a, b = internvl(meta, tok), internvl(meta, tok)
    keys = [r.key for r in a.records]
    assert len(a) == int(40 * repeat)
    assert keys == [r.key for r in b.records]
    assert keys != [r.key for r in internvl(meta, tok, seed=1).records]
    extra = keys[40:] if repeat > 1 else keys
    assert extra == sorted(extra, key=lambda k: int(k[1:])) and len(set(extra)) == len(extra)


def test_overlong_policies(tmp_path, tok):
    recs = llava_records(tmp_path)
    path = write_json(tmp_path / "a.json", recs)
    raw = llava(path, tok).raw_lengths()
    cap = int(np.sort(raw.tokens)[len(raw) // 2])
    over = np.flatnonzero(raw.tokens > cap)
    assert over.size > 0

    with pytest.raises(DataError, match=f"longer than max_tokens={cap}"):
        llava(path, tok, max_tokens=cap).lengths()
    with pytest.raises(DataError, match="max_tokens"):
        llava(path, tok, max_tokens=cap)[int(over[0])]

    skip = llava(path, tok, max_tokens=cap, overlong="skip")
    table = skip.lengths()
    assert len(skip) == len(table) == len(recs) - over.size
    assert skip.skip_report.count == over.size
    assert sorted(sum(skip.skip_report.skipped.values(), [])) == sorted(recs[r]["id"] for r in over)
    assert all(skip[i].num_tokens == table.tokens[i] <= cap for i in range(len(skip)))


def test_truncate_keeps_the_first_max_tokens(tmp_path, tok):
    recs = llava_records(tmp_path)
    path = write_json(tmp_path / "a.json", recs)
    full = llava(path, tok)
    ctx = tok.token_id("<image>")
    image_end = max(int(np.flatnonzero(full[r].input_ids == ctx)[-1]) + 1 for r in range(len(full)) if recs[r].get("image"))
    cap = image_end + 3  # every image fits; text after it is cut
    trunc = llava(path, tok, max_tokens=cap, overlong="truncate")
    table = trunc.lengths()
    assert (table.tokens == np.minimum(full.lengths().tokens, cap)).all() and (table.tokens == cap).any()
    for r in range(len(trunc)):
        s, f = trunc[r], full[r]
        assert s.num_tokens == table.tokens[r]
        assert torch.equal(s.input_ids, f.input_ids[:cap]) and torch.equal(s.labels, f.labels[:cap])  # a prefix, as the originals


def test_truncate_refuses_samples_whose_images_it_would_cut(tmp_path, tok):
    recs = llava_records(tmp_path)
    ds = llava(write_json(tmp_path / "a.json", recs), tok, max_tokens=10, overlong="truncate")
    with pytest.raises(DataError, match=r"6 samples have image tokens beyond the first max_tokens=10 tokens.*: s0, s1, s2, s3, s4, multi;"):
        ds.lengths()
    with pytest.raises(DataError, match=r"a\.json\[6\] \(id multi\): image tokens beyond the first max_tokens=10"):
        ds[6]  # read without lengths(): refused, never cut
    assert ds[5].num_tokens == 10  # the text-only sample is cut


def test_truncate_keeps_an_image_ending_exactly_at_the_cap(tmp_path, tok):
    recs = llava_records(tmp_path)[:1]
    path = write_json(tmp_path / "a.json", recs)
    ids = llava(path, tok)[0].input_ids
    end = int(np.flatnonzero(ids == tok.token_id("<image>"))[-1]) + 1  # tokens up to the last image token
    assert llava(path, tok, max_tokens=end, overlong="truncate").lengths().tokens.tolist() == [end]
    with pytest.raises(DataError, match=f"beyond the first max_tokens={end - 1} tokens.*: s0;"):
        llava(path, tok, max_tokens=end - 1, overlong="truncate").lengths()


def test_seven_tiles_at_cap_1793_is_refused_at_lengths_time(tmp_path, tok):
    # 7 tiles x 256 tokens + <img> + </img> = 1794 image tokens: more than the cap, with the text before them
    make_image(tmp_path / "big.png", 800, 600)  # 3x2 grid + thumbnail at 448 px
    write_jsonl(tmp_path / "a.jsonl", [{"id": "seven", "image": "big.png", "conversations": conversation()}])
    meta = write_json(tmp_path / "meta.json", {"d": {"root": ".", "annotation": "a.jsonl"}})
    template = TemplateConfig(name="internlm2-chat", tokens_per_tile=256, image_context_token="<IMG_CONTEXT>")
    ds = InternVLDataset(meta, tok, template, TilingConfig(image_size=448, max_tiles=6), max_tokens=1793, overlong="truncate")
    assert ds.raw_lengths().image_flag.tolist() == [7]
    with pytest.raises(DataError, match=r"beyond the first max_tokens=1793 tokens.*: seven;"):
        ds.lengths()


def test_missing_and_corrupt_images(tmp_path, tok):
    recs = llava_records(tmp_path)
    recs[2]["image"] = "nowhere.png"
    ds = llava(write_json(tmp_path / "a.json", recs), tok)
    with pytest.raises(DataError, match=r"a\.json\[2\]: image file .*nowhere\.png not found"):
        ds[2]
    with pytest.raises(DataError, match="nowhere.png not found"):
        ds.lengths()

    recs = llava_records(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    png = (tmp_path / "img3.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])  # valid header, truncated pixels
    recs[0]["image"], recs[1]["image"] = "bad.png", "cut.png"
    ds = llava(write_json(tmp_path / "b.json", recs), tok)
    with pytest.raises(DataError, match=r"b\.json\[0\]: image file .*bad\.png"):
        ds.record_lengths(0)
    with pytest.raises(DataError, match=r"b\.json\[1\]: image file .*cut\.png is corrupt"):
        ds[1]


def test_placeholder_mismatch_names_the_sample(tmp_path, tok):
    recs = llava_records(tmp_path)
    recs[4]["image"] = ["img0.png", "img1.png"]
    ds = llava(write_jsonl(tmp_path / "a.jsonl", recs), tok)
    with pytest.raises(DataError, match=r"a\.jsonl:5: 1 '<image>' placeholders but 2 images"):
        ds[4]


def test_malformed_json_and_jsonl_name_the_line(tmp_path, tok):
    (tmp_path / "a.json").write_text('[\n{"id": 1, "conversations": []},\n{"id": 2,, }\n]')
    with pytest.raises(DataError, match=r"a\.json:3:\d+: malformed JSON"):
        llava(tmp_path / "a.json", tok)
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": 1, "conversations": conversation(images=0)}) + '\n\n{"id": 2\n')
    with pytest.raises(DataError, match=r"b\.jsonl:3: malformed JSON"):  # when the statistics read it (bad_samples)
        llava(tmp_path / "b.jsonl", tok).lengths()
    write_jsonl(tmp_path / "c.jsonl", [{"id": 1, "conversations": conversation(images=0)}, {"id": 2, "conversations": "hi"}])
    with pytest.raises(DataError, match=r"c\.jsonl:2: the conversation must be a list of turns"):
        llava(tmp_path / "c.jsonl", tok).lengths()
    write_json(tmp_path / "d.json", {"id": 1})
    with pytest.raises(DataError, match="top level is dict"):
        llava(tmp_path / "d.json", tok)
    with pytest.raises(DataError, match="no such annotation file"):
        llava(tmp_path / "none.json", tok)
    write_json(tmp_path / "meta.json", {"x": {"root": "."}})
    with pytest.raises(DataError, match="entry 'x' needs an 'annotation'"):
        internvl(tmp_path / "meta.json", tok)


def test_empty_dataset(tmp_path, tok):
    with pytest.raises(DataError, match="no samples"):
        llava(write_json(tmp_path / "a.json", []), tok)
    (tmp_path / "b.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no samples"):
        llava(tmp_path / "b.jsonl", tok)
    write_jsonl(tmp_path / "c.jsonl", [{"conversations": conversation(images=0)}])
    meta = write_json(tmp_path / "meta.json", {"d": {"root": ".", "annotation": "c.jsonl", "repeat_time": 0.5}})
    with pytest.raises(DataError, match="no samples"):
        internvl(meta, tok)


def test_bad_policy(tmp_path, tok):
    path = write_json(tmp_path / "a.json", llava_records(tmp_path))
    with pytest.raises(ConfigError, match="overlong"):
        llava(path, tok, overlong="drop")


@settings(max_examples=30, deadline=None)
@given(data=st.data(), tpt=st.integers(1, 8), seed=st.integers(0, 3))
def test_synthetic_has_exactly_the_table_lengths(data, tpt, seed):
    n = data.draw(st.integers(1, 6))
    vit = np.array(data.draw(st.lists(st.integers(1, 4), min_size=n, max_size=n)))
    flag = np.array([data.draw(st.sampled_from([0, v])) for v in vit])
    tokens = flag * tpt + np.array(data.draw(st.lists(st.integers(1, 30), min_size=n, max_size=n)))
    table = LengthTable.from_arrays(vit, tokens, flag)
    ds = SyntheticDataset(table, vocab_size=50, image_size=8, tokens_per_tile=tpt, image_context_id=7, seed=seed)
    assert ds.lengths() is table and len(ds) == n
    for i in range(n):
        s = ds[i]
        assert s.num_tokens == tokens[i] and s.num_tiles == vit[i] and int(s.image_flags.sum()) == flag[i]
        assert int((s.input_ids == 7).sum()) == flag[i] * tpt
        assert s.input_ids.min() >= 0 and s.input_ids.max() < 50
        assert s.labels[0] == IGNORE_INDEX
        assert ((s.labels == IGNORE_INDEX) | (s.labels == s.input_ids)).all()
        assert not s.pixel_values[s.image_flags == 0].any()
        again = ds[i]
        assert torch.equal(again.input_ids, s.input_ids) and torch.equal(again.pixel_values, s.pixel_values)


def test_synthetic_supervises_some_tokens_and_rejects_impossible_rows():
    table = LengthTable.from_arrays([1, 3], [40, 2 * 4 + 10], [0, 2])
    ds = SyntheticDataset(table, vocab_size=100, image_size=8, tokens_per_tile=4, image_context_id=5)
    assert all((ds[i].labels != IGNORE_INDEX).sum() > 0 for i in range(2))
    assert ds[1].image_flags.tolist() == [1, 1, 0]
    with pytest.raises(DataError, match="row 1"):
        SyntheticDataset(table, tokens_per_tile=9, image_size=8)


def test_fingerprint_follows_the_data(tmp_path, tok, monkeypatch):
    recs = llava_records(tmp_path / "imgs")
    write_jsonl(tmp_path / "a.jsonl", recs)
    meta = write_json(tmp_path / "meta.json", {"d": {"root": "imgs", "annotation": "a.jsonl", "repeat_time": 0.5}})
    base = internvl(meta, tok).fingerprint()
    assert internvl(meta, tok).fingerprint() == base
    assert internvl(meta, tok, seed=5).fingerprint() != base  # another subsample
    assert InternVLDataset(meta, tok, INTERNVL_TEMPLATE, LLAVA_TILING).fingerprint() != base
    v25 = TemplateConfig(name="internvl2_5", tokens_per_tile=4, image_context_token="<IMG_CONTEXT>")
    assert InternVLDataset(meta, tok, v25, INTERNVL_TILING).fingerprint() != base  # another format
    # the same tokenizer elsewhere keeps the cache; the same path with other contents does not
    assert internvl(meta, load_tokenizer(make_tokenizer(tmp_path / "copy"))).fingerprint() == base
    other = load_tokenizer(make_tokenizer(tmp_path / "copy"))
    other.backend.add_tokens(["zebra"])
    assert internvl(meta, other).fingerprint() != base
    # a format whose definition changed in the code (a newline after the reply) invalidates the cache too
    monkeypatch.setitem(FORMATS, "internlm2-chat", dataclasses.replace(FORMATS["internlm2-chat"], after_reply="\n"))
    assert internvl(meta, tok).fingerprint() != base
    monkeypatch.undo()
    write_jsonl(tmp_path / "a.jsonl", recs + recs[:1])
    assert internvl(meta, tok).fingerprint() != base
