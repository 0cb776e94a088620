"""Pure-Python ISF (iterative sampling and filtering), step for step the algorithm of ``csrc/isf.cpp``.

It exists to prove the C++ core right (identical groups for the same seed) and as the speed
baseline of the benchmark; use :func:`omnibal_pl.balance.group_samples` for real work.
"""
from __future__ import annotations

from typing import Sequence

from omnibal_pl.balance.rng import SplitMix64
from omnibal_pl.errors import BalanceError


def isf_reference(
    vit: Sequence[int],
    tokens: Sequence[int],
    vit_cap: int,
    token_cap: int,
    token_threshold: int,
    iterations: int,
    seed: int,
    oversize: str = "solo",
) -> list[list[int]]:
    """Groups of sample indices; oversize samples (policy ``solo``) come first, one per group."""
    out: list[list[int]] = []
    pool: list[int] = []
    for i, (v, t) in enumerate(zip(vit, tokens)):
        if v <= vit_cap and t <= token_cap:
            pool.append(i)
        elif oversize == "error":
            raise BalanceError(f"sample {i} has {v} tiles and {t} tokens, over the caps ({vit_cap}, {token_cap})")
        else:
            out.append([i])
    for p in range(iterations):
        if not pool:
            break
        SplitMix64(seed if p == 0 else seed + p - 1).shuffle(pool)
        rest: list[int] = []
        for group in _next_fit(pool, vit, tokens, vit_cap, token_cap):
            gv = sum(vit[i] for i in group)
            gt = sum(tokens[i] for i in group)
            if p == iterations - 1 or gv == vit_cap or gt >= token_threshold:
                out.append(group)
            else:
                rest.extend(group)
        pool = rest
    return out


def _next_fit(order: list[int], vit: Sequence[int], tokens: Sequence[int], vit_cap: int, token_cap: int):
    group: list[int] = []
    gv = gt = 0
    for i in order:
        if group and (gv + vit[i] > vit_cap or gt + tokens[i] > token_cap):
            yield group
            group, gv, gt = [], 0, 0
        group.append(i)
        gv += vit[i]
        gt += tokens[i]
    if group:
        yield group
