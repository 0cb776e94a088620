"""Varlen attention over packed sequences: one interface, four kernels, and the choice between them.

All kernels take ``q`` [total_tokens, heads, head_dim] and ``k``/``v`` [total_tokens, kv_heads,
head_dim] (``heads`` a multiple of ``kv_heads``: grouped-query attention), plus ``cu_seqlens``
[S + 1] int32 segment boundaries; a token attends only to tokens of its own segment (and only to
earlier ones when ``causal``). They return [total_tokens, heads, head_dim].

Requested backends (:data:`BACKENDS`, the ``attention_backend`` setting) resolve to kernels
(:data:`KERNELS`):

- ``flash``: flash-attn's ``flash_attn_varlen_func`` when it really imports, else torch's own
  ``torch.nn.attention.varlen.varlen_attn`` (Flash Attention kernels shipped with torch >= 2.10).
  Both need CUDA, compute capability >= 8.0 (Ampere) and fp16/bf16 inputs.
- ``flex``: ``torch.nn.attention.flex_attention`` with a document block mask; compiled (Triton) on
  CUDA, eager (a dense reference implementation) elsewhere. torch (2.13) has no flex backward on
  CPU, so on CPU it serves inference and cross-checks only.
- ``sdpa``: ``scaled_dot_product_attention`` once per segment; runs anywhere, any dtype.
- ``auto``: the first kernel that can run, in the order flash-attn -> torch varlen -> flex -> sdpa.
  flex is taken only on CUDA with capability >= 8.0: CPU eager flex has no backward, and its Triton
  kernels ask for more shared memory than pre-Ampere GPUs have (64 KiB on a T4).

:func:`choose_backend` is the decision as a pure function of (requested backend, device type,
compute capability, dtype, which kernels import); :func:`resolve_backend` fills those in from this
machine (import probes cached), logs the choice once and is what :func:`varlen_attention` calls.
"""
from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from omnibal_pl.errors import ConfigError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "flash", "flex", "sdpa")  # what a config may request
KERNELS = ("flash_attn", "torch_varlen", "flex", "sdpa")  # what a request resolves to, in ``auto``'s order
FLASH_KERNELS = ("flash_attn", "torch_varlen")  # the kernels that serve a ``flash`` request, preferred first
MIN_FLASH_CAPABILITY = (8, 0)  # Ampere; flash kernels and tuned flex kernels need it
FLASH_DTYPES = (torch.float16, torch.bfloat16)  # flash kernels do not run fp32

Capability = tuple[int, int]  # CUDA compute capability (major, minor)


# --------------------------------------------------------------------------------------------------
# What imports on this machine


@dataclass(frozen=True)
class AvailableKernels:
    """Which attention kernels import here (device and dtype aside).

    ``flex`` means ``torch.nn.attention.flex_attention`` imports; ``triton`` that Triton does (needed
    to compile flex on CUDA). ``errors`` holds (kernel, why it does not import) pairs for the log and
    the error messages.
    """

    flash_attn: bool = False
    torch_varlen: bool = False
    flex: bool = False
    triton: bool = False
    errors: tuple[tuple[str, str], ...] = ()

    def import_error(self, name: str) -> str:
        """Why ``name`` does not import ("does not import" when no reason was recorded)."""
        return dict(self.errors).get(name, f"{name} does not import")


def _try_import(import_fn: Callable[[], object]) -> tuple[object | None, str]:
    """(what ``import_fn`` returns, "") or (None, why it failed).

    A flash-attn built for another torch fails with ``ImportError: ... undefined symbol``, a missing
    CUDA library with ``OSError``; some extensions raise ``RuntimeError`` at import. All three mean
    "not available" here, never a crash.
    """
    try:
        return import_fn(), ""
    except (ImportError, OSError, RuntimeError) as err:
        return None, f"{type(err).__name__}: {err}"


def _import_flash_attn() -> Callable:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def _import_torch_varlen() -> Callable:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def _import_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def _import_triton() -> object:
    import triton

    return triton


