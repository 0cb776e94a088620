"""Validation on a held-out split: disjoint seeded split, val loss and token accuracy every val_check_interval steps
equal to a direct computation over the held-out micro-batches, a ModelCheckpoint monitoring it, the last step validated
once, DDP."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omnibal_pl.balance.config import BalanceConfig
from omnibal_pl.batch import IGNORE_INDEX
from omnibal_pl.cli.train import train
from omnibal_pl.data.training_data import ModelSpec, prepare_training_data
from omnibal_pl.data.validation_split import split_validation
from omnibal_pl.errors import ConfigError
from omnibal_pl.lengths import LengthTable
from omnibal_pl.parallel.dcp import META_FILE, load_meta
from omnibal_pl.train.assemble import build_run, resolve_run
from omnibal_pl.train.schemas import parse_run_config
from omnibal_pl.train.trained_model import read_trained_model

from tests.helpers import FAST, LLAVA_TEMPLATE, LLAVA_TILING, cfg_of, llava_records, make_tokenizer, write_json

VAL = ["dataset.val_fraction=0.1", "trainer.val_check_interval=2", "trainer.max_steps=4",
       "trainer.checkpoint_every_n_steps=4", "optim.lr=1e-3"]


def val_rows(run_dir: Path) -> dict[int, dict[str, float]]:
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): {"loss": float(r["val/loss"]), "acc": float(r["val/token_acc"])}
                for r in csv.DictReader(f) if r.get("val/loss")}


def val_loss_checkpoint_state(checkpoint: dict) -> dict:
    """The state of the ModelCheckpoint that monitors val/loss, from a checkpoint's ``callbacks``."""
    return next(v for k, v in checkpoint["callbacks"].items() if "ModelCheckpoint" in k and "val/loss" in k)


def test_the_split_is_disjoint_seeded_and_sized():
    n = 50
    table = LengthTable(np.ones(n, np.int64), np.arange(10, 10 + n), np.ones(n, np.int64), np.zeros(n, np.int64), ["s"])
    dataset = list(range(n))
    train_set, train_lengths, held = split_validation(dataset, table, 0.2, seed=3)
    train_ids, val_ids = [train_set[i] for i in range(len(train_set))], [held.dataset[i] for i in range(len(held.dataset))]
    assert len(val_ids) == 10 and sorted(train_ids + val_ids) == dataset
    assert train_lengths.tokens.tolist() == [10 + i for i in train_ids]  # statistics stay aligned with the rows
    assert held.lengths.tokens.tolist() == [10 + i for i in val_ids]
    assert [held.dataset[i] for i in range(10)] == [split_validation(dataset, table, 0.2, seed=3)[2].dataset[i] for i in range(10)]
    assert val_ids != [split_validation(dataset, table, 0.2, seed=4)[2].dataset[i] for i in range(10)]
    assert split_validation(dataset, table, 0.0, seed=3) == (dataset, table, None)
    with pytest.raises(ConfigError, match="val_fraction"):
        split_validation(dataset, table, 1.0, seed=3)


