import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnibal_pl.batch import IGNORE_INDEX, PackedBatch
from omnibal_pl.data import PackingCollate, SyntheticDataset
from omnibal_pl.data.datasets import Sample
from omnibal_pl.errors import ConfigError, DataError
from omnibal_pl.lengths import LengthTable

TPT, CTX = 4, 3


def make_dataset(draw, n: int) -> SyntheticDataset:
    vit = np.array(draw(st.lists(st.integers(1, 3), min_size=n, max_size=n)))
    flag = np.array([draw(st.sampled_from([0, v])) for v in vit])
    tokens = flag * TPT + np.array(draw(st.lists(st.integers(1, 40), min_size=n, max_size=n)))
    return SyntheticDataset(LengthTable.from_arrays(vit, tokens, flag), vocab_size=64, image_size=6,
                            tokens_per_tile=TPT, image_context_id=CTX, seed=draw(st.integers(0, 9)))


def unpack(batch: PackedBatch, image_context_id: int, tokens_per_tile: int) -> list[Sample]:
    """The samples of a packed batch, in packing order: tokens and labels exactly, and each sample's
    real (flagged) tiles; a sample without real tiles gets one zero dummy tile with flag 0.

    Real tiles are assigned to samples by their image-context tokens (``tokens_per_tile`` per tile);
    unflagged tiles carry no features, so which sample a dummy tile came from is not recorded.
    """
    real_tiles = batch.pixel_values[batch.image_flags == 1]
    out: list[Sample] = []
    next_tile = 0
    for k in range(batch.num_samples):
        a, b = int(batch.cu_seqlens[k]), int(batch.cu_seqlens[k + 1])
        ids = batch.input_ids[0, a:b].clone()
        n = int((ids == image_context_id).sum()) // tokens_per_tile
        if n:
            pixels = real_tiles[next_tile : next_tile + n].clone()
            flags = torch.ones(n, dtype=torch.int64)
        else:
            pixels = batch.pixel_values.new_zeros(1, *batch.pixel_values.shape[1:])
            flags = torch.zeros(1, dtype=torch.int64)
        next_tile += n
        out.append(Sample(ids, batch.labels[0, a:b].clone(), pixels, flags, int(batch.sample_ids[k])))
    return out


@settings(max_examples=60, deadline=None)
@given(data=st.data(), pad_to=st.sampled_from(["cap", "multiple", "none"]), weighting=st.sampled_from(["token", "sample", "square"]))
def test_pack_unpack_round_trip_and_invariants(data, pad_to, weighting):
    n = data.draw(st.integers(1, 6))
    ds = make_dataset(data.draw, n)
    order = data.draw(st.permutations(range(n)))
    group = [ds[i] for i in order]
    n_tokens, n_tiles = sum(s.num_tokens for s in group), sum(s.num_tiles for s in group)
    token_cap = n_tokens + data.draw(st.integers(0, 100))
    vit_cap = n_tiles + data.draw(st.integers(0, 3))
    collate = PackingCollate(token_cap, vit_cap, pad_to=pad_to, multiple=16, loss_weighting=weighting,
                             image_context_id=CTX, tokens_per_tile=TPT)
    b = collate(group)

    L = {"cap": token_cap, "multiple": min(math.ceil(n_tokens / 16) * 16, token_cap), "none": n_tokens}[pad_to]
    assert b.input_ids.shape == b.labels.shape == b.position_ids.shape == b.loss_weight.shape == (1, L)
    T = vit_cap if pad_to == "cap" else n_tiles
    assert b.pixel_values.shape == (T, 3, 6, 6) and b.image_flags.shape == (T,)
    cu = b.cu_seqlens
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == L and (cu[1:] > cu[:-1]).all()
    assert len(cu) == n + 1 + (L > n_tokens) and b.num_samples == n and b.num_tokens == n_tokens
    assert b.max_seqlen == int((cu[1:] - cu[:-1]).max())
    assert (b.position_ids[0, cu[:-1].long()] == 0).all()
    assert torch.equal(b.position_ids[0, 1:][b.position_ids[0, 1:] != 0], (b.position_ids[0, :-1] + 1)[b.position_ids[0, 1:] != 0])
    assert ((b.loss_weight == 0) == (b.labels == IGNORE_INDEX)).all()
    assert b.sample_ids.tolist() == list(order)
    assert b.num_tiles * TPT == int((b.input_ids == CTX).sum())
    assert not b.pixel_values[n_tiles:].any() and not b.image_flags[n_tiles:].any()

    for s, u in zip(group, unpack(b, CTX, TPT)):
        assert u.sample_id == s.sample_id
        assert torch.equal(u.input_ids, s.input_ids) and torch.equal(u.labels, s.labels)
        real = s.image_flags == 1
        if real.any():
            assert torch.equal(u.pixel_values, s.pixel_values[real]) and u.image_flags.tolist() == [1] * int(real.sum())
        else:
            assert u.image_flags.tolist() == [0] and not u.pixel_values.any()


