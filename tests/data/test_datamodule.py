"""OmniBalDataModule inside real Lightning runs: mid-epoch resume (micro-batch and whole-step items), set_epoch,
2-process DDP, the stats cache, and the DP size the caps were resolved for."""
from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from tokenizers import Tokenizer

from omnibal_pl.balance import BalanceConfig, dist_ratio
from omnibal_pl.data.datamodule import OmniBalDataModule
from omnibal_pl.data.training_data import ModelSpec, prepare_training_data, real_statistics
from omnibal_pl.errors import ConfigError

from tests.helpers import LLAVA_TILING, RecordingModule, llava_dataset_node, llava_records, make_tokenizer, write_json

SPEC = ModelSpec(vocab_size=100, image_size=8, tokens_per_tile=4, image_context_id=3)
SYNTHETIC = {"name": "synthetic", "kind": "synthetic", "generator": {"samples": 300, "seed": 0}, "text_scale": 0.1}


def datamodule(micro: int = 1, dp: int = 1, **kw) -> OmniBalDataModule:
    return OmniBalDataModule.from_config(SYNTHETIC, BalanceConfig(dp=dp, micro_batches=micro, samples_per_group=4), SPEC,
                                         **kw)


def trainer(tmp_path: Path, **kw) -> L.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                use_distributed_sampler=False, default_root_dir=tmp_path, enable_checkpointing=False)
    args.update(kw)
    return L.Trainer(**args)


@pytest.mark.parametrize("micro", [1, 2])
def test_kill_and_resume_mid_epoch_sees_every_sample_once(tmp_path, micro):
    full = RecordingModule()
    trainer(tmp_path, max_epochs=1, accumulate_grad_batches=micro).fit(full, datamodule=datamodule(micro))
    order = [r["ids"] for r in full.seen]
    steps = len(order) // micro
    cut = random.Random(micro).randint(1, steps - 1)  # kill after a random optimizer step
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    first = RecordingModule()
    trainer(tmp_path, max_steps=cut, accumulate_grad_batches=micro, enable_checkpointing=True,
            callbacks=[ckpt]).fit(first, datamodule=datamodule(micro))
    path = tmp_path / "ckpt" / f"epoch=0-step={cut}.ckpt"
    second = RecordingModule()
    trainer(tmp_path, max_epochs=1, accumulate_grad_batches=micro).fit(second, datamodule=datamodule(micro),
                                                                        ckpt_path=path)
    resumed = [r["ids"] for r in first.seen] + [r["ids"] for r in second.seen]
    assert resumed == order  # the exact remaining sequence: nothing repeated, nothing skipped
    ids = [i for b in resumed for i in b]
    carried = datamodule(micro)
    carried.setup()
    leftover = carried.sampler.leftover(0).tolist()  # a partial step, trained next epoch
    assert len(ids) == len(set(ids)) and sorted(ids + leftover) == list(range(300))  # each sample exactly once
    assert second.seen[0]["batch_idx"] == cut * micro


def test_set_epoch_is_called_by_lightning(tmp_path):
    dm, module = datamodule(), RecordingModule()
    trainer(tmp_path, max_epochs=3).fit(module, datamodule=dm)
    assert dm.sampler.epoch == 2
    by_epoch = [[r["ids"] for r in module.seen if r["epoch"] == e] for e in range(3)]
    for e in range(3):
        arrangement = dm.sampler.arrangement(e)
        assert by_epoch[e] == [arrangement.grouping.group(g).tolist() for g in arrangement.rank_groups(0)]
    assert by_epoch[0] != by_epoch[1] != by_epoch[2]


