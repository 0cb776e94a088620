"""What a micro-batch costs: its work counts, and a time model fitted to measured micro-batch times.

A micro-batch's features (one row per group) are sums over its samples of

- ``tiles``: vision units, the length table's ``vit`` column: tiles for InternVL/LLaVA, merge blocks for
  Qwen2-VL/2.5-VL (a text-only sample's dummy tile or block included: the ViT runs it). Linear in them: Qwen's
  full-attention vision layers, quadratic in each image's patches, are not a term of their own;
- ``tokens``: LLM tokens (image tokens included);
- ``tokens_sq``: squared sample lengths (the attention work, quadratic in each packed sample's length);
- ``samples``: 1 per sample (per-sample overheads: segment bookkeeping, loss terms).

:class:`TimeModel` predicts seconds as ``t = a*tiles + b*tokens + c*tokens_sq + d*samples + fixed``, its coefficients
found by non-negative least squares on measured (features, seconds) pairs (:func:`fit_time_model`): a term the
measurements cannot separate from the others (tiles and tokens of micro-batches whose text is mostly image
tokens, say) or that would lower the time gets 0, never a negative coefficient that would reward the ranks
with more work. A fit is refused (:class:`~omnibal_pl.errors.BalanceError`, and the caller keeps
``cost=counts`` and says so) from fewer than ``MIN_FITS_PER_TERM`` micro-batches per term, or when its RMS
error exceeds ``MAX_RELATIVE_ERROR`` of the mean measured time (the terms do not explain the times).

A model holds for the setting its times were measured in: ``made_for`` records it (model config, device,
precision, packing; :func:`omnibal_pl.train.time_calibration.time_model_setting`), and a training run with
``cost=fitted`` refuses a model made for another setting or for none recorded (:meth:`TimeModel.check_setting`).
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from omnibal_pl.balance.config import BalanceConfig
from omnibal_pl.balance.grouping import Grouping, segment_sums
from omnibal_pl.errors import BalanceError
from omnibal_pl.lengths import LengthTable

TERMS = ("tiles", "tokens", "tokens_sq", "samples")
MIN_FITS_PER_TERM = 3
NUMERICAL_ZERO = 1e-9  # relative to the largest measured time
MAX_RELATIVE_ERROR = 0.25  # RMS error of an accepted fit, as a fraction of the mean measured time


@dataclass
class TimeModel:
    """Seconds of one micro-batch (forward + backward) from its features; ``coefficients`` in seconds per unit,
    in :data:`TERMS` order; ``fixed_s``: what every micro-batch costs whatever it holds (kernel launches, Python),
    the same on every rank. ``rms_error`` (seconds) and ``fitted_on`` (micro-batches) describe the fit;
    ``made_for``: the setting the times were measured in (setting name -> value; empty when unknown)."""

    coefficients: list[float]
    rms_error: float = 0.0
    fitted_on: int = 0
    fixed_s: float = 0.0
    made_for: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.coefficients) != len(TERMS):
            raise BalanceError(f"time model has {len(self.coefficients)} coefficients, expected {len(TERMS)} "
                               f"({', '.join(TERMS)})")
        negative = [f"{t}={c:.3g}" for t, c in zip(TERMS, self.coefficients) if c < 0]
        negative += [f"fixed_s={self.fixed_s:.3g}"] if self.fixed_s < 0 else []
        if negative:
            raise BalanceError(f"time model has negative coefficients ({', '.join(negative)}): it would give the "
                               "ranks with more work more of it; refit it (fit_time_model never returns one) or use "
                               "balance.cost=counts")

    def check_setting(self, setting: Mapping[str, str], where: str = "time model") -> None:
        """Raises :class:`BalanceError` unless the model was measured in ``setting``: every key of ``setting`` is
        recorded in :attr:`made_for` with the same value. The message names each key that differs or is missing."""
        diff = [f"{k}: model {self.made_for[k]!r}, run {v!r}" if k in self.made_for else f"{k}: not recorded, run {v!r}"
                for k, v in setting.items() if self.made_for.get(k) != v]
        if diff:
            raise BalanceError(f"{where} was measured in another setting than this run's ({'; '.join(diff)}): its "
                               "seconds do not hold here; fit one in this setting (trainer.time_model_steps=N writes "
                               "<run_dir>/time_model.json) or use balance.cost=counts")

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Seconds per row of ``features`` ([n, len(TERMS)])."""
        return np.asarray(features, np.float64) @ np.asarray(self.coefficients, np.float64) + self.fixed_s

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"terms": list(TERMS), **asdict(self)}, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TimeModel":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise BalanceError(f"cannot read the time model {path}: {e}") from None
        if raw.get("terms") != list(TERMS):
            raise BalanceError(f"time model {path} has terms {raw.get('terms')}, this version uses {list(TERMS)}; refit it")
        return cls([float(c) for c in raw["coefficients"]], float(raw.get("rms_error", 0.0)), int(raw.get("fitted_on", 0)),
                   float(raw.get("fixed_s", 0.0)), {str(k): str(v) for k, v in raw.get("made_for", {}).items()})


def sample_features(table: LengthTable) -> np.ndarray:
    """Features of each sample alone ([n, len(TERMS)] float64)."""
    tokens = table.tokens.astype(np.float64)
    return np.stack([table.vit.astype(np.float64), tokens, tokens * tokens, np.ones(len(table))], axis=1)