def test_separate_validation_files_replace_the_training_node_keys(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    records = llava_records(root)
    train_file = write_json(root / "train.json", records)
    val_file = write_json(root / "val.json", [{**r, "id": f"val-{r['id']}"} for r in records[:3]])
    node = {"name": "llava", "_target_": "omnibal_pl.data.LlavaDataset", "annotation": str(train_file),
            "image_root": str(root), "tokenizer": str(make_tokenizer(tmp_path / "tok")), "overlong": "error",
            "template": {"_target_": "omnibal_pl.data.TemplateConfig", "name": LLAVA_TEMPLATE.name,
                         "tokens_per_tile": LLAVA_TEMPLATE.tokens_per_tile,
                         "image_context_token": LLAVA_TEMPLATE.image_context_token},
            "tiling": {"_target_": "omnibal_pl.data.TilingConfig", "mode": "llava", "image_size": LLAVA_TILING.image_size,
                       "max_tiles": 1, "use_thumbnail": False},
            "val_annotation": str(val_file)}
    spec = ModelSpec(vocab_size=64, image_size=LLAVA_TILING.image_size, tokens_per_tile=9, image_context_id=8)
    data = prepare_training_data(node, BalanceConfig(dp=1, vit_cap=4, token_cap=200), spec)
    assert len(data.lengths) == len(records) and len(data.val.lengths) == 3  # nothing held out of the training file
    assert data.val.dataset.files == [val_file] and data.val.dataset.max_tokens == 200  # same token cap
    assert list(root.glob("val.json.lengths-*.obl"))  # its own statistics, cached next to it
    with pytest.raises(ConfigError, match="dataset.val_annotation: .*no dataset.val_fraction"):
        prepare_training_data({**node, "val_fraction": 0.1}, BalanceConfig(dp=1, vit_cap=4, token_cap=200), spec)


def test_val_metrics_every_interval_equal_a_direct_computation_and_can_be_monitored(tmp_path):
    best = tmp_path / "checkpoints" / "best"
    cfg = cfg_of(*FAST, *VAL, "callbacks=[checkpoint,lr_monitor,best_checkpoint]", f"run_dir={tmp_path}")
    train(cfg)
    rows = val_rows(tmp_path)
    assert sorted(rows) == [1, 3]  # after optimizer steps 2 and 4 (Lightning logs the step index)
    assert (best / "best.ckpt").is_file()
    saved = torch.load(best / "best.ckpt", map_location="cpu", weights_only=False)
    best_score = float(val_loss_checkpoint_state(saved)["best_model_score"])
    assert best_score == pytest.approx(min(r["loss"] for r in rows.values()))

    # the last validation, recomputed by hand over the held-out micro-batches with the final weights
    model = read_trained_model(tmp_path / "checkpoints" / "last.ckpt").build()
    run = resolve_run(parse_run_config(cfg), tmp_path / "again")
    _, _, datamodule = build_run(run)
    datamodule.setup("fit")
    loss_sum = weight = correct = predictions = 0.0
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            logits = model(batch)[0, :-1]
            targets, w = batch.labels[0, 1:], batch.loss_weight[0, 1:].float()
            mask = targets != IGNORE_INDEX
            ce = F.cross_entropy(logits[mask], targets[mask], reduction="none")
            loss_sum += float((ce * w[mask]).sum())
            weight += float(w[mask].sum())
            correct += float((logits[mask].argmax(-1) == targets[mask]).sum())
            predictions += float(mask.sum())
    assert predictions > 0 and len(run.data.val.lengths) == 60
    assert rows[3]["loss"] == pytest.approx(loss_sum / weight, rel=1e-5)
    assert rows[3]["acc"] == pytest.approx(correct / predictions, rel=1e-6)


def val_steps(run_dir: Path) -> list[int]:
    """The step of every validation row of metrics.csv, repeats kept."""
    with open(run_dir / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("val/loss")]


@pytest.mark.parametrize("max_steps, expected", [(5, [1, 3, 4]), (4, [1, 3])])
def test_the_last_step_is_validated_once_whether_or_not_the_interval_divides_it(tmp_path, max_steps, expected):
    """Every 2 steps, and after the last: 5 steps validate after steps 2, 4 and 5; 4 steps after 2 and 4 only (the
    last step is an interval's: no second pass). The run returns the final weights' val loss."""
    summary = train(cfg_of(*FAST, *VAL, f"trainer.max_steps={max_steps}", f"run_dir={tmp_path}"))
    assert val_steps(tmp_path) == expected
    assert summary["objective"] == summary["val_loss"] == pytest.approx(val_rows(tmp_path)[expected[-1]]["loss"])


def test_a_run_bounded_by_epochs_validates_after_its_last_step(tmp_path):
    """max_epochs=1 of 100 samples, validation every 5 steps: the epoch's last step is validated too."""
    summary = train(cfg_of(*FAST, *VAL, "dataset.generator.samples=100", "trainer.max_steps=-1", "trainer.max_epochs=1",
                           "trainer.val_check_interval=5", f"run_dir={tmp_path}"))
    steps = summary["steps"]
    assert steps % 5  # the epoch does not end on an interval's step, else this would test nothing
    assert val_steps(tmp_path) == [*range(4, steps - 1, 5), steps - 1]


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_pipeline_validation_equals_the_single_process_one(tmp_path):
    """cluster=cpu_pp2 runs validation forward only through the pipeline: the last stage measures, the other
    adds zeros; the values equal one process's at the same steps (same weights, same held-out samples). The best
    checkpoint, a distributed checkpoint folder there, holds the lowest val/loss the run logged and its step."""
    rows = {}
    pp = ["cluster=cpu_pp2", "plan.use=uniform", "callbacks=[checkpoint,lr_monitor,best_checkpoint]"]
    for name, extra in (("pp", pp), ("one", ["balance.micro_batches=4"])):
        out = subprocess.run([sys.executable, "-m", "omnibal_pl.cli.train", *extra, f"hydra.run.dir={tmp_path / name}",
                              *FAST, *VAL], capture_output=True, text=True, timeout=380)
        assert out.returncode == 0, out.stderr[-3000:]
        rows[name] = val_rows(tmp_path / name)
    assert sorted(rows["pp"]) == sorted(rows["one"]) == [1, 3]
    for step in (1, 3):
        assert rows["pp"][step]["loss"] == pytest.approx(rows["one"][step]["loss"], rel=1e-5)
        assert rows["pp"][step]["acc"] == pytest.approx(rows["one"][step]["acc"], rel=1e-6)

    best = tmp_path / "pp" / "checkpoints" / "best" / "best.ckpt"
    assert (best / ".metadata").is_file()
    meta = load_meta(best / META_FILE)
    best_step = min(rows["pp"], key=lambda step: rows["pp"][step]["loss"])
    best_score = float(val_loss_checkpoint_state(meta)["best_model_score"])
    assert best_score == pytest.approx(rows["pp"][best_step]["loss"], rel=1e-6)
    assert meta["global_step"] == best_step + 1  # metrics.csv logs the step index, the checkpoint the steps done


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_process_ddp_validation(tmp_path):
    out = subprocess.run([sys.executable, "-m", "omnibal_pl.cli.train", "cluster.devices=2", "cluster.strategy=ddp",
                          f"hydra.run.dir={tmp_path}", *FAST, *VAL], capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = val_rows(tmp_path)
    assert sorted(rows) == [1, 3] and all(0 < r["loss"] < 20 and 0 <= r["acc"] <= 1 for r in rows.values())
    assert json.loads((tmp_path / "balance_report.json").read_text())["dp_size"] == 2
