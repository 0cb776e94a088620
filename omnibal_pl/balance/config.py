"""Configuration of the data balance: which algorithm, which caps, how many DP ranks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omnibal_pl.errors import ConfigError

ALGORITHMS = ("balanced", "isf", "random", "length_grouped", "disttrain", "llamafactory", "swift")
CAPPED_ALGORITHMS = ("balanced", "isf")  # fill groups to both caps (tiles and tokens)
PACKERS = ("llamafactory", "swift")  # pack on tokens up to the token cap; tiles uncapped
STEP_ORDERS = ("auto", "matched", "megatron", "lpt", "sequential")
COSTS = ("counts", "fitted")
OVERSIZE_POLICIES = ("solo", "error")


@dataclass
class BalanceConfig:
    """How samples are grouped into micro-batches and micro-batches into steps.

    Units: ``vit_cap`` (Q_v) in the model family's vision unit, the unit of the length table's ``vit`` column and of
    the planner's micro-batch shape: tiles for InternVL/LLaVA, merge blocks (2 x 2 patches, one LLM token) for
    Qwen2-VL/2.5-VL. ``token_cap`` and ``token_threshold`` in LLM tokens (Q_t). A cap left ``None`` is chosen by
    the algorithm's argument search for ``dp`` and ``samples_per_group``.

    ``vit_quantum`` (``balanced`` only): how many vision counts make one unit of the grouping; a sample takes its
    count rounded up to whole quanta and a group is filled to ``vit_cap // vit_quantum`` quanta exactly. ``None``:
    :func:`~omnibal_pl.balance.grouping.auto_vit_quantum` of the data (1, exact tiles, for tile families; about
    1/48 of a mean sample for Qwen's merge blocks), fixed once by the caps search. ``matched`` steps of every
    algorithm compare vision sums in bands of this quantum (unset: the same automatic value).

    Algorithms: ``balanced`` (ours), ``isf`` (OmniBal's), and baselines: ``random`` and ``length_grouped``
    (``samples_per_group`` per micro-batch), ``disttrain`` (random fixed-count micro-batches dealt to ranks by
    LPT on modelled cost, DistTrain's reordering), ``llamafactory`` and ``swift`` (the packers of those
    frameworks: greedy knapsack / constant-volume bin packing on tokens up to ``token_cap``, tiles uncapped).

    ``cost``: what step forming evens across the ranks of a step. ``counts``: tiles and tokens (``matched``
    sorts groups by them; ``lpt`` weighs a group by its tokens). ``fitted``: the micro-batch time model stored
    at ``time_model`` (JSON written by :meth:`omnibal_pl.balance.cost.TimeModel.save`). A ``time_model`` given
    under ``counts`` only reports the modelled rank times.

    ``exchange_sweeps`` (``cost=fitted`` with ``matched`` steps): after steps are formed, samples are exchanged
    between the groups of a step's ranks to even their modelled time, every group kept within both caps
    (:func:`~omnibal_pl.balance.steps.exchange_samples`); at most this many sweeps per step, 0 turns it off.
    """

    algorithm: str = "balanced"
    dp: int = 8  # data-parallel ranks that share each step
    micro_batches: int = 1  # groups per DP rank per step (gradient accumulation / pipeline micro-batches)
    samples_per_group: int = 4  # wanted samples per group: searched caps give [m, m + 1] on average
    vit_cap: Optional[int] = None
    token_cap: Optional[int] = None
    token_threshold: Optional[int] = None  # ISF: keep groups with at least this many tokens (None: token_cap - 128)
    vit_quantum: Optional[int] = None  # balanced: vision counts per grouping unit (None: from the data)
    iterations: int = 50  # ISF passes
    seed: int = 0
    oversize: str = "solo"  # a sample over a cap: "solo" (its own group, counted) or "error"
    step_order: str = "auto"  # matched (ours), megatron (published ISF sampler), lpt (DistTrain), sequential
    cost: str = "counts"  # counts | fitted (then time_model names the fitted model's JSON)
    time_model: Optional[str] = None
    exchange_sweeps: int = 8  # cost=fitted, matched steps: sweeps of sample exchanges evening a step's ranks

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises :class:`ConfigError` for a value outside its range."""
        choices = (("algorithm", ALGORITHMS), ("step_order", STEP_ORDERS), ("oversize", OVERSIZE_POLICIES),
                   ("cost", COSTS))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ConfigError(f"balance.{name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        for name in ("dp", "micro_batches", "samples_per_group", "iterations"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"balance.{name}={getattr(self, name)}: must be >= 1")
        for name in ("vit_cap", "token_cap", "vit_quantum"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ConfigError(f"balance.{name}={v}: must be >= 1 (or null: chosen from the data)")
        if int(self.exchange_sweeps) < 0:
            raise ConfigError(f"balance.exchange_sweeps={self.exchange_sweeps}: must be >= 0 (0: no exchange)")
        if self.seed < 0:
            raise ConfigError(f"balance.seed={self.seed}: must be >= 0")
        if self.algorithm in PACKERS and self.vit_cap is not None:
            raise ConfigError(f"balance.algorithm={self.algorithm} packs on tokens only, as that framework does; "
                              "leave balance.vit_cap null (micro-batches take the largest group's tiles)")
        if self.cost == "fitted" and not self.time_model:
            raise ConfigError("balance.cost=fitted needs balance.time_model=<path of a fitted time model JSON> "
                              "(scripts/bench_train.py --save-time-model writes one); or use balance.cost=counts")

    @property
    def resolved_step_order(self) -> str:
        """``matched`` for ``balanced``, the published Megatron sampler for ``isf``, LPT for ``disttrain``, else
        sequential (the packers' groups come shuffled, as their trainers' random samplers would take them)."""
        if self.step_order != "auto":
            return self.step_order
        return {"balanced": "matched", "isf": "megatron", "disttrain": "lpt"}.get(self.algorithm, "sequential")

    @property
    def groups_per_step(self) -> int:
        return self.dp * self.micro_batches
