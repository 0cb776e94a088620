"""Bad samples (omnibal_pl/data/skips.py): a start-time error naming the record, or a skip counted per reason,
at start (statistics, cached or not) and mid-run (a JPEG whose pixels do not decode), held to the budget."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from omnibal_pl.balance.config import BalanceConfig
from omnibal_pl.data import training_data
from omnibal_pl.data.collate import PackingCollate
from omnibal_pl.data.datamodule import OmniBalDataModule
from omnibal_pl.data.datasets import Sample
from omnibal_pl.data.skips import BadSampleError, DroppedSample, SkipCounts, TooManySkipped
from omnibal_pl.data.stats import compute_statistics
from omnibal_pl.data.training_data import ModelSpec, prepare_training_data
from omnibal_pl.errors import ConfigError, DataError
from omnibal_pl.train.skip_budget import SkipBudget
from omnibal_pl.train.step_metrics import StepMeter
from tests.helpers import (LLAVA_TILING, conversation, llava_dataset_node, llava_records, make_tokenizer, missing_image,
                           model_config, undecodable_pixels, write_jsonl)

SPEC = ModelSpec(vocab_size=64, image_size=LLAVA_TILING.image_size, tokens_per_tile=9, image_context_id=8)
CAPS = BalanceConfig(dp=1, vit_cap=4, token_cap=200)
KEYS = ["s0", "s1", "s2", "s3", "s4", "text", "multi"]  # llava_records, one per line of train.jsonl


def unreadable_header(root: Path, records: list[dict]) -> None:
    (root / "img0.png").write_bytes(b"not an image")  # s0 (line 1)


def placeholder_mismatch(root: Path, records: list[dict]) -> None:
    records[5]["conversations"] = conversation(images=1)  # "text" (line 6): an <image> but no image


def unknown_role(root: Path, records: list[dict]) -> None:
    records[2]["conversations"][1]["from"] = "robot"  # s2 (line 3)


def bad_node(tmp_path: Path, break_data, **extra) -> dict:
    """The LLaVA node of llava_records as JSONL (origins are file:line), broken by ``break_data``."""
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    node = llava_dataset_node(root, make_tokenizer(tmp_path / "tok"), **extra)
    records = llava_records(root)
    break_data(root, records)
    node["annotation"] = str(write_jsonl(root / "train.jsonl", records))
    return node


def row_keys(data) -> list[str]:
    """The record key of every row of the prepared dataset (under the DropUnreadable wrapper)."""
    ds = data.dataset.dataset
    return [ds.records[r].key for r in ds.index]


def row_keys_plain(data) -> list[str]:
    """The same, without the wrapper (``bad_samples=error``)."""
    return [data.dataset.records[r].key for r in data.dataset.index]


START_CASES = [  # (break, reason, key, line, file named)
    (missing_image, "missing_image", "s4", 5, "img4.png"),
    (unreadable_header, "unreadable_image", "s0", 1, "img0.png"),
    (placeholder_mismatch, "bad_conversation", "text", 6, "placeholders"),
    (unknown_role, "bad_conversation", "s2", 3, "robot"),
]


@pytest.mark.parametrize("break_data, reason, key, line, named", START_CASES, ids=[c[0].__name__ for c in START_CASES])
def test_a_bad_record_is_an_error_naming_it_or_a_counted_skip_of_exactly_that_record(tmp_path, break_data, reason,
                                                                                      key, line, named):
    node = bad_node(tmp_path, break_data)
    with pytest.raises(BadSampleError, match=rf"train.jsonl:{line}\b.*{named}.*bad_samples=skip") as e:
        prepare_training_data(node, CAPS, SPEC)
    assert e.value.reason == reason
    data = prepare_training_data({**node, "bad_samples": "skip", "max_skip_fraction": 0.5}, CAPS, SPEC)
    assert data.skipped.counts == {reason: 1} and data.skipped.records == 7
    # exactly that record left out, the others in their order, each row's statistics those of its sample
    assert row_keys(data) == [k for k in KEYS if k != key]
    assert [data.dataset[i].num_tokens for i in range(6)] == data.lengths.tokens.tolist()
    assert [int(data.dataset[i].image_flags.sum()) for i in range(6)] == data.lengths.image_flag.tolist()


def test_a_truncated_line_is_an_error_naming_file_and_line_or_a_counted_skip_of_that_line(tmp_path):
    node = bad_node(tmp_path, lambda root, records: None)
    lines = Path(node["annotation"]).read_text().splitlines(keepends=True)
    lines[3] = lines[3][: len(lines[3]) // 2] + "\n"  # a download cut mid-line (sample s3)
    Path(node["annotation"]).write_text("".join(lines))
    with pytest.raises(BadSampleError, match=r"train.jsonl:4\b.*malformed JSON.*bad_samples=skip") as e:
        prepare_training_data(node, CAPS, SPEC)
    assert e.value.reason == "malformed_row"
    data = prepare_training_data({**node, "bad_samples": "skip", "max_skip_fraction": 0.5}, CAPS, SPEC)
    assert data.skipped.counts == {"malformed_row": 1} and data.skipped.records == 7
    assert row_keys(data) == [k for k in KEYS if k != "s3"]
    assert [data.dataset[i].num_tokens for i in range(6)] == data.lengths.tokens.tolist()


def test_a_cached_run_leaves_out_the_same_records_and_errors_alike(tmp_path, monkeypatch):
    node = bad_node(tmp_path, missing_image, bad_samples="skip", max_skip_fraction=0.5)
    first = prepare_training_data(node, CAPS, SPEC)
    root = Path(node["annotation"]).parent
    assert len(list(root.glob("train.jsonl.lengths-*.obl"))) == len(list(root.glob("train.jsonl.lengths-*.bad.json"))) == 1

    def recompute(*args, **kwargs):
        raise AssertionError("the statistics should come from the cache")

    monkeypatch.setattr(training_data, "compute_statistics", recompute)
    cached = prepare_training_data(node, CAPS, SPEC)
    assert row_keys(cached) == row_keys(first) == [k for k in KEYS if k != "s4"]
    assert cached.skipped == first.skipped and np.array_equal(cached.lengths.tokens, first.lengths.tokens)
    with pytest.raises(BadSampleError, match=r"train.jsonl:5\b.*img4.png"):
        prepare_training_data({**node, "bad_samples": "error"}, CAPS, SPEC)


def test_statistics_in_worker_processes_find_the_same_bad_records(tmp_path):
    node = bad_node(tmp_path, missing_image)
    node["bad_samples"] = "skip"
    dataset = training_data.build_dataset(node)
    alone, pooled = compute_statistics(dataset), compute_statistics(dataset, num_workers=2, chunk_size=2)
    assert list(alone.bad) == list(pooled.bad) == [4] and pooled.bad[4].reason == "missing_image"
    assert np.array_equal(alone.table.tokens, pooled.table.tokens)


def test_the_budget_is_a_fraction_of_the_records_exceeded_not_reached(tmp_path):
    node = bad_node(tmp_path, missing_image, bad_samples="skip")
    prepare_training_data({**node, "max_skip_fraction": 1 / 7}, CAPS, SPEC)  # 1 of 7: reached, not exceeded
    for limit in (0.14, 0.0):
        with pytest.raises(TooManySkipped, match=r"at start: 1 of 7 samples are bad \(missing_image 1\)"):
            prepare_training_data({**node, "max_skip_fraction": limit}, CAPS, SPEC)
    with pytest.raises(ConfigError, match="bad_samples"):
        prepare_training_data({**node, "bad_samples": "drop"}, CAPS, SPEC)


def test_overlong_skips_join_the_counts_but_not_the_budget_and_overlong_errors_name_the_line(tmp_path):
    node = bad_node(tmp_path, lambda root, records: None, max_skip_fraction=0.0)
    longest = int(prepare_training_data(node, CAPS, SPEC).lengths.tokens.max())  # the two-image sample
    cap = BalanceConfig(dp=1, vit_cap=4, token_cap=longest - 1)
    data = prepare_training_data({**node, "overlong": "skip"}, cap, SPEC)
    assert data.skipped.counts == {"overlong": 1} and row_keys_plain(data) == KEYS[:-1]
    with pytest.raises(DataError, match=r"longer than max_tokens=.*train.jsonl:7 \(id multi\)"):
        prepare_training_data(node, cap, SPEC)


def epoch_of(data) -> tuple[list[str], dict[str, int]]:
    """The record keys of every sample one epoch trains on, and the loader's drops by reason."""
    dm = OmniBalDataModule(data, dp_rank=0)
    dm.setup()
    ds = data.dataset.dataset
    trained, dropped = [], {}
    for batch in dm.train_dataloader():
        trained += [ds.records[ds.index[i]].key for i in batch.sample_ids.tolist()]
        for reason, n in batch.skipped.items():
            dropped[reason] = dropped.get(reason, 0) + n
    return sorted(trained), dropped