@functools.lru_cache(maxsize=None)
def _probe(name: str) -> tuple[object | None, str]:
    """The imported object of kernel ``name`` (or None) and why it failed; each import is tried once."""
    importers = {"flash_attn": _import_flash_attn, "torch_varlen": _import_torch_varlen,
                 "flex": _import_flex, "triton": _import_triton}
    return _try_import(importers[name])


def available_kernels() -> AvailableKernels:
    """What imports on this machine (each import really attempted, once per process)."""
    probes = {name: _probe(name) for name in ("flash_attn", "torch_varlen", "flex", "triton")}
    return AvailableKernels(
        **{name: found is not None for name, (found, _) in probes.items()},
        errors=tuple((name, why) for name, (found, why) in probes.items() if found is None),
    )


# --------------------------------------------------------------------------------------------------
# The decision (pure)


class BackendChoice(NamedTuple):
    """The kernel chosen for a request and, in order, each candidate skipped before it and why."""

    kernel: str
    skipped: tuple[tuple[str, str], ...]


def _format_capability(capability: Capability | None) -> str:
    return "none" if capability is None else f"{capability[0]}.{capability[1]}"


def _flash_blocker(kernel: str, device_type: str, capability: Capability | None, dtype: torch.dtype,
                   available: AvailableKernels) -> str | None:
    """Why flash kernel ``kernel`` (one of :data:`FLASH_KERNELS`) cannot run, or None when it can."""
    if device_type != "cuda":
        return f"needs a CUDA device, not {device_type}"
    if capability is None or tuple(capability) < MIN_FLASH_CAPABILITY:
        return f"needs compute capability >= 8.0 (Ampere), the device has {_format_capability(capability)}"
    if dtype not in FLASH_DTYPES:
        return f"runs fp16/bf16 only, not {dtype}"
    if not getattr(available, kernel):
        return available.import_error(kernel)
    return None


def _flex_blocker(device_type: str, available: AvailableKernels) -> str | None:
    """Why flex cannot run at all on ``device_type`` (an explicit request), or None when it can."""
    if not available.flex:
        return available.import_error("flex")
    if device_type == "cuda" and not available.triton:
        return f"compiling flex on CUDA needs Triton ({available.import_error('triton')})"
    return None


def _auto_flex_blocker(device_type: str, capability: Capability | None, available: AvailableKernels) -> str | None:
    """Why ``auto`` does not take flex (it must train, so CUDA and Ampere+), or None when it does."""
    if device_type != "cuda":
        return f"has no backward in eager mode on {device_type}"
    if capability is None or tuple(capability) < MIN_FLASH_CAPABILITY:
        return (f"its Triton kernels need compute capability >= 8.0 (shared memory), the device has "
                f"{_format_capability(capability)}")
    return _flex_blocker(device_type, available)


def explain_backend(requested: str, device_type: str, capability: Capability | None, dtype: torch.dtype,
                    available: AvailableKernels) -> BackendChoice:
    """The kernel (one of :data:`KERNELS`) for backend ``requested`` and why earlier candidates were skipped.

    ``device_type`` is ``torch.device.type`` ("cuda", "cpu", ...); ``capability`` the CUDA compute
    capability (None off CUDA); ``dtype`` that of q/k/v. Pure: reads nothing but its arguments.
    Raises :class:`ConfigError` for an unknown backend or an explicit one that cannot run here.
    """
    if requested not in BACKENDS:
        raise ConfigError(f"attention backend {requested!r} is unknown; use one of {BACKENDS}")
    if requested == "sdpa":
        return BackendChoice("sdpa", ())
    if requested == "flex":
        why = _flex_blocker(device_type, available)
        if why is not None:
            raise ConfigError(f"attention backend 'flex' cannot run here: {why}; set attention_backend to 'auto' or 'sdpa'")
        return BackendChoice("flex", ())
    skipped: list[tuple[str, str]] = []
    for kernel in FLASH_KERNELS:
        why = _flash_blocker(kernel, device_type, capability, dtype, available)
        if why is None:
            return BackendChoice(kernel, tuple(skipped))
        skipped.append((kernel, why))
    if requested == "flash":
        reasons = "; ".join(f"{kernel} {why}" for kernel, why in skipped)
        raise ConfigError(
            f"attention backend 'flash' cannot run on {device_type} (capability {_format_capability(capability)}, "
            f"{dtype}): {reasons}. Run on an Ampere+ GPU with fp16/bf16 (precision bf16-mixed), or set "
            f"attention_backend to 'auto' (falls back to flex/sdpa) or 'sdpa'"
        )
    why = _auto_flex_blocker(device_type, capability, available)
    if why is None:
        return BackendChoice("flex", tuple(skipped))
    return BackendChoice("sdpa", (*skipped, ("flex", why)))


