"""Attention with the keys' keep mask multiplied in inside the softmax: how dropped tokens are hidden in training."""
from __future__ import annotations

import math

import torch


def masked_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                            cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Causal attention per packed segment with the keys' keep mask multiplied in inside the softmax.

    ``q`` [L, heads, head_dim], ``k``/``v`` [L, kv_heads, head_dim], ``keep`` [L] (0/1 values, may carry
    gradient), ``cu_seqlens`` [S + 1]; returns [L, heads, head_dim] in ``q``'s dtype. For query i and an
    earlier key j of its segment: ``a_ij = e_ij * p_ij / sum_j' e_ij' * p_ij'`` with
    ``e_ij = exp(min(q_i.k_j / sqrt(d) - c_i, 0))`` and ``p_ij = keep_j`` for j != i, 1 for j == i. With an
    all-ones mask this is exactly causal softmax attention; ``d a / d keep_j`` is nonzero for dropped keys,
    which an additive -inf mask cannot give.

    ``c_i`` is the (detached) row maximum over the *visible* keys (``p_ij > 0``), so the denominator is
    >= 1 and every visible exponent is <= 0: the ``min(., 0)`` changes no output. It only caps the
    exponent of a dropped key whose score lies above every visible one, whose ``e_ij`` multiplies
    ``p_ij = 0`` in the forward but is the whole of ``d out_i / d keep_j``: uncapped it reaches 1e16
    (a dropped key 40 nats above the visible ones), capped ``|d out_i / d keep_j| <= |v_j - out_i|``.
    (Dynamic-LLaVA bounds it by adding ``eps`` to the denominator instead, which perturbs the forward.)

    Always float32, also under autocast (which would otherwise run the matmuls in bf16: 0.1 off fp32).
    Eager and dense per segment: it materialises [heads, n, n] float32 scores (see
    :func:`omnibal_pl.model.sparsify.cost.masked_attention_cost`).
    """
    groups = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    bounds = cu_seqlens.tolist()
    outs = []
    with torch.autocast(device_type=q.device.type, enabled=False):
        for s, e in zip(bounds[:-1], bounds[1:]):
            n = e - s
            qs = q[s:e].transpose(0, 1).float()
            ks = k[s:e].repeat_interleave(groups, dim=1).transpose(0, 1).float()
            vs = v[s:e].repeat_interleave(groups, dim=1).transpose(0, 1).float()
            scores = (qs @ ks.transpose(1, 2)) * scale  # [heads, n, n]
            eye = torch.eye(n, dtype=torch.float32, device=q.device)
            causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            m = keep[s:e].float()
            p = (m[None, :] + (1.0 - m[None, :]) * eye) * causal  # [n, n]: keep of key j for query i
            visible = p.detach() > 0
            c = scores.detach().masked_fill(~visible, float("-inf")).amax(dim=-1, keepdim=True)
            w = (scores - c).clamp_max(0.0).exp() * p
            attn = w / w.sum(dim=-1, keepdim=True)
            outs.append((attn @ vs).transpose(0, 1).to(q.dtype))
    return torch.cat(outs, dim=0)
