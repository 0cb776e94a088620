"""PackedBatch transfers: ``pin_memory()`` pins every tensor (DataLoader's pinning thread calls it) and
``to(device, non_blocking=True)`` hands the flag to every tensor's copy."""
from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from torch.utils.data import DataLoader

from omnibal_pl.batch import PackedBatch
from omnibal_pl.train.module import OmniBalModule

from tests.helpers import model_config

L, TILES = 8, 2


def make_batch() -> PackedBatch:
    """A 2-sample batch of L tokens (the last 2 padding) and TILES tiles, one real."""
    return PackedBatch(input_ids=torch.arange(L)[None], labels=torch.full((1, L), -100),
                       position_ids=torch.arange(L)[None],
                       cu_seqlens=torch.tensor([0, 3, 6, L], dtype=torch.int32), max_seqlen=3,
                       pixel_values=torch.randn(TILES, 3, 4, 4), image_flags=torch.tensor([1, 0]),
                       loss_weight=torch.ones(1, L), sample_ids=torch.tensor([4, 9]), num_samples=2)


def tensor_fields(batch: PackedBatch) -> dict[str, torch.Tensor]:
    return {f.name: v for f in fields(batch) if isinstance(v := getattr(batch, f.name), torch.Tensor)}


def test_pin_memory_pins_every_tensor_and_keeps_the_rest(monkeypatch):
    """CPU-only torch cannot pin, so ``Tensor.pin_memory`` is replaced by a recorder returning a marked copy."""
    pinned: dict[int, torch.Tensor] = {}

    def fake_pin(self: torch.Tensor) -> torch.Tensor:
        pinned[id(self)] = copy = self.clone()
        return copy

    batch = make_batch()
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    out = batch.pin_memory()
    before, after = tensor_fields(batch), tensor_fields(out)
    assert len(before) == 8 and len(pinned) == len(before)
    for name, tensor in before.items():
        assert after[name] is pinned[id(tensor)], name
        assert torch.equal(after[name], tensor), name
    assert (out.max_seqlen, out.num_samples) == (batch.max_seqlen, batch.num_samples)


def test_to_passes_non_blocking_to_every_tensor(monkeypatch):
    calls: list[tuple[int, object, bool]] = []
    original = torch.Tensor.to

    def recording_to(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        calls.append((id(self), args[0] if args else kwargs.get("device"), kwargs.get("non_blocking", False)))
        return original(self, *args, **kwargs)

    batch = make_batch()
    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    out = batch.to("cpu", non_blocking=True)
    assert sorted(calls, key=lambda c: c[0]) == sorted(((id(t), "cpu", True) for t in tensor_fields(batch).values()),
                                                       key=lambda c: c[0])
    calls.clear()
    batch.to("cpu")
    assert len(calls) == 8 and not any(flag for _, _, flag in calls)
    assert (out.max_seqlen, out.num_samples) == (batch.max_seqlen, batch.num_samples)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinning needs an accelerator)")
@pytest.mark.parametrize("per_item", [1, 3])
def test_a_pinned_loader_yields_pinned_batches(per_item):
    """DataLoader(pin_memory=True) pins a PackedBatch item and each PackedBatch of a list item (a step's
    micro-batches under pipeline parallelism), and ``to(cuda, non_blocking=True)`` then matches the host."""
    items = [[make_batch() for _ in range(per_item)] for _ in range(2)]
    collate = (lambda xs: xs[0][0]) if per_item == 1 else (lambda xs: xs[0])
    for item in DataLoader(items, batch_size=1, collate_fn=collate, pin_memory=True):
        batches = [item] if per_item == 1 else item
        assert len(batches) == per_item and all(isinstance(b, PackedBatch) for b in batches)
        for b in batches:
            assert all(t.is_pinned() for t in tensor_fields(b).values())
            moved = b.to("cuda", non_blocking=True)
            torch.cuda.current_stream().synchronize()
            pairs = zip(tensor_fields(moved).values(), tensor_fields(b).values())
            assert all(m.is_cuda and torch.equal(m.cpu(), t) for m, t in pairs)


def test_training_modules_move_batches_with_non_blocking_copies_on_cuda(monkeypatch):
    """Lightning hands every batch to ``transfer_batch_to_device``: on CUDA the copies must not block."""
    calls = []
    def record(self: PackedBatch, device: torch.device, non_blocking: bool = False) -> PackedBatch:
        calls.append((str(device), non_blocking))
        return self

    monkeypatch.setattr(PackedBatch, "to", record)
    module = OmniBalModule(model_config("tiny"))
    batch = make_batch()
    module.transfer_batch_to_device(batch, torch.device("cuda"), 0)
    module.transfer_batch_to_device([batch, batch], torch.device("cuda"), 0)  # a pipeline step's item
    module.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert calls == [("cuda", True)] * 3 + [("cpu", False)]