def choose_backend(requested: str, device_type: str, capability: Capability | None, dtype: torch.dtype,
                   available: AvailableKernels) -> str:
    """The kernel (one of :data:`KERNELS`) for ``requested``; see :func:`explain_backend`."""
    return explain_backend(requested, device_type, capability, dtype, available).kernel


# --------------------------------------------------------------------------------------------------
# The decision on this machine (cached, logged once)


@functools.lru_cache(maxsize=None)
def _device_capability(device: torch.device) -> Capability | None:
    """Compute capability of a CUDA ``device`` (None for other devices or without CUDA)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))


@functools.lru_cache(maxsize=None)
def _resolve(requested: str, device_type: str, capability: Capability | None, dtype: torch.dtype) -> str:
    """:func:`explain_backend` on this machine's kernels; logs the choice (runs once per key: cached)."""
    choice = explain_backend(requested, device_type, capability, dtype, available_kernels())
    skipped = "; ".join(f"skipped {kernel}: {why}" for kernel, why in choice.skipped)
    logger.info("attention backend %r on %s (capability %s, %s): using %s%s", requested, device_type,
                _format_capability(capability), dtype, choice.kernel, f" ({skipped})" if skipped else "")
    return choice.kernel


def resolve_backend(requested: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The kernel (one of :data:`KERNELS`) that backend ``requested`` runs on ``device`` for ``dtype``.

    Logged once (logger ``omnibal_pl.model.attention``, INFO) per (requested, device type, capability,
    dtype), with why each skipped candidate was skipped. Raises :class:`ConfigError` when an explicit
    request cannot run here.
    """
    device = torch.device(device)
    return _resolve(requested, device.type, _device_capability(device), dtype)


def flash_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether a flash kernel (flash-attn or torch's ``varlen_attn``) runs on the current CUDA device for ``dtype``."""
    if not torch.cuda.is_available():
        return False
    device = torch.device("cuda", torch.cuda.current_device())
    kernel = choose_backend("auto", "cuda", _device_capability(device), dtype, available_kernels())
    return kernel in FLASH_KERNELS


def reset_backend_caches() -> None:
    """Forget import probes, capabilities and logged choices (tests; after installing a kernel)."""
    for cached in (_probe, _device_capability, _resolve, _varlen_call_style):
        cached.cache_clear()


# --------------------------------------------------------------------------------------------------
# Segment bounds on the host


_HOST_BOUNDS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # cu_seqlens tensor -> (version, bounds)


def _segment_bounds(cu_seqlens: torch.Tensor, host_bounds: tuple[int, ...] | None) -> tuple[int, ...]:
    """``cu_seqlens`` as a host tuple of S + 1 token offsets.

    ``host_bounds`` (the caller's host copy) is used as given (no device sync). Otherwise a device
    tensor is copied to the host once and remembered for as long as it lives and is not modified in
    place (its version counter), so every layer of one micro-batch shares one device-to-host sync.
    """
    if host_bounds is not None:
        if len(host_bounds) != cu_seqlens.numel():
            raise ValueError(f"host_bounds has {len(host_bounds)} offsets, cu_seqlens {cu_seqlens.numel()}")
        return tuple(host_bounds)
    if cu_seqlens.is_inference():  # inference tensors have no version counter: copy every time
        return tuple(cu_seqlens.tolist())
    cached = _HOST_BOUNDS.get(cu_seqlens)
    if cached is not None and cached[0] == cu_seqlens._version:
        return cached[1]
    bounds = tuple(cu_seqlens.tolist())  # the one device-to-host sync for this tensor
    _HOST_BOUNDS[cu_seqlens] = (cu_seqlens._version, bounds)
    return bounds


# --------------------------------------------------------------------------------------------------
# The entry point and the kernels


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    backend: str = "auto",
    host_bounds: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Attention within each packed segment (see the module docstring for shapes and backends).

    ``max_seqlen``: longest segment, tokens. ``host_bounds``: optional host copy of ``cu_seqlens``
    (``tuple(cu_seqlens.tolist())`` made once per micro-batch, e.g. at collate time) so the sdpa and
    flex kernels need no device-to-host copy; without it they copy once per ``cu_seqlens`` tensor.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"varlen_attention wants [tokens, heads, head_dim] tensors, got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads {q.shape[1]} are not a multiple of key/value heads {k.shape[1]}")
    kernel = resolve_backend(backend, q.device, q.dtype)
    if kernel == "flash_attn":
        return _flash_attn(q, k, v, cu_seqlens, max_seqlen, causal)
    if kernel == "torch_varlen":
        return _torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal)
    if kernel == "flex":
        return _flex(q, k, v, _segment_bounds(cu_seqlens, host_bounds), causal)
    return _sdpa(q, k, v, _segment_bounds(cu_seqlens, host_bounds), causal)


