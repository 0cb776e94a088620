"""``omnibal-train`` on LLaVA data with bad samples: skipped and counted in the summary, the balance report and
the logged metrics, or stopped by ``dataset.max_skip_fraction`` with an error naming the reasons and counts."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from omnibal_pl.balance.config import BalanceConfig
from omnibal_pl.cli.train import train
from omnibal_pl.data.datamodule import OmniBalDataModule
from omnibal_pl.data.skips import TooManySkipped
from omnibal_pl.data.training_data import ModelSpec, prepare_training_data
from tests.helpers import (cfg_of, llava_dataset_node, llava_records, make_tokenizer, missing_image, truncated_jpeg,
                           undecodable_pixels, write_jsonl)

TILE = 56  # the tiny model's tile: 4 tokens per tile


def run_overrides(tmp_path: Path, *breaks, **policy) -> list[str]:
    """``omnibal-train`` overrides for the tiny model on llava_records (JSONL) broken by ``breaks``, one epoch in a
    loader worker process (its drops must cross the process boundary)."""
    root = tmp_path / "data"
    root.mkdir(parents=True)
    node = llava_dataset_node(root, make_tokenizer(tmp_path / "tok"))
    records = llava_records(root)
    for break_data in breaks:
        break_data(root, records)
    annotation = write_jsonl(root / "train.jsonl", records)
    return ["dataset=llava", f"dataset.annotation={annotation}", f"dataset.image_root={root}",
            f"dataset.tokenizer={node['tokenizer']}", "dataset.template.tokens_per_tile=4",
            f"dataset.tiling.image_size={TILE}", "model.image_context_id=8",  # <image> in the test tokenizer
            *(f"+dataset.{k}={v}" for k, v in policy.items()),
            "balance.dp=1", "balance.vit_cap=2", "balance.token_cap=160", "loader.num_workers=1",
            "trainer.max_epochs=1", "trainer.max_steps=-1", "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1", f"run_dir={tmp_path / 'run'}"]


def test_skipped_samples_are_counted_in_the_summary_report_and_metrics(tmp_path):
    summary = train(cfg_of(*run_overrides(tmp_path, missing_image, undecodable_pixels, bad_samples="skip",
                                          max_skip_fraction=0.3)))
    assert summary["skipped"] == {"missing_image": 1, "unreadable_image": 1}  # at start + in the loader worker
    run = tmp_path / "run"
    assert json.loads((run / "balance_report.json").read_text())["skipped"] == summary["skipped"]
    assert json.loads((run / "summary.json").read_text())["skipped"] == summary["skipped"]
    with open(run / "metrics.csv") as f:
        logged = [float(r["skipped/unreadable_image"]) for r in csv.DictReader(f) if r.get("skipped/unreadable_image")]
    assert logged[-1] == 1 and logged[0] in (0, 1) and len(logged) == summary["steps"]


def test_a_resumed_run_reports_the_drops_before_its_checkpoint(tmp_path):
    overrides = [*run_overrides(tmp_path, missing_image, undecodable_pixels, bad_samples="skip", max_skip_fraction=0.3),
                 "trainer.checkpoint_every_n_steps=1"]
    full = train(cfg_of(*overrides))
    with open(tmp_path / "run" / "metrics.csv") as f:
        # metrics.csv's step s is optimizer step s + 1: its checkpoint holds the drop
        step = 1 + min(int(r["step"]) for r in csv.DictReader(f) if r.get("skipped/unreadable_image") == "1.0")
    ckpt = tmp_path / "run" / "checkpoints" / f"step{step:06d}.ckpt"
    resumed = train(cfg_of(*overrides, f"ckpt_path={ckpt}", f"run_dir={tmp_path / 'resumed'}"))
    assert resumed["skipped"] == full["skipped"] == {"missing_image": 1, "unreadable_image": 1}


def test_a_budget_of_zero_stops_the_run_at_start_or_when_the_loader_drops_one(tmp_path):
    with pytest.raises(TooManySkipped, match=r"at start: 1 of 7 samples are bad \(missing_image 1\)"):
        train(cfg_of(*run_overrides(tmp_path / "a", missing_image, undecodable_pixels, bad_samples="skip",
                                    max_skip_fraction=0)))
    with pytest.raises(TooManySkipped, match=r"epoch 0, step \d+: 1 of 7 samples are bad \(unreadable_image 1\)"):
        train(cfg_of(*run_overrides(tmp_path / "b", undecodable_pixels, bad_samples="skip", max_skip_fraction=0)))


def first_image_sample_of_rank_1(overrides: list[str]) -> str:
    """The key of the first sample DP rank 1 of 2 trains in epoch 0 whose image no other sample shows (from the run's
    own data; "multi" shows img1 and img3)."""
    node = OmegaConf.to_container(cfg_of(*overrides).dataset, resolve=True)
    spec = ModelSpec(vocab_size=256, image_size=TILE, tokens_per_tile=4, image_context_id=8)
    data = prepare_training_data(node, BalanceConfig(dp=2, vit_cap=2, token_cap=160), spec)
    dm = OmniBalDataModule(data, dp_rank=1)
    dm.setup()
    keys = [data.dataset.records[data.dataset.index[i]].key for b in dm.train_dataloader() for i in b.sample_ids.tolist()]
    return next(k for k in keys if k in ("s0", "s2", "s4"))


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_a_drop_on_rank_1_reaches_rank_0s_summary(tmp_path):
    overrides = [o for o in run_overrides(tmp_path, bad_samples="skip", max_skip_fraction=0.3)
                 if not o.startswith(("+dataset.", "loader.num_workers", "balance.dp"))]
    key = first_image_sample_of_rank_1(overrides)
    truncated_jpeg(tmp_path / "data" / f"img{key[1]}.png")  # a JPEG under the .png name: its header still reads
    out = subprocess.run([sys.executable, "-m", "omnibal_pl.cli.train", *overrides, "cluster.devices=2",
                          "cluster.strategy=ddp", "+dataset.bad_samples=skip", "+dataset.max_skip_fraction=0.3"],
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped"] == {"unreadable_image": 1}  # dropped by rank 1's loader, summed into rank 0's count


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_pipeline_stages_count_a_drop_once(tmp_path):
    # both stages of cluster=cpu_pp2 read the same micro-batches: the drops are summed over DP replicas only
    overrides = [o for o in run_overrides(tmp_path, missing_image, undecodable_pixels, bad_samples="skip",
                                          max_skip_fraction=0.3)
                 if not o.startswith(("loader.num_workers", "balance.dp"))]
    out = subprocess.run([sys.executable, "-m", "omnibal_pl.cli.train", *overrides, "cluster=cpu_pp2", "plan.use=uniform",
                          "balance.micro_batches=2"], capture_output=True, text=True, timeout=380)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped"] == {"missing_image": 1, "unreadable_image": 1}


def test_a_held_out_sample_that_fails_to_decode_is_counted_by_the_validation_pass(tmp_path):
    """Separate validation data with one truncated JPEG: every validation pass drops it and says so
    (``val/skipped/unreadable_image`` per pass, ``val_skipped`` in the summary); training data is clean."""
    overrides = run_overrides(tmp_path, bad_samples="skip", max_skip_fraction=0.3)
    root = tmp_path / "data"
    records = llava_records(root)
    undecodable_pixels(root, records)
    val = write_jsonl(root / "val.jsonl", records)
    summary = train(cfg_of(*overrides, f"+dataset.val_annotation={val}", "trainer.val_check_interval=2"))
    assert summary["skipped"] == {} and summary["val_skipped"] == {"unreadable_image": 1}
    with open(tmp_path / "run" / "metrics.csv") as f:
        passes = [float(r["val/skipped/unreadable_image"]) for r in csv.DictReader(f) if r.get("val/skipped/unreadable_image")]
    assert len(passes) >= 2 and set(passes) == {1.0}