def group_features(table: LengthTable, grouping: Grouping) -> np.ndarray:
    """Features of each group ([groups, len(TERMS)] float64): sums of its samples' features."""
    return segment_features(table, grouping.indices, grouping.offsets)


def segment_features(table: LengthTable, indices: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Features of each segment ``indices[offsets[g]:offsets[g + 1]]`` of sample ids ([segments, len(TERMS)])."""
    per_sample = sample_features(table)[indices]
    return np.stack([segment_sums(per_sample[:, k], offsets) for k in range(len(TERMS))], axis=1)


def fit_time_model(features: np.ndarray, seconds: np.ndarray, step_ends: np.ndarray | None = None,
                   made_for: Mapping[str, str] | None = None) -> TimeModel:
    """Non-negative least-squares coefficients of :data:`TERMS` and the fixed cost per micro-batch, for measured
    micro-batches. ``step_ends`` (1 where a measured time also holds the optimizer step that ended a step, else
    0): that cost is fitted alongside and left out of the model. Fixed and step costs are the same on every rank,
    so they do not change balance, but unfitted they would be charged to the terms. ``made_for``: the setting the
    times were measured in, recorded in the model.

    Raises :class:`BalanceError` with fewer than ``MIN_FITS_PER_TERM * len(TERMS)`` micro-batches or when the
    fit's RMS error exceeds ``MAX_RELATIVE_ERROR`` of the mean time.
    """
    features = np.asarray(features, np.float64)
    seconds = np.asarray(seconds, np.float64)
    need = MIN_FITS_PER_TERM * len(TERMS)
    if features.ndim != 2 or features.shape[1] != len(TERMS) or len(features) != len(seconds):
        raise BalanceError(f"fit_time_model needs features of shape [n, {len(TERMS)}] and n times; got "
                           f"{features.shape} and {seconds.shape}")
    if len(features) < need:
        raise BalanceError(f"a time model of {len(TERMS)} terms needs at least {need} measured micro-batches, got "
                           f"{len(features)}; measure more steps or use balance.cost=counts")
    extra = [np.ones(len(features))] + ([] if step_ends is None else [np.asarray(step_ends, np.float64)])
    design = np.concatenate([features, np.stack(extra, axis=1)], axis=1)
    scale = np.abs(design).max(axis=0)
    scale[scale == 0] = 1.0  # a term absent from every micro-batch gets coefficient 0
    solution = nonnegative_lstsq(design / scale, seconds)
    # a term whose largest contribution is below rounding of the times is zero
    solution[solution <= NUMERICAL_ZERO * np.abs(seconds).max()] = 0.0
    rms = float(np.sqrt(np.mean((design @ (solution / scale) - seconds) ** 2)))
    coefficients = solution[: len(TERMS)] / scale[: len(TERMS)]
    fixed_s = float(solution[len(TERMS)] / scale[len(TERMS)])
    mean = float(np.mean(seconds))
    if not rms <= MAX_RELATIVE_ERROR * mean:
        raise BalanceError(f"the best non-negative time model ({', '.join(f'{t}={c:.3g}' for t, c in zip(TERMS, coefficients))}) "
                           f"misses the measured times by {rms:.3g} s RMS against a mean of {mean:.3g} s (more than "
                           f"{MAX_RELATIVE_ERROR:.0%}): the times are too noisy or not explained by {', '.join(TERMS)}; "
                           "measure on a quieter machine, with more micro-batches, or use balance.cost=counts")
    return TimeModel([float(c) for c in coefficients], rms, len(features), fixed_s, dict(made_for or {}))


def nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``x >= 0`` minimising ``|a x - b|``, exactly, for few columns: the unconstrained least-squares solution
    on each subset of columns (the others 0), the best of those that are non-negative. The optimum is one of
    them: on its support the constraints are inactive, so it solves that subset's least squares."""
    best, best_residual = np.zeros(a.shape[1]), float(np.sum(b * b))
    for size in range(1, a.shape[1] + 1):
        for columns in itertools.combinations(range(a.shape[1]), size):
            x, *_ = np.linalg.lstsq(a[:, columns], b, rcond=None)
            if np.all(x >= 0):
                residual = float(np.sum((a[:, columns] @ x - b) ** 2))
                if residual < best_residual:
                    best, best_residual = np.zeros(a.shape[1]), residual
                    best[list(columns)] = x
    return best


def load_time_model(cfg: BalanceConfig) -> TimeModel | None:
    """The model stored at ``cfg.time_model``, or None. Step forming weighs groups by it under ``cost=fitted``;
    under ``cost=counts`` it only reports the modelled rank times."""
    return TimeModel.load(cfg.time_model) if cfg.time_model else None


def steps_weight(cfg: BalanceConfig, model: TimeModel | None) -> TimeModel | None:
    """The model step forming weighs groups by: ``model`` under ``cost=fitted``, None (counts) otherwise."""
    return model if cfg.cost == "fitted" else None


def group_costs(table: LengthTable, grouping: Grouping, model: TimeModel | None) -> np.ndarray:
    """Modelled cost per group: seconds under ``model``, or its LLM tokens (``counts``)."""
    if model is None:
        return segment_sums(table.tokens[grouping.indices], grouping.offsets).astype(np.float64)
    return model.predict(group_features(table, grouping))