def test_an_image_that_fails_to_decode_mid_run_is_dropped_from_its_group_and_counted(tmp_path):
    node = bad_node(tmp_path, undecodable_pixels, bad_samples="skip", max_skip_fraction=0.5)
    data = prepare_training_data(node, CAPS, SPEC)
    assert data.skipped.counts == {}  # its header reads: nothing to see at start
    trained, dropped = epoch_of(data)
    assert trained == sorted(k for k in KEYS if k != "s2") and dropped == {"unreadable_image": 1}
    strict = prepare_training_data({**node, "bad_samples": "error"}, CAPS, SPEC)
    with pytest.raises(BadSampleError, match=r"train.jsonl:3\b.*img2.jpg.*corrupt"):
        [strict.dataset[i] for i in range(len(strict.dataset))]


def sample(sample_id: int, tokens: int = 5) -> Sample:
    ids = torch.arange(1, tokens + 1)
    return Sample(ids, ids.clone(), torch.zeros(1, 3, 4, 4), torch.zeros(1, dtype=torch.int64), sample_id)


def dropped(sample_id: int, reason: str = "unreadable_image") -> DroppedSample:
    return DroppedSample(sample_id, reason, torch.zeros(1, 3, 4, 4))


def test_the_collate_packs_the_rest_of_the_group_and_pads_a_group_of_nothing_else():
    collate = PackingCollate(token_cap=32, vit_cap=4)
    batch = collate([sample(3), dropped(4), sample(5, 7), dropped(6, "missing_image")])
    assert batch.sample_ids.tolist() == [3, 5] and batch.num_tokens == 12 and batch.seqlens == (5, 7, 20)
    assert batch.skipped == {"unreadable_image": 1, "missing_image": 1}
    assert collate([sample(3)]).skipped == {}
    # every sample dropped: padding only, at the caps' shape (every DP rank still runs the step), nothing supervised
    empty = collate([dropped(4), dropped(6)])
    assert (empty.num_samples, empty.sample_ids.tolist(), empty.seqlens, empty.num_tiles) == (0, [], (32,), 0)
    assert empty.pixel_values.shape == (4, 3, 4, 4) and empty.skipped == {"unreadable_image": 2}
    assert float(empty.loss_weight.sum()) == 0 and bool((empty.labels == -100).all())
    unpadded = PackingCollate(token_cap=32, vit_cap=4, pad_to="none")([dropped(4)])
    assert unpadded.input_ids.shape == (1, 1) and unpadded.pixel_values.shape == (1, 3, 4, 4)


