"""Data balance: grouping samples into balanced micro-batches, steps, metrics and argument search."""
from omnibal_pl.balance.config import ALGORITHMS, BalanceConfig
from omnibal_pl.balance.cost import TimeModel, fit_time_model, group_features
from omnibal_pl.balance.grouping import Grouping, group_samples
from omnibal_pl.balance.isf_reference import isf_reference
from omnibal_pl.balance.sampler import BalancedBatchSampler, BalancedSampler, EpochArrangement
from omnibal_pl.balance.metrics import balance_metrics, dist_ratio, pad_ratio, per_source
from omnibal_pl.balance.search import CapSearch, evaluate, micro_batch_shape, resolve_caps, resolve_shape
from omnibal_pl.balance.steps import Steps, arrange, arrange_steps, exchange_samples, form_steps

__all__ = [
    "ALGORITHMS",
    "BalanceConfig",
    "BalancedBatchSampler",
    "BalancedSampler",
    "CapSearch",
    "EpochArrangement",
    "Grouping",
    "Steps",
    "TimeModel",
    "arrange",
    "arrange_steps",
    "balance_metrics",
    "dist_ratio",
    "evaluate",
    "exchange_samples",
    "fit_time_model",
    "form_steps",
    "group_features",
    "group_samples",
    "isf_reference",
    "micro_batch_shape",
    "pad_ratio",
    "per_source",
    "resolve_caps",
    "resolve_shape",
]
