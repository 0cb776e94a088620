"""Varlen attention backends agree with each other and with a dense masked reference; the backend
choice checks device, compute capability, dtype and real importability, falls back in order and logs once."""
import dataclasses
import functools
import importlib.abc
import importlib.util
import logging
import sys

import pytest
import torch

from omnibal_pl.errors import ConfigError
from omnibal_pl.model import attention
from omnibal_pl.model.attention import (
    AvailableKernels, available_kernels, choose_backend, explain_backend, flash_available, reset_backend_caches,
    resolve_backend, varlen_attention,
)

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
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "sdpa"
    assert resolve_backend("auto", "cpu", torch.bfloat16) == "sdpa"
    assert resolve_backend("flex", torch.device("cpu"), torch.float32) == "flex"
    with pytest.raises(ConfigError, match="flash"):
        resolve_backend("flash", torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ConfigError, match="unknown"):
        resolve_backend("xformers", torch.device("cpu"), torch.float32)


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


# --------------------------------------------------------------------------------------------------
# Backend choice: pure decision table, errors, logging, real import probes


@pytest.fixture(autouse=True)
def _fresh_backend_caches():
    """Each test sees fresh import probes and logs (torn down after monkeypatch restores the module)."""
    reset_backend_caches()
    yield
    reset_backend_caches()


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
ALL = AvailableKernels(flash_attn=True, torch_varlen=True, flex=True, triton=True)
NO_FLASH_ATTN = dataclasses.replace(ALL, flash_attn=False, errors=(("flash_attn", "ImportError: undefined symbol: _ZN3c10"),))
NO_FLASH = dataclasses.replace(NO_FLASH_ATTN, torch_varlen=False)
NO_TRITON = dataclasses.replace(NO_FLASH, triton=False)
NOTHING = AvailableKernels()


@pytest.mark.parametrize("requested,device,capability,dtype,available,expected", [
    # auto: flash-attn first on Ampere+ with fp16/bf16; (8, 0) is the boundary, (12, 0) a later major
    ("auto", "cuda", (8, 0), BF16, ALL, "flash_attn"),
    ("auto", "cuda", (9, 0), FP16, ALL, "flash_attn"),
    ("auto", "cuda", (12, 0), BF16, ALL, "flash_attn"),
    # fp32: no flash kernel, flex on CUDA
    ("auto", "cuda", (8, 0), FP32, ALL, "flex"),
    ("auto", "cuda", (9, 0), FP32, NO_FLASH, "flex"),
    # pre-Ampere: neither flash nor (Triton shared memory) flex
    ("auto", "cuda", (7, 5), BF16, ALL, "sdpa"),
    ("auto", "cuda", (7, 5), FP32, ALL, "sdpa"),
    ("auto", "cuda", (7, 5), BF16, NO_FLASH, "sdpa"),
    ("auto", "cuda", None, BF16, ALL, "sdpa"),  # CUDA device whose capability is unknown
    # flash-attn broken -> torch varlen; neither -> flex on CUDA (if it compiles) else sdpa
    ("auto", "cuda", (8, 6), BF16, NO_FLASH_ATTN, "torch_varlen"),
    ("auto", "cuda", (8, 0), BF16, NO_FLASH, "flex"),
    ("auto", "cuda", (9, 0), BF16, NO_TRITON, "sdpa"),
    ("auto", "cuda", (9, 0), BF16, NOTHING, "sdpa"),
    # off CUDA: sdpa (eager flex has no backward on CPU)
    ("auto", "cpu", None, FP32, ALL, "sdpa"),
    ("auto", "cpu", None, BF16, ALL, "sdpa"),
    ("auto", "mps", None, FP16, ALL, "sdpa"),
    # explicit requests
    ("flash", "cuda", (8, 0), BF16, ALL, "flash_attn"),
    ("flash", "cuda", (9, 0), FP16, NO_FLASH_ATTN, "torch_varlen"),
    ("flex", "cpu", None, FP32, NO_TRITON, "flex"),
    ("flex", "cuda", (7, 5), FP32, ALL, "flex"),  # asked for: allowed where it imports and compiles
    ("sdpa", "cuda", (9, 0), BF16, ALL, "sdpa"),
    ("sdpa", "cpu", None, FP32, NOTHING, "sdpa"),
])
def test_choose_backend(requested, device, capability, dtype, available, expected):
    assert choose_backend(requested, device, capability, dtype, available) == expected


@pytest.mark.parametrize("requested,device,capability,dtype,available,reason", [
    ("flash", "cpu", None, BF16, ALL, "needs a CUDA device, not cpu"),
    ("flash", "cuda", (7, 5), BF16, ALL, r"compute capability >= 8\.0 \(Ampere\), the device has 7\.5"),
    ("flash", "cuda", (9, 0), FP32, ALL, "fp16/bf16 only, not torch.float32"),
    ("flash", "cuda", (9, 0), BF16, NO_FLASH, "flash_attn ImportError: undefined symbol"),
    ("flex", "cuda", (9, 0), BF16, NO_TRITON, "needs Triton"),
    ("flex", "cpu", None, FP32, NOTHING, "flex does not import"),
    ("xformers", "cpu", None, FP32, ALL, "unknown"),
])
def test_explicit_backend_that_cannot_run_says_why_and_what_instead(requested, device, capability, dtype, available, reason):
    with pytest.raises(ConfigError, match=reason) as err:
        choose_backend(requested, device, capability, dtype, available)
    assert "auto" in str(err.value)  # names what to use instead