def test_loss_weights_per_sample():
    table = LengthTable.from_arrays([1, 1], [10, 21], [0, 0])
    ds = SyntheticDataset(table, vocab_size=64, image_size=6, tokens_per_tile=TPT, image_context_id=CTX)
    group = [ds[0], ds[1]]
    n = [int((s.labels != IGNORE_INDEX).sum()) for s in group]
    assert n == [5, 10]
    for weighting, w in [("token", [1, 1]), ("sample", [1 / 5, 1 / 10]), ("square", [5**-0.5, 10**-0.5])]:
        b = PackingCollate(64, 4, loss_weighting=weighting)(group)
        for k in range(2):
            seg = b.loss_weight[0, b.cu_seqlens[k] : b.cu_seqlens[k + 1]]
            torch.testing.assert_close(seg[seg > 0], torch.full((n[k],), float(w[k])))
        # per-sample totals: n, 1, sqrt(n)
        assert float(b.loss_weight.sum()) == pytest.approx({"token": 15, "sample": 2, "square": 5**0.5 + 10**0.5}[weighting])


@settings(max_examples=25, deadline=None)
@given(data=st.data(), weighting=st.sampled_from(["token", "sample", "square"]))
def test_weighted_loss_is_independent_of_the_grouping(data, weighting):
    """A token's weight depends only on its sample, so the globally normalised loss sum(w*l)/sum(w) is
    the same for any split of the samples into groups (DP ranks x micro-batches)."""
    n = data.draw(st.integers(2, 8))
    ds = make_dataset(data.draw, n)
    token_loss = {i: torch.rand(ds[i].num_tokens, generator=torch.Generator().manual_seed(i)) for i in range(n)}

    def global_loss(groups):
        num = den = 0.0
        for g in groups:
            b = PackingCollate(2000, 100, pad_to="multiple", loss_weighting=weighting)([ds[i] for i in g])
            losses = torch.zeros(b.input_ids.shape[1])
            for k, i in enumerate(g):
                losses[b.cu_seqlens[k] : b.cu_seqlens[k + 1]] = token_loss[i]
            num += float((b.loss_weight[0] * losses).sum())
            den += float(b.loss_weight.sum())
        return num / den if den else 0.0

    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1))))
    perm = data.draw(st.permutations(range(n)))
    groups = [perm[a:b] for a, b in zip([0] + cuts, cuts + [n])]
    assert global_loss(groups) == pytest.approx(global_loss([list(range(n))]), rel=1e-5)


def test_caps_and_bad_groups():
    table = LengthTable.from_arrays([2, 1], [2 * TPT + 5, 7], [2, 0])
    ds = SyntheticDataset(table, vocab_size=64, image_size=6, tokens_per_tile=TPT, image_context_id=CTX)
    group = [ds[0], ds[1]]
    with pytest.raises(DataError, match="token cap 19"):
        PackingCollate(19, 8)(group)
    with pytest.raises(DataError, match="tile cap 2"):
        PackingCollate(64, 2)(group)
    with pytest.raises(DataError, match="empty group"):
        PackingCollate(64, 8)([])
    with pytest.raises(DataError, match="image-context tokens"):
        PackingCollate(64, 8, image_context_id=CTX, tokens_per_tile=TPT + 1)(group)
    b = PackingCollate(20, 3, pad_to="cap")(group)  # exactly at the caps: no padding segment
    assert b.cu_seqlens.tolist() == [0, 13, 20] and b.image_flags.tolist() == [1, 1, 0]
    with pytest.raises(ConfigError, match="pad_to"):
        PackingCollate(64, 8, pad_to="max")
    with pytest.raises(ConfigError, match="loss_weighting"):
        PackingCollate(64, 8, loss_weighting="mean")