def test_the_step_meter_adds_the_loaders_drops_to_the_reduced_totals_and_keeps_the_global_sum():
    meter = StepMeter(model_config("tiny"), peak_tflops=None)
    collate = PackingCollate(token_cap=32, vit_cap=4)
    meter.account(collate([sample(0), dropped(1), dropped(2)]))
    meter.account(collate([sample(3), dropped(4, "missing_image")]))
    assert meter.work_totals(torch.device("cpu")).tolist()[4:] == [1, 2]  # missing_image, unreadable_image
    # the global totals (all ranks) of two steps: the logged counts are the sums since the fit began
    assert meter.finish_step(1.0, [10, 2, 2, 1e9, 1, 5], 1e-3, 2, 1.0)["skipped/unreadable_image"] == 5
    assert meter.work_totals(torch.device("cpu")).tolist()[4:] == [0, 0]  # the next step starts at 0
    metrics = meter.finish_step(1.0, [10, 2, 2, 1e9, 0, 2], 1e-3, 2, 1.0)
    assert (metrics["skipped/missing_image"], metrics["skipped/unreadable_image"]) == (1, 7)


def test_the_mid_run_budget_counts_the_start_and_this_epochs_drops_and_survives_a_resume():
    def module() -> SimpleNamespace:
        return SimpleNamespace(meter=SimpleNamespace(dropped_total={"missing_image": 0, "unreadable_image": 0}))

    def budget_for(trainer: SimpleNamespace, pl_module: SimpleNamespace) -> SkipBudget:
        budget = SkipBudget(SkipCounts({"missing_image": 1, "overlong": 5}, records=10), limit=0.2)
        budget.setup(trainer, pl_module, "fit")
        return budget

    trainer, first = SimpleNamespace(current_epoch=0, global_step=3), module()
    budget = budget_for(trainer, first)
    budget.on_train_epoch_start(trainer, first)
    first.meter.dropped_total["unreadable_image"] = 1
    budget.on_train_batch_end(trainer, first, None, None, 0)  # 2 of 10 bad: reached, not exceeded
    first.meter.dropped_total["unreadable_image"] = 2
    with pytest.raises(TooManySkipped, match=r"epoch 0, step 3: 3 of 10 samples are bad \(missing_image 1, "
                                             r"unreadable_image 2\)"):
        budget.on_train_batch_end(trainer, first, None, None, 1)
    trainer.current_epoch = 1
    budget.on_train_epoch_start(trainer, first)  # each epoch on its own: the 2 drops were epoch 0's
    first.meter.dropped_total["unreadable_image"] = 3
    budget.on_train_batch_end(trainer, first, None, None, 0)
    # a checkpoint here, resumed inside epoch 1: the counts come back, and epoch 1's drop still counts
    state = budget.state_dict()
    resumed = module()
    again = budget_for(trainer, resumed)
    again.load_state_dict(state)
    assert resumed.meter.dropped_total == {"missing_image": 0, "unreadable_image": 3}
    again.on_train_epoch_start(trainer, resumed)
    resumed.meter.dropped_total["unreadable_image"] = 4
    with pytest.raises(TooManySkipped, match=r"unreadable_image 2\)"):
        again.on_train_batch_end(trainer, resumed, None, None, 1)
