import os
import subprocess
import sys
from pathlib import Path

import pytest

from omnibal_pl.data import InternVLDataset, LlavaDataset, compute_lengths, load_tokenizer
from omnibal_pl.errors import DataError
from omnibal_pl.lengths import load_lengths
from tests.helpers import (
    INTERNVL_TEMPLATE,
    assert_stats_equal_samples,
    INTERNVL_TILING,
    LLAVA_TEMPLATE,
    LLAVA_TILING,
    conversation,
    llava_records,
    make_image,
    make_tokenizer,
    write_json,
    write_jsonl,
)



@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _many_records(root: Path, n: int) -> list[dict]:
    recs = llava_records(root)
    sizes = [(17 + 13 * k % 190, 11 + 29 * k % 170) for k in range(n)]
    for k, (w, h) in enumerate(sizes):
        make_image(root / f"m{k}.png", w, h)
        images = [f"m{k}.png"] + ([f"m{(k + 1) % n}.png"] if k % 5 == 0 else [])
        recs.append({"id": f"m{k}", "image": images, "conversations": conversation(answer="yes " * (k % 7), images=len(images))})
    return recs


@pytest.mark.parametrize("workers", [0, 2])
def test_stats_equal_getitem_internvl(tmp_path, tok_dir, workers):
    write_jsonl(tmp_path / "a.jsonl", _many_records(tmp_path / "imgs", 40))
    write_jsonl(tmp_path / "b.jsonl", llava_records(tmp_path / "imgs"))
    meta = write_json(tmp_path / "meta.json", {
        "a": {"root": "imgs", "annotation": "a.jsonl", "repeat_time": 1},
        "b": {"root": "imgs", "annotation": "b.jsonl", "repeat_time": 0.5},
    })
    ds = InternVLDataset(meta, load_tokenizer(tok_dir), INTERNVL_TEMPLATE, INTERNVL_TILING)
    table = compute_lengths(ds, num_workers=workers, chunk_size=7)
    assert_stats_equal_samples(ds, table)
    assert table.vit.max() > 2 and (table.image_flag == 0).any()  # dynamic tiles and a text-only sample
    assert set(table.source.tolist()) == {0, 1}


def test_stats_equal_getitem_llava_truncated(tmp_path, tok_dir):
    ann = write_json(tmp_path / "a.json", _many_records(tmp_path, 20))
    ds = LlavaDataset(ann, load_tokenizer(tok_dir), LLAVA_TEMPLATE, LLAVA_TILING, max_tokens=60, overlong="truncate")
    table = ds.lengths(num_workers=2)
    assert table.tokens.max() == 60
    assert_stats_equal_samples(ds, table)


def test_stats_errors_propagate_from_workers(tmp_path, tok_dir):
    recs = _many_records(tmp_path, 12)
    recs[9]["image"] = ["gone.png"]
    ds = LlavaDataset(write_json(tmp_path / "a.json", recs), load_tokenizer(tok_dir), LLAVA_TEMPLATE, LLAVA_TILING)
    with pytest.raises(DataError, match=r"a\.json\[9\]: image file .*gone\.png not found"):
        compute_lengths(ds, num_workers=2, chunk_size=3)


def test_omnibal_stats_cli(tmp_path, tok_dir):
    write_jsonl(tmp_path / "a.jsonl", _many_records(tmp_path / "imgs", 10))
    meta = write_json(tmp_path / "meta.json", {"a": {"root": "imgs", "annotation": "a.jsonl", "repeat_time": 1}})
    out = tmp_path / "lengths.obl"
    cli = Path(sys.executable).with_name("omnibal-stats")
    cmd = [str(cli), "dataset=internvl", f"dataset.meta={meta}", f"dataset.tokenizer={tok_dir}", f"output={out}",
           "num_workers=2", "progress=false", "dataset.template.tokens_per_tile=4", "dataset.tiling.image_size=28"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert res.returncode == 0, res.stderr
    assert "17 samples" in res.stdout
    table = load_lengths(out)
    ds = InternVLDataset(meta, load_tokenizer(tok_dir), INTERNVL_TEMPLATE, INTERNVL_TILING)
    assert_stats_equal_samples(ds, table)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "imgs", "lengths.obl", "meta.json"]  # no hydra outputs


@pytest.mark.parametrize("name", ["llava", "internvl"])
def test_dataset_configs_instantiate(tmp_path, tok_dir, name):
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    recs = llava_records(tmp_path)
    write_json(tmp_path / "a.json", recs)
    write_jsonl(tmp_path / "a.jsonl", recs)
    write_json(tmp_path / "meta.json", {"a": {"root": ".", "annotation": "a.jsonl", "repeat_time": 1}})
    source = f"dataset.annotation={tmp_path / 'a.json'}" if name == "llava" else f"dataset.meta={tmp_path / 'meta.json'}"
    with initialize_config_module("omnibal_pl.conf", version_base="1.3"):
        cfg = compose("stats", [f"dataset={name}", source, f"dataset.tokenizer={tok_dir}", "output=x"])
    ds = instantiate(cfg.dataset)
    assert isinstance(ds, LlavaDataset if name == "llava" else InternVLDataset) and len(ds) == len(recs)
    s = ds[3]  # 200x150: one 336 px tile for LLaVA; 3x2 grid (3:2 is closest to 4:3) + thumbnail for InternVL
    assert s.pixel_values.shape[1:] == ((3, 336, 336) if name == "llava" else (3, 448, 448))
    assert s.num_tiles == (1 if name == "llava" else 7)
