"""The chunked cross-entropy of ``packed_loss_sum``: the same loss and gradients as the plain fp32 formula,
computed without an fp32 copy of the whole logits in the forward or the backward."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from omnibal_pl.batch import IGNORE_INDEX, PackedBatch
from omnibal_pl.errors import ConfigError
from omnibal_pl.train.objective import packed_loss_sum

L, VOCAB = 24, 40  # chunk sizes below: 1, 8 and 24 divide L, 5 and 7 do not, 100 exceeds it
UPSTREAM = 1.7  # d(outer loss)/d(loss_sum) in the gradient tests, so a backward that drops it fails
BF16_ULP = 2.0**-7  # bf16's relative rounding step: the two gradients are the same fp32 value, rounded once


def make_batch(length: int = L, vocab: int = VOCAB, seed: int = 0) -> PackedBatch:
    """A packed batch whose labels and weights exercise every case: ignored labels (some with a nonzero
    ``loss_weight``, which must still count 0), zero weights on real labels, and distinct positive weights."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (1, length), generator=g)
    labels[0, torch.randperm(length, generator=g)[: length // 3]] = IGNORE_INDEX
    weight = torch.rand(1, length, generator=g) + 0.5
    weight[0, torch.randperm(length, generator=g)[: length // 6]] = 0.0
    ids = torch.zeros(1, length, dtype=torch.long)
    return PackedBatch(input_ids=ids, labels=labels, position_ids=torch.arange(length)[None],
                       cu_seqlens=torch.tensor([0, length], dtype=torch.int32), max_seqlen=length,
                       pixel_values=torch.zeros(1, 3, 2, 2), image_flags=torch.zeros(1, dtype=torch.long),
                       loss_weight=weight, sample_ids=torch.zeros(1, dtype=torch.long), num_samples=1)


def plain_loss_sum(logits: torch.Tensor, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: (sum_t w_t * CE_t, sum_t w_t) with the whole logits upcast, position t -> label t + 1."""
    labels = batch.labels[:, 1:].flatten()
    weight = batch.loss_weight[:, 1:].flatten() * (labels != IGNORE_INDEX)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return (ce * weight).sum(), weight.sum()


def make_logits(dtype: torch.dtype, length: int = L, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(1, length, vocab, generator=g)).to(dtype)


def loss_and_grad(fn: Callable, logits: torch.Tensor, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """(loss_sum, weight, d(UPSTREAM * loss_sum)/d logits) of ``fn`` on a fresh leaf copy of ``logits``."""
    leaf = logits.detach().clone().requires_grad_()
    loss_sum, weight = fn(leaf, batch)
    (UPSTREAM * loss_sum).backward()
    return loss_sum.detach(), weight, leaf.grad


def assert_grads_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32: fp32 tolerance; bf16: at most one bf16 rounding step apart (both round an fp32 gradient)."""
    assert got.dtype == expected.dtype
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, expected)
    else:
        torch.testing.assert_close(got.float(), expected.float(), rtol=BF16_ULP, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 5, 7, 8, L, 100])
def test_loss_and_logit_gradient_equal_the_plain_formula(dtype, chunk):
    batch, logits = make_batch(), make_logits(dtype)
    got_loss, got_weight, got_grad = loss_and_grad(lambda x, b: packed_loss_sum(x, b, chunk), logits, batch)
    loss, weight, grad = loss_and_grad(plain_loss_sum, logits, batch)
    assert got_loss.dtype == torch.float32 and got_loss.shape == ()
    torch.testing.assert_close(got_loss, loss)
    torch.testing.assert_close(got_weight, weight)
    assert_grads_close(got_grad, grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [5, 8, 100])
def test_parameter_gradients_through_a_tiny_model_equal_the_plain_formula(dtype, chunk):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 16), torch.nn.Tanh(), torch.nn.Linear(16, VOCAB))
    batch = make_batch()
    tokens = torch.randint(0, VOCAB, (1, L))

    def param_grads(loss_fn: Callable) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss_sum, weight = loss_fn(model(tokens).to(dtype), batch)
        (loss_sum / weight).backward()
        return loss_sum.detach(), [p.grad for p in model.parameters()]

    got_loss, got = param_grads(lambda x, b: packed_loss_sum(x, b, chunk))
    loss, expected = param_grads(plain_loss_sum)
    torch.testing.assert_close(got_loss, loss)
    tolerance = {} if dtype == torch.float32 else {"rtol": BF16_ULP, "atol": 1e-5}  # one bf16 rounding step
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **tolerance)