def test_micro_batches_have_the_cap_shapes(tmp_path):
    dm, module = datamodule(), RecordingModule()
    trainer(tmp_path, max_steps=5).fit(module, datamodule=dm)
    caps = dm.balance
    assert {tuple(r["shape"]) for r in module.seen} == {(1, caps.token_cap)}
    assert {r["tile_shape"][0] for r in module.seen} == {caps.vit_cap}
    report = dm.balance_report(0)
    assert report["samples_lost"] == 0 and report["samples"] == 300


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_process_ddp_fit_shards_balanced_disjoint_complete(tmp_path):
    out = tmp_path / "seen"
    out.mkdir()
    dm = datamodule(2, dp=2)
    trainer(tmp_path, max_epochs=1, devices=2, strategy="ddp_spawn", accumulate_grad_batches=2).fit(
        RecordingModule(str(out)), datamodule=dm)
    seen = [[json.loads(line) for line in (out / f"rank{r}.jsonl").read_text().splitlines()] for r in range(2)]
    assert len(seen[0]) == len(seen[1]) > 0  # equal step counts: no rank waits at a collective
    ids = [set(i for rec in rank for i in rec["ids"]) for rank in seen]
    assert not ids[0] & ids[1]  # disjoint
    # the same arrangement, rebuilt here: the carried-out samples are the only ones not trained
    rank0 = datamodule(2, dp=2, dp_rank=0)
    rank0.setup()
    assert ids[0] | ids[1] | set(rank0.sampler.leftover(0).tolist()) == set(range(300))
    tokens = np.array([[sum(r["tokens"] for r in rank[s * 2:(s + 1) * 2]) for rank in seen]
                       for s in range(len(seen[0]) // 2)])
    assert dist_ratio(tokens) < 0.02


def test_distributed_sampler_flag_must_be_off():
    class Connector:
        use_distributed_sampler = True
        is_distributed = True

    class FakeTrainer:
        _accelerator_connector = Connector()

    dm = datamodule()
    dm.trainer = FakeTrainer()
    with pytest.raises(ConfigError, match="use_distributed_sampler=False"):
        dm._check_trainer_flags()


def test_real_dataset_statistics_cached_next_to_the_data(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    tok = make_tokenizer(tmp_path / "tok")
    cfg = llava_dataset_node(root, tok)
    spec = ModelSpec(vocab_size=64, image_size=LLAVA_TILING.image_size, tokens_per_tile=9, image_context_id=8)
    balance = BalanceConfig(dp=1, vit_cap=4, token_cap=200)
    dm = OmniBalDataModule.from_config(cfg, balance, spec)
    caches = list(root.glob("train.json.lengths-*.obl"))
    assert len(caches) == 1
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch.input_ids.shape == (1, 200) and batch.pixel_values.shape[0] == 4
    # the cache is used as is, and rebuilt with a warning when the data changes
    assert np.array_equal(dm.lengths.tokens, real_statistics(dm.dataset, cfg).table.tokens)
    records = llava_records(root)[:3]
    write_json(Path(cfg["annotation"]), records)
    with pytest.warns(UserWarning, match="no longer matches its data"):
        prepare_training_data(cfg, balance, spec)
    new = list(root.glob("train.json.lengths-*.obl"))
    assert len(new) == 1 and new != caches
    # the same tokenizer path with other contents: the counts may differ, so the cache is rebuilt too
    raw = Tokenizer.from_file(str(tok / "tokenizer.json"))
    raw.add_tokens(["zebra"])
    raw.save(str(tok / "tokenizer.json"))
    with pytest.warns(UserWarning, match="no longer matches its data"):
        prepare_training_data(cfg, balance, spec)
    assert list(root.glob("train.json.lengths-*.obl")) not in (new, caches)


def test_synthetic_samples_longer_than_the_token_cap_are_truncated_not_failed():
    dm = OmniBalDataModule.from_config(SYNTHETIC, BalanceConfig(dp=1, samples_per_group=1, vit_cap=40, token_cap=50), SPEC)
    assert int(dm.lengths.tokens.max()) == 50
    longest = int(np.argmax(dm.lengths.tokens))
    assert dm.dataset[longest].num_tokens == 50


def test_a_tile_cap_below_the_largest_sample_fails_when_the_data_is_prepared():
    with pytest.raises(ConfigError, match="more tiles than balance.vit_cap=3"):
        prepare_training_data(SYNTHETIC, BalanceConfig(dp=1, vit_cap=3, token_cap=4096), SPEC)


def test_caps_resolved_for_another_dp_size_are_refused(tmp_path):
    dm = datamodule(dp=2)  # caps searched for 2 DP ranks, a one-process run
    with pytest.raises(ConfigError, match="resolved for 2 data-parallel ranks, the run has 1"):
        trainer(tmp_path, max_steps=1).fit(RecordingModule(), datamodule=dm)


def test_whole_step_items_hold_the_step_s_micro_batches_in_order_and_resume_exactly(tmp_path):
    micro = 3
    by_micro_batch = datamodule(micro)
    by_micro_batch.setup()
    expected = [b.sample_ids.tolist() for b in by_micro_batch.train_dataloader()]
    by_step = datamodule(micro, whole_steps=True)
    by_step.setup()
    loader = by_step.train_dataloader()
    items = list(loader)
    assert len(loader) == len(items) == len(expected) // micro
    assert all(isinstance(item, list) and len(item) == micro for item in items)
    assert [b.sample_ids.tolist() for item in items for b in item] == expected
    # a checkpoint after 2 steps records 2 x micro micro-batches done: the resumed loader starts at step 3
    by_step.trainer = SimpleNamespace(current_epoch=0, fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
        batch_progress=SimpleNamespace(current=SimpleNamespace(processed=2)))))
    state = by_step.state_dict()
    assert state["sampler"]["batches_done"] == 2 * micro
    resumed = datamodule(micro, whole_steps=True)
    resumed.load_state_dict(state)
    resumed.setup()
    assert [b.sample_ids.tolist() for item in resumed.train_dataloader() for b in item] == expected[2 * micro:]
    one = datamodule(1, whole_steps=True)  # a one-micro-batch step is still a list
    one.setup()
    assert all(isinstance(item, list) and len(item) == 1 for item in one.train_dataloader())