def test_auto_reports_why_each_candidate_was_skipped():
    choice = explain_backend("auto", "cuda", (9, 0), FP32, NO_FLASH_ATTN)
    assert choice.kernel == "flex"
    assert [kernel for kernel, _ in choice.skipped] == ["flash_attn", "torch_varlen"]
    assert all("fp16/bf16" in why for _, why in choice.skipped)
    assert explain_backend("auto", "cuda", (9, 0), BF16, ALL).skipped == ()


def test_choose_backend_is_pure(monkeypatch):
    """The decision reads its arguments only: no import probe, no CUDA query."""
    def boom(*args, **kwargs):
        raise AssertionError("choose_backend looked at the machine")

    monkeypatch.setattr(attention, "_probe", boom)
    monkeypatch.setattr(torch.cuda, "get_device_capability", boom)
    assert choose_backend("auto", "cuda", (9, 0), BF16, NO_FLASH_ATTN) == "torch_varlen"


def test_choice_is_logged_once_per_request_device_and_dtype(caplog):
    caplog.set_level(logging.INFO, logger="omnibal_pl.model.attention")
    for _ in range(2):
        assert resolve_backend("auto", torch.device("cpu"), FP32) == "sdpa"
    records = [r for r in caplog.records if r.name == "omnibal_pl.model.attention"]
    assert len(records) == 1
    assert records[0].levelno == logging.INFO
    message = records[0].getMessage()
    assert "using sdpa" in message and "skipped flex: has no backward" in message and "skipped flash_attn" in message
    resolve_backend("auto", torch.device("cpu"), BF16)  # another dtype: logged on its own
    resolve_backend("sdpa", torch.device("cpu"), FP32)  # another request: logged on its own
    assert len([r for r in caplog.records if r.name == "omnibal_pl.model.attention"]) == 3


def test_varlen_attention_logs_once_for_many_layers(caplog):
    caplog.set_level(logging.INFO, logger="omnibal_pl.model.attention")
    q, k, v, cu = _inputs(2, 2)
    for _ in range(3):
        varlen_attention(q, k, v, cu, max(SEGMENTS), causal=True, backend="auto")
    assert len([r for r in caplog.records if r.name == "omnibal_pl.model.attention"]) == 1


