"""Which micro-batches to time for the time model: a design whose measured times separate its terms.

Random micro-batches make the model's terms nearly collinear: every feature grows with the number of samples,
and a sample's tokens mostly follow its tiles (image tokens), so least squares trades one term against another
and two fits on the same machine disagree (docs/benchmarks.md: 24 random micro-batches put weight on squared
lengths in one fit and none in the next). :func:`design_calibration` instead draws a pool of candidate
micro-batches of varied make-up (random samples, and samples from one end of the data: short, long, text-heavy,
tile-heavy) and picks from it, greedily, those that maximise ``det(X^T X)`` of the fit's design matrix ``X``
(the :data:`~omnibal_pl.balance.cost.TERMS` features and the fixed-cost column, each scaled to its largest value
in the pool): a D-optimal design, whose coefficients' joint confidence region is the smallest a set of that
size can give. Adding row ``x`` multiplies the determinant by ``1 + x^T M^-1 x``, so each greedy pick is the
candidate with the largest ``x^T M^-1 x``.
"""
from __future__ import annotations

import numpy as np

from omnibal_pl.balance.cost import segment_features
from omnibal_pl.errors import BalanceError
from omnibal_pl.lengths import LengthTable

DESIGNS = ("d_optimal", "random")
POOL_PER_PICK = 50  # candidates drawn per micro-batch picked
ENDS = 8  # a one-sided candidate draws from 1/ENDS of the samples, sorted by one of its orderings


def design_calibration(table: LengthTable, count: int, max_samples: int, design: str = "d_optimal",
                       seed: int = 0) -> list[np.ndarray]:
    """``count`` micro-batches (arrays of sample ids into ``table``, 1 .. ``max_samples`` distinct samples each)
    to time for :func:`~omnibal_pl.balance.fit_time_model`. ``design``: ``d_optimal`` (see the module docstring)
    or ``random`` (random sizes and samples: the baseline)."""
    if design not in DESIGNS:
        raise BalanceError(f"unknown calibration design {design!r}; use one of {', '.join(DESIGNS)}")
    if count < 1 or max_samples < 1:
        raise BalanceError(f"a calibration needs count >= 1 and max_samples >= 1, got {count} and {max_samples}")
    rng = np.random.default_rng(seed)
    max_samples = min(max_samples, len(table))
    if design == "random":
        return [rng.choice(len(table), size=int(rng.integers(1, max_samples + 1)), replace=False) for _ in range(count)]
    pool = candidate_groups(table, POOL_PER_PICK * count, max_samples, rng)
    offsets = np.concatenate([[0], np.cumsum([len(ids) for ids in pool])])
    features = segment_features(table, np.concatenate(pool), offsets)
    rows = np.column_stack([features, np.ones(len(pool))])  # + the fixed cost's column
    return [pool[i] for i in d_optimal_rows(rows / rows.max(axis=0), count)]


def candidate_groups(table: LengthTable, count: int, max_samples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` micro-batches of 1 .. ``max_samples`` distinct samples: half drawn from all samples, half from one
    end of the samples ordered by tokens, by tiles, or by text share (tokens per tile), so that tiles, tokens,
    squared lengths and sample counts vary apart from one another."""
    tokens, vit = table.tokens.astype(np.float64), table.vit.astype(np.float64)
    orders = [np.argsort(tokens, kind="stable"), np.argsort(vit, kind="stable"), np.argsort(tokens / vit, kind="stable")]
    window = min(len(table), max(max_samples, len(table) // ENDS))
    groups = []
    for _ in range(count):
        size = int(rng.integers(1, max_samples + 1))
        if rng.random() < 0.5:
            groups.append(rng.choice(len(table), size=size, replace=False))
            continue
        order = orders[int(rng.integers(len(orders)))]
        end = order[:window] if rng.random() < 0.5 else order[len(order) - window:]
        groups.append(rng.choice(end, size=size, replace=False))
    return groups


def d_optimal_rows(rows: np.ndarray, count: int) -> list[int]:
    """Indices of ``count`` distinct rows of ``rows`` ([candidates, d]) picked greedily to maximise
    ``det(sum x x^T)``; a tiny ridge makes the first ``d`` picks well defined."""
    if count > len(rows):
        raise BalanceError(f"cannot pick {count} calibration micro-batches from {len(rows)} candidates")
    information = 1e-9 * np.eye(rows.shape[1])
    free = np.ones(len(rows), bool)
    picked = []
    for _ in range(count):
        gain = np.einsum("ij,jk,ik->i", rows, np.linalg.inv(information), rows)
        gain[~free] = -np.inf
        best = int(np.argmax(gain))
        picked.append(best)
        free[best] = False
        information += np.outer(rows[best], rows[best])
    return picked