def test_unsupervised_positions_take_no_loss_and_get_no_gradient():
    """Positions whose next label is ignored or has weight 0, and the last position, do not matter:
    changing their logits leaves the loss as is, and their gradient rows are exactly 0."""
    batch, logits = make_batch(), make_logits(torch.float32)
    weight = batch.loss_weight[0, 1:] * (batch.labels[0, 1:] != IGNORE_INDEX)
    dead = torch.cat([weight == 0, torch.tensor([True])])
    assert 0 < int(dead.sum()) < L - 1
    loss, _, grad = loss_and_grad(lambda x, b: packed_loss_sum(x, b, 5), logits, batch)
    assert torch.equal(grad[0, dead], torch.zeros_like(grad[0, dead]))
    assert bool((grad[0, ~dead] != 0).any(dim=-1).all())
    changed = logits.clone()
    changed[0, dead] = 50 * torch.randn(int(dead.sum()), VOCAB)
    torch.testing.assert_close(packed_loss_sum(changed, batch, 5)[0], loss)


def test_a_batch_without_supervised_tokens_has_zero_loss_weight_and_gradient():
    batch = make_batch()
    batch.labels.fill_(IGNORE_INDEX)
    loss, weight, grad = loss_and_grad(lambda x, b: packed_loss_sum(x, b, 7), make_logits(torch.bfloat16), batch)
    assert float(loss) == 0.0 and float(weight) == 0.0
    assert not grad.any()


def test_a_chunk_needs_a_position():
    with pytest.raises(ConfigError, match="chunk_tokens"):
        packed_loss_sum(make_logits(torch.float32), make_batch(), 0)


# --- memory: no fp32 tensor as large as the logits, saved for the backward or created in either pass ---

BIG_L, BIG_VOCAB, BIG_CHUNK = 64, 512, 16  # large enough that a chunk is far smaller than the logits


def saved_fp32_numels(fn: Callable, logits: torch.Tensor) -> list[int]:
    """Sizes (elements) of the fp32 tensors the autograd graph of ``fn(logits)`` saves for the backward."""
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.float32:
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(logits.detach().clone().requires_grad_(), make_batch(BIG_L, BIG_VOCAB))
    return sizes


class CreatedTensors(TorchDispatchMode):
    """Records (dtype, numel) of every tensor an aten op returns, forward and backward alike."""

    def __init__(self) -> None:
        super().__init__()
        self.created: list[tuple[torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.created += [(t.dtype, t.numel()) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def largest_fp32_created(fn: Callable, logits: torch.Tensor) -> int:
    """Elements of the largest fp32 tensor any op creates (or returns as a view) in ``fn``'s forward and backward."""
    leaf = logits.detach().clone().requires_grad_()
    batch = make_batch(BIG_L, BIG_VOCAB)
    with CreatedTensors() as mode:
        fn(leaf, batch)[0].backward()
    return max(n for dtype, n in mode.created if dtype == torch.float32)


def chunked(x: torch.Tensor, b: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    return packed_loss_sum(x, b, BIG_CHUNK)


def test_no_full_size_fp32_tensor_is_saved_for_the_backward():
    """bf16 logits (fp32 ones would be saved as themselves, which costs nothing): the plain formula saves
    fp32 log-probabilities of all positions, the chunked one only per-position scalars."""
    logits = make_logits(torch.bfloat16, BIG_L, BIG_VOCAB)
    assert max(saved_fp32_numels(plain_loss_sum, logits)) >= (BIG_L - 1) * BIG_VOCAB  # the check sees the bug
    assert max(saved_fp32_numels(chunked, logits)) <= BIG_L


def test_no_fp32_tensor_larger_than_one_chunk_is_created_forward_or_backward():
    """bf16 logits (fp32 ones get an fp32 gradient by definition): the plain formula creates fp32 tensors of
    all positions in both passes, the chunked one nothing larger than its one [chunk, vocab] buffer."""
    logits = make_logits(torch.bfloat16, BIG_L, BIG_VOCAB)
    assert largest_fp32_created(plain_loss_sum, logits) >= (BIG_L - 1) * BIG_VOCAB  # the check sees the bug
    assert largest_fp32_created(chunked, logits) == BIG_CHUNK * BIG_VOCAB