def _flash_attn(q, k, v, cu_seqlens, max_seqlen, causal):
    func, why = _probe("flash_attn")
    if func is None:
        raise ConfigError(f"flash_attn does not import: {why}")
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return func(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=causal)


class _VarlenStyle(NamedTuple):
    """How a ``varlen_attn`` release takes causality and grouped-query attention."""

    is_causal: bool  # takes ``is_causal`` (torch 2.10/2.11); later releases take ``window_size``
    enable_gqa: bool  # takes ``enable_gqa``; without it k/v are repeated to the query heads


@functools.lru_cache(maxsize=8)
def _varlen_call_style(func: Callable) -> _VarlenStyle:
    """Read ``func``'s signature once (``inspect.signature`` costs microseconds per layer otherwise)."""
    params = inspect.signature(func).parameters
    return _VarlenStyle(is_causal="is_causal" in params, enable_gqa="enable_gqa" in params)


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal):
    func, why = _probe("torch_varlen")
    if func is None:
        raise ConfigError(f"torch.nn.attention.varlen does not import: {why}")
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    style = _varlen_call_style(func)
    kwargs = {"is_causal": causal} if style.is_causal else {"window_size": (-1, 0) if causal else (-1, -1)}
    if q.shape[1] != k.shape[1]:
        if style.enable_gqa:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return func(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)


@functools.lru_cache(maxsize=4)
def _document_block_mask(bounds: tuple[int, ...], causal: bool, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    length = bounds[-1]
    cu = torch.tensor(bounds, device=device)
    doc = torch.searchsorted(cu, torch.arange(length, device=device), right=True) - 1

    def same_doc(b, h, q_idx, kv_idx):
        keep = doc[q_idx] == doc[kv_idx]
        return keep & (q_idx >= kv_idx) if causal else keep

    return create_block_mask(same_doc, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)


@functools.cache
def _flex_kernel(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def _flex(q, k, v, bounds: tuple[int, ...], causal):
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ConfigError(
            "attention backend 'flex' has no backward on CPU in this torch release; "
            "use attention_backend 'sdpa' (or 'auto') for CPU training"
        )
    # The mask depends on the segment boundaries only; every layer of one batch reuses it.
    mask = _document_block_mask(bounds, causal, str(q.device))
    kernel = _flex_kernel(q.device.type == "cuda")
    out = kernel(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        block_mask=mask,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.squeeze(0).transpose(0, 1)


def _sdpa(q, k, v, bounds: tuple[int, ...], causal):
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        seg = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # [heads, s, head_dim]
        outs.append(F.scaled_dot_product_attention(*seg, is_causal=causal, enable_gqa=gqa).transpose(0, 1))
    return torch.cat(outs, dim=0)