class _BrokenModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import <name>`` find a module whose import raises ``error`` (a flash-attn built for another torch)."""

    def __init__(self, name: str, error: Exception) -> None:
        self.name, self.error = name, error

    def find_spec(self, fullname, path, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname.split(".")[0] == self.name else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise self.error


def _break_import(monkeypatch, name: str, error: Exception) -> None:
    monkeypatch.setattr(sys, "meta_path", [_BrokenModule(name, error), *sys.meta_path])
    for loaded in [m for m in sys.modules if m.split(".")[0] == name]:
        monkeypatch.delitem(sys.modules, loaded)


BROKEN_FLASH_ATTN = [
    ImportError("flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: undefined symbol: _ZN3c104cuda9SetDeviceEi"),
    OSError("libcudart.so.12: cannot open shared object file: No such file or directory"),
]


@pytest.mark.parametrize("error", BROKEN_FLASH_ATTN, ids=["undefined-symbol", "missing-library"])
def test_broken_flash_attn_import_falls_back_instead_of_crashing(monkeypatch, caplog, error):
    pytest.importorskip("torch.nn.attention.varlen")
    _break_import(monkeypatch, "flash_attn", error)
    assert importlib.util.find_spec("flash_attn") is not None  # a find_spec check alone would say "installed"
    found = available_kernels()
    assert not found.flash_attn and str(error) in found.import_error("flash_attn")
    # Pretend this is an H100 so resolution gets past the device checks to the import.
    monkeypatch.setattr(attention, "_device_capability", functools.lru_cache(lambda device: (9, 0)))
    caplog.set_level(logging.INFO, logger="omnibal_pl.model.attention")
    assert resolve_backend("auto", torch.device("cuda"), BF16) == "torch_varlen"
    assert resolve_backend("flash", torch.device("cuda"), BF16) == "torch_varlen"
    assert any(str(error) in r.getMessage() for r in caplog.records)


def test_import_probe_runs_once(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "_import_flash_attn", lambda: calls.append(1) or (_ for _ in ()).throw(ImportError("nope")))
    for _ in range(3):
        assert not available_kernels().flash_attn
    assert calls == [1]


# --------------------------------------------------------------------------------------------------
# Hot path: no per-layer host sync, no per-call signature inspection


@pytest.fixture
def tolist_calls(monkeypatch):
    """Counts ``tolist()`` calls per tensor (by id)."""
    counts: dict[int, int] = {}
    original = torch.Tensor.tolist

    def counting(self):
        counts[id(self)] = counts.get(id(self), 0) + 1
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    return counts


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_segment_bounds_reach_the_host_once_per_cu_seqlens(tolist_calls, backend):
    q, k, v, cu = _inputs(2, 2)
    with torch.no_grad():
        first = varlen_attention(q, k, v, cu, max(SEGMENTS), causal=True, backend=backend)
        for _ in range(3):  # later layers of the same micro-batch
            torch.testing.assert_close(varlen_attention(q, k, v, cu, max(SEGMENTS), causal=True, backend=backend), first)
    assert tolist_calls.get(id(cu)) == 1


def test_host_bounds_argument_avoids_the_copy_and_keeps_numerics(tolist_calls):
    q, k, v, cu = _inputs(3, 1)
    bounds = tuple(int(b) for b in torch.tensor([0] + SEGMENTS).cumsum(0))
    out = varlen_attention(q, k, v, cu, max(SEGMENTS), causal=True, backend="sdpa", host_bounds=bounds)
    assert tolist_calls.get(id(cu)) is None
    torch.testing.assert_close(out, _dense_reference(q, k, v, cu, True), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="offsets"):
        varlen_attention(q, k, v, cu, max(SEGMENTS), causal=True, backend="sdpa", host_bounds=bounds[:-1])


def test_in_place_change_of_cu_seqlens_is_seen():
    q, k, v, cu = _inputs(2, 2)
    varlen_attention(q, k, v, cu, max(SEGMENTS), causal=False, backend="sdpa")
    cu[1:-1] = torch.tensor([3, 20, 30, 50], dtype=torch.int32)  # other segments, same tensor
    out = varlen_attention(q, k, v, cu, max(SEGMENTS), causal=False, backend="sdpa")
    torch.testing.assert_close(out, _dense_reference(q, k, v, cu, False), atol=2e-5, rtol=2e-5)


def _fake_varlen_new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False):
    """torch >= 2.12 ``varlen_attn``: causality as a window, GQA as a flag."""
    assert window_size in ((-1, -1), (-1, 0))
    assert enable_gqa == (query.shape[1] != key.shape[1])
    return _dense_reference(query, key, value, cu_seq_q, causal=window_size == (-1, 0))


def _fake_varlen_old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False):
    """torch 2.10/2.11 ``varlen_attn``: ``is_causal``, equal head counts."""
    assert query.shape[1] == key.shape[1]
    return _dense_reference(query, key, value, cu_seq_q, causal=is_causal)


@pytest.mark.parametrize("fake", [_fake_varlen_new, _fake_varlen_old], ids=["window_size", "is_causal"])
@pytest.mark.parametrize("causal", [True, False])
def test_torch_varlen_call_reads_the_signature_once(monkeypatch, fake, causal):
    signatures = []
    real_signature = attention.inspect.signature
    monkeypatch.setattr(attention.inspect, "signature", lambda f: signatures.append(f) or real_signature(f))
    monkeypatch.setattr(attention, "_probe", lambda name: (fake, ""))
    q, k, v, cu = _inputs(4, 2)
    for _ in range(3):
        out = attention._torch_varlen(q, k, v, cu, max(SEGMENTS), causal)
        torch.testing.assert_close(out, _dense_reference(q, k, v, cu, causal), atol=2e-5, rtol=2e-5)
    assert signatures == [fake]


def test_flash_attn_call_passes_int32_bounds_and_causal(monkeypatch):
    seen = {}

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
        seen.update(dtype=cu_q.dtype, max_q=max_q, causal=causal)
        return _dense_reference(q, k, v, cu_q, causal)

    monkeypatch.setattr(attention, "_probe", lambda name: (fake, ""))
    q, k, v, cu = _inputs(4, 2)
    out = attention._flash_attn(q, k, v, cu.long(), max(SEGMENTS), True)
    assert seen == {"dtype": torch.int32, "max_q": max(SEGMENTS), "causal": True}
    torch.testing.assert_close(out, _dense_reference(q, k, v, cu, True))


# --------------------------------------------------------------------------------------------------
# CUDA: the real choice and the fallbacks compute the same attention


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_cuda_picks_by_dtype_and_falls_back_numerically(monkeypatch):
    device = torch.device("cuda")
    ampere = torch.cuda.get_device_capability() >= (8, 0)
    bf16 = resolve_backend("auto", device, BF16)
    fp32 = resolve_backend("auto", device, FP32)
    assert fp32 not in ("flash_attn", "torch_varlen")
    if ampere and flash_available():
        assert bf16 in ("flash_attn", "torch_varlen")
    q, k, v, cu = _inputs(8, 2, dtype=FP32, device="cuda")
    got = _run("auto", q, k, v, cu.cuda(), True)
    expected = _run("sdpa", q, k, v, cu.cuda(), True)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"auto fp32 ({fp32}) {name}")
    _break_import(monkeypatch, "flash_attn", BROKEN_FLASH_ATTN[0])
    reset_backend_caches()
    assert resolve_backend("auto", device, BF16) != "flash_attn"
    _compare_on_cuda("auto", True)
