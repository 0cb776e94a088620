"""Varlen attention backends agree with each other and with a dense masked reference."""
import pytest
import torch

from omnibal_pl.errors import ConfigError
from omnibal_pl.model.attention import flash_available, resolve_backend, varlen_attention

SEGMENTS = [5, 17, 1, 33, 8]  # includes a length-1 segment and one longer than a flex block row


def _inputs(heads: int, kv_heads: int, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    total = sum(SEGMENTS)
    q = torch.randn(total, heads, 16, generator=gen).to(device, dtype)
    k = torch.randn(total, kv_heads, 16, generator=gen).to(device, dtype)
    v = torch.randn(total, kv_heads, 16, generator=gen).to(device, dtype)
    cu = torch.tensor([0] + SEGMENTS).cumsum(0).to(torch.int32)
    return q, k, v, cu


def _dense_reference(q, k, v, cu, causal):
    """softmax(QK^T / sqrt(d)) V with an explicit block-diagonal (and causal) mask."""
    total = q.shape[0]
    doc = torch.searchsorted(cu.long(), torch.arange(total), right=True) - 1
    mask = doc[:, None] == doc[None, :]
    if causal:
        mask &= torch.ones(total, total, dtype=torch.bool).tril()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def _run(backend, q, k, v, cu, causal):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = varlen_attention(q, k, v, cu, max(SEGMENTS), causal=causal, backend=backend)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _reference(q, k, v, cu, causal):
    qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    ref = _dense_reference(qr, kr, vr, cu, causal)
    (ref * torch.linspace(-1, 1, ref.numel()).view_as(ref)).sum().backward()
    return ref.detach(), qr.grad, kr.grad, vr.grad


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_sdpa_matches_dense_reference_including_gradients(causal, heads, kv_heads):
    q, k, v, cu = _inputs(heads, kv_heads)
    for name, a, r in zip(("out", "dq", "dk", "dv"), _run("sdpa", q, k, v, cu, causal), _reference(q, k, v, cu, causal)):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=2e-5, msg=name)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_flex_matches_sdpa_forward_on_cpu(causal, heads, kv_heads):
    q, k, v, cu = _inputs(heads, kv_heads)
    with torch.no_grad():
        flex = varlen_attention(q, k, v, cu, max(SEGMENTS), causal=causal, backend="flex")
        sdpa = varlen_attention(q, k, v, cu, max(SEGMENTS), causal=causal, backend="sdpa")
    torch.testing.assert_close(flex, sdpa, atol=2e-5, rtol=2e-5)


def test_flex_backward_on_cpu_is_refused_clearly():
    q, k, v, cu = _inputs(2, 2)
    with pytest.raises(ConfigError, match="no backward on CPU"):
        varlen_attention(q.requires_grad_(True), k, v, cu, max(SEGMENTS), causal=True, backend="flex")


def test_segments_are_isolated():
    q, k, v, cu = _inputs(2, 2)
    base = varlen_attention(q, k, v, cu, max(SEGMENTS), causal=False, backend="sdpa")
    v2 = v.clone()
    v2[: SEGMENTS[0]] += 100.0  # change only the first segment
    out = varlen_attention(q, k, v2, cu, max(SEGMENTS), causal=False, backend="sdpa")
    assert not torch.allclose(out[: SEGMENTS[0]], base[: SEGMENTS[0]])
    torch.testing.assert_close(out[SEGMENTS[0] :], base[SEGMENTS[0] :])


def test_backend_resolution_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("flex", torch.device("cpu")) == "flex"
    with pytest.raises(ConfigError, match="flash"):
        resolve_backend("flash", torch.device("cpu"))
    with pytest.raises(ConfigError, match="unknown"):
        resolve_backend("xformers", torch.device("cpu"))


def _compare_on_cuda(backend, causal):
    q, k, v, cu = _inputs(8, 2, dtype=torch.bfloat16, device="cuda")
    cu = cu.cuda()
    got = _run(backend, q, k, v, cu, causal)
    expected = _run("sdpa", q, k, v, cu, causal)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2, msg=f"{backend} {name}")


@pytest.mark.gpu
@pytest.mark.skipif(not flash_available(), reason="needs CUDA and a flash varlen kernel")
@pytest.mark.parametrize("causal", [True, False])
def test_flash_matches_sdpa_on_cuda_including_gradients(causal):
    _compare_on_cuda("flash", causal)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [True, False])
def test_flex_matches_sdpa_on_cuda_including_gradients(causal):
    _compare_on_cuda("flex", causal)
