"""The hot-path rule: no host sync inside a training micro-batch except where documented.

A host sync is a device tensor read by the host: ``Tensor.item``, ``.tolist``, ``.cpu``, ``int()``,
``float()``, ``bool()`` (and ``__index__``). On a CPU run every tensor is a host tensor, so the test counts
the calls made *from omnibal_pl's model, train and batch code* (the caller frame's file) during a 2-step
Lightning fit of the tiny model with 2 micro-batches per step; anything the training code reads from a
tensor there would be a device read on an accelerator. The loader side (``omnibal_pl/data``,
``omnibal_pl/balance``) runs on the CPU in loader workers by design and is not counted; the batches are
collated before the fit anyway.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch

import omnibal_pl
from omnibal_pl.conf import preset
from omnibal_pl.data.collate import PackingCollate
from omnibal_pl.data.synthetic import SyntheticDataset
from omnibal_pl.data.synthetic_lengths import adapt_to_model, synthetic_lengths
from omnibal_pl.model import VLMConfig
from omnibal_pl.train.module import OmniBalModule
from omnibal_pl.train.optim import OptimConfig

SYNC_METHODS = ("item", "tolist", "cpu", "__int__", "__float__", "__bool__", "__index__")
PACKAGE = Path(omnibal_pl.__file__).parent
HOT_PATH = ("model", "train", "batch.py")  # where training-step code lives (relative to the package)
STEPS, MICRO_BATCHES = 2, 2

# The allowed syncs, per optimizer step: (file, function) -> calls. Each reads the step's totals once,
# after the last micro-batch's backward (nothing is left to overlap with):
ALLOWED_PER_STEP = {
    # the all-reduced [loss_sum, W, tokens, samples, tiles, FLOPs]: W scales the gradients, the rest is logged
    ("train/module.py", "on_before_optimizer_step"): 1,
}
# Not exercised here (sparsification off): StepMeter.finish_step reads the step's keep-rate penalty once a
# step; find_spans, the Sparsifier and keep_rate_loss sync per micro-batch (documented in their docstrings).

TINY = VLMConfig.from_dict(preset("model", "tiny"))


def collated_batches(n: int) -> list:
    """``n`` micro-batches of 3 synthetic samples each, packed as the DataModule packs them (with the
    image-context id and tokens per tile, so the batches carry their image-token count), padded to the
    caps: every batch has padding tiles and a padding segment."""
    table = adapt_to_model(synthetic_lengths(3 * n, seed=5), TINY.tokens_per_tile, 0.2)
    ds = SyntheticDataset(table, TINY.llm.vocab_size, TINY.vision.image_size, TINY.tokens_per_tile,
                          TINY.image_context_id, seed=1)
    collate = PackingCollate(token_cap=1024, vit_cap=64, image_context_id=TINY.image_context_id,
                             tokens_per_tile=TINY.tokens_per_tile)
    batches = [collate([ds[3 * g + k] for k in range(3)]) for g in range(n)]
    assert all(b.num_tiles < 64 and len(b.seqlens) > b.num_samples for b in batches)
    return batches


def hot_path_site(frame) -> tuple[str, str] | None:
    """(file relative to the package, function) of a caller frame in the training hot path, else None."""
    path = Path(frame.f_code.co_filename)
    if not path.is_relative_to(PACKAGE):
        return None
    rel = path.relative_to(PACKAGE).as_posix()
    return (rel, frame.f_code.co_name) if rel.startswith(HOT_PATH) else None


def count_syncs(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Wrap the sync methods of ``torch.Tensor`` so that calls from hot-path code are counted by site."""
    calls: Counter = Counter()

    def wrap(name: str):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            site = hot_path_site(sys._getframe(1))
            if site is not None:
                calls[site + (name,)] += 1
            return original(self, *args, **kwargs)

        return counted

    for name in SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, wrap(name))
    return calls


def fit(batches: list) -> None:
    module = OmniBalModule(TINY, OptimConfig(lr=1e-3, warmup_ratio=0.0))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, accumulate_grad_batches=MICRO_BATCHES,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    trainer.fit(module, train_dataloaders=loader)
    assert len(module.losses) == STEPS


def test_training_micro_batches_read_no_device_tensor(monkeypatch):
    batches = collated_batches(STEPS * MICRO_BATCHES)
    calls = count_syncs(monkeypatch)
    fit(batches)
    by_site = Counter()
    for (path, function, _), n in calls.items():
        by_site[path, function] += n
    unexpected = {site: n for site, n in calls.items() if site[:2] not in ALLOWED_PER_STEP}
    assert not unexpected, f"host syncs in the training hot path: {unexpected}"
    for site, per_step in ALLOWED_PER_STEP.items():
        assert by_site[site] == per_step * STEPS, (site, by_site[site])


def test_collated_host_facts_match_the_tensors_and_survive_transfers():
    batch = collated_batches(1)[0]
    moved = batch.to("cpu", non_blocking=True)
    for b in (batch, moved):
        assert b.seqlens == tuple(torch.diff(batch.cu_seqlens).tolist()) and b.bounds == tuple(batch.cu_seqlens.tolist())
        assert b.num_tiles == int(batch.image_flags.sum()) < batch.image_flags.numel()
        assert b.image_tokens == int((batch.input_ids == TINY.image_context_id).sum()) == b.num_tiles * TINY.tokens_per_tile
        assert b.num_tokens == int(batch.cu_seqlens[batch.num_samples]) < batch.input_ids.shape[1]
