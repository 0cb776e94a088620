"""Varlen attention over packed sequences: one interface, three backends.

All backends take ``q`` [total_tokens, heads, head_dim] and ``k``/``v`` [total_tokens, kv_heads,
head_dim] (``heads`` a multiple of ``kv_heads``: grouped-query attention), plus ``cu_seqlens``
[S + 1] int32 segment boundaries; a token attends only to tokens of its own segment (and only to
earlier ones when ``causal``). They return [total_tokens, heads, head_dim].

- ``flash``: flash-attn's ``flash_attn_varlen_func`` when the package is installed, else torch's own
  ``torch.nn.attention.varlen.varlen_attn`` (Flash Attention kernels shipped with torch >= 2.10);
  CUDA only.
- ``flex``: ``torch.nn.attention.flex_attention`` with a document block mask; compiled on CUDA,
  eager (a dense reference implementation) elsewhere. torch (2.13) has no flex backward on CPU, so
  on CPU it serves inference and cross-checks only.
- ``sdpa``: ``scaled_dot_product_attention`` once per segment; runs anywhere.
- ``auto``: ``flash`` on CUDA when a flash kernel is available, else ``sdpa``.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect

import torch
import torch.nn.functional as F

from omnibal_pl.errors import ConfigError

BACKENDS = ("auto", "flash", "flex", "sdpa")


def _flash_attn_func():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def _torch_varlen_func():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def flash_available() -> bool:
    """Whether a flash varlen kernel (flash-attn or torch's ``varlen_attn``) can run here."""
    return torch.cuda.is_available() and (_flash_attn_func() is not None or _torch_varlen_func() is not None)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` (one of :data:`BACKENDS`) on ``device``."""
    if backend not in BACKENDS:
        raise ConfigError(f"attention backend {backend!r} is unknown; use one of {BACKENDS}")
    if backend == "auto":
        return "flash" if device.type == "cuda" and flash_available() else "sdpa"
    if backend == "flash" and not (device.type == "cuda" and flash_available()):
        raise ConfigError(
            f"attention backend 'flash' needs CUDA and flash-attn or torch.nn.attention.varlen "
            f"(device is {device}); install flash-attn, run on a GPU, or set attention_backend to auto/flex/sdpa"
        )
    return backend


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention within each packed segment (see the module docstring for shapes and backends)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"varlen_attention wants [tokens, heads, head_dim] tensors, got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads {q.shape[1]} are not a multiple of key/value heads {k.shape[1]}")
    backend = resolve_backend(backend, q.device)
    if backend == "flash":
        return _flash(q, k, v, cu_seqlens, max_seqlen, causal)
    if backend == "flex":
        return _flex(q, k, v, cu_seqlens, causal)
    return _sdpa(q, k, v, cu_seqlens, causal)


def _flash(q, k, v, cu_seqlens, max_seqlen, causal):
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    func = _flash_attn_func()
    if func is not None:
        return func(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=causal)
    func = _torch_varlen_func()
    gqa = q.shape[1] != k.shape[1]
    params = inspect.signature(func).parameters
    # torch 2.10/2.11 take ``is_causal``; later releases express causality as a window.
    if "is_causal" in params:
        kwargs = {"is_causal": causal}
    else:
        kwargs = {"window_size": (-1, 0) if causal else (-1, -1)}
    if gqa:
        if "enable_gqa" not in params:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        else:
            kwargs["enable_gqa"] = True
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


def _flex(q, k, v, cu_seqlens, causal):
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ConfigError(
            "attention backend 'flex' has no backward on CPU in this torch release; "
            "use attention_backend 'sdpa' (or 'auto') for CPU training"
        )
    # The mask depends on the segment boundaries only; every layer of one batch reuses it.
    mask = _document_block_mask(tuple(cu_seqlens.tolist()), causal, str(q.device))
    kernel = _flex_kernel(q.device.type == "cuda")
    out = kernel(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        block_mask=mask,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.squeeze(0).transpose(0, 1)


def _sdpa(q, k, v, cu_seqlens, causal):
    gqa = q.shape[1] != k.shape[1]
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        seg = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # [heads, s, head_dim]
        outs.append(F.scaled_dot_product_attention(*seg, is_causal=causal, enable_gqa=gqa).transpose(0, 1))
    return torch.cat(outs, dim=0)
