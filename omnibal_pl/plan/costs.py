"""Per-block costs: the only input the planner sees about the model and the device.

A :class:`CostProfile` is a list of :class:`BlockCost`, one per block of the model's ``blocks()``
sequence, in order, for one micro-batch shape. It comes from the block profiler (``source="profile"``),
from the FLOPs cost model (``source="cost_model"``) or from a test generator (``source="synthetic"``).

Units: seconds for times, bytes for memory, always per micro-batch and per block.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from omnibal_pl.errors import ConfigError, PlanError

BLOCK_KINDS = ("vision_embed", "vision_block", "projector", "llm_embed", "llm_layer", "llm_head")
SOURCES = ("profile", "cost_model", "synthetic")
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class BlockCost:
    """Costs of one block for one micro-batch.

    ``act_*_bytes`` are the activation bytes the block keeps alive from its forward to its backward:
    with no recomputation, with attention-only recomputation (the attention core's internals are dropped
    and recomputed) and with full recomputation (only the block input is kept). ``recompute_*_s`` is the
    time a backward gains under that mode (a repeated forward of the block or of its attention core).
    ``param_bytes`` and ``grad_opt_bytes`` (gradients plus optimizer state) are static: held whatever the
    schedule does.
    """

    name: str
    kind: str
    forward_s: float
    backward_s: float
    act_none_bytes: int
    act_attention_bytes: int
    act_full_bytes: int
    recompute_attention_s: float
    recompute_full_s: float
    param_bytes: int
    grad_opt_bytes: int

    def __post_init__(self) -> None:
        if self.kind not in BLOCK_KINDS:
            raise ConfigError(f"block {self.name!r}: kind {self.kind!r} is not one of {BLOCK_KINDS}")
        for key, value in asdict(self).items():
            if key in ("name", "kind"):
                continue
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"block {self.name!r}: {key}={value!r} must be a finite number >= 0")

    def activation_bytes(self, mode: str) -> int:
        """Bytes kept from forward to backward for one micro-batch under recompute ``mode``."""
        return {"none": self.act_none_bytes, "attention": self.act_attention_bytes,
                "full": self.act_full_bytes}[mode]

    def recompute_s(self, mode: str) -> float:
        """Seconds the backward gains under recompute ``mode`` (0 for ``none``)."""
        return {"none": 0.0, "attention": self.recompute_attention_s, "full": self.recompute_full_s}[mode]

    @property
    def static_bytes(self) -> int:
        """Parameters + gradients + optimizer state, in bytes."""
        return self.param_bytes + self.grad_opt_bytes


@dataclass
class CostProfile:
    """Block costs of one model on one device for one micro-batch shape.

    ``micro_batch`` describes the shape the costs were measured or modelled for, e.g.
    ``{"vit_cap": 8, "token_cap": 4096, "dtype": "bfloat16"}``. Block names are unique.
    """

    blocks: list[BlockCost]
    model: str
    device: str
    micro_batch: dict = field(default_factory=dict)
    source: str = "profile"

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"cost profile source {self.source!r} is not one of {SOURCES}")
        if not self.blocks:
            raise ConfigError(f"cost profile of {self.model!r} has no blocks")
        seen: set[str] = set()
        for block in self.blocks:
            if block.name in seen:
                raise ConfigError(f"cost profile of {self.model!r}: block name {block.name!r} appears twice")
            seen.add(block.name)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def check_blocks(self, block_names: Sequence[str]) -> None:
        """Raises :class:`PlanError` unless the profile covers exactly ``block_names``, in that order."""
        names = self.names
        if list(block_names) == names:
            return
        missing = [n for n in block_names if n not in set(names)]
        extra = [n for n in names if n not in set(block_names)]
        if missing or extra:
            raise PlanError(
                f"cost profile of {self.model!r} does not match the model: missing blocks {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unknown blocks {extra[:5]}"
                f"{'...' if len(extra) > 5 else ''}; re-run the profiler for this model config"
            )
        raise PlanError(f"cost profile of {self.model!r} lists the model's blocks in a different order; "
                        "re-run the profiler for this model config")

    def save(self, path: str | Path) -> None:
        """Writes the profile as JSON."""
        data = {"version": _FORMAT_VERSION, "model": self.model, "device": self.device,
                "micro_batch": self.micro_batch, "source": self.source,
                "blocks": [asdict(b) for b in self.blocks]}
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "CostProfile":
        """Reads a profile written by :meth:`save`; malformed files raise :class:`ConfigError`."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: cannot read cost profile ({err}); re-run the profiler") from err
        if data.get("version") != _FORMAT_VERSION:
            raise ConfigError(f"{path}: cost profile version {data.get('version')!r}, expected "
                              f"{_FORMAT_VERSION}; re-run the profiler")
        blocks = []
        for row, entry in enumerate(data.get("blocks", [])):
            try:
                blocks.append(BlockCost(**entry))
            except TypeError as err:
                raise ConfigError(f"{path}: block {row}: {err}; re-run the profiler") from err
        return cls(blocks=blocks, model=data.get("model", ""), device=data.get("device", ""),
                   micro_batch=data.get("micro_batch", {}), source=data.get("source", "profile"))


ZERO_LEVELS = (0, 1, 2, 3)  # DeepSpeed's: replicated, + optimizer state, + gradients, + parameters sharded


@dataclass(frozen=True)
class ZeroSharding:
    """How a stage's training state is split over its ``dp`` data-parallel ranks at ZeRO level ``zero``, as
    :mod:`omnibal_pl.parallel.sharding` runs it: optimizer state from level 1, gradients from 2,
    parameters from 3 (each rank holds 1/dp of what is sharded)."""

    zero: int = 0
    dp: int = 1

    def __post_init__(self) -> None:
        if self.zero not in ZERO_LEVELS or self.dp < 1:
            raise ConfigError(f"ZeRO level {self.zero!r} over dp={self.dp}: the level is one of 0-3 and dp >= 1")

    def divisor(self, level: int) -> int:
        """``dp`` when the state of ZeRO ``level`` (1 optimizer, 2 gradients, 3 parameters) is sharded, else 1."""
        return self.dp if self.zero >= level else 1


def training_static_bytes(num_params: int, element_bytes: int, sharding: ZeroSharding = ZeroSharding()
                          ) -> tuple[int, int]:
    """``(param_bytes, grad_opt_bytes)`` one rank holds of ``num_params`` parameters stored with
    ``element_bytes`` each, trained with AdamW: gradients in the parameter dtype, the two moments in fp32
    and, for 16-bit parameters, an fp32 master copy (the usual 2 + 2 + 12 = 16 bytes per bf16 parameter,
    4 + 4 + 8 for fp32, as bf16-mixed keeps them), each part divided over the ranks that ``sharding``
    splits it over."""
    state = 8 + (4 if element_bytes < 4 else 0)
    params = num_params * element_bytes // sharding.divisor(3)
    grads = num_params * element_bytes // sharding.divisor(2)
    return params, grads + num_params * state // sharding.divisor(1)


GRAD_BUCKET_BYTES = 25 * 2**20  # the most gradient bytes the DP sync copies at once (parallel/pipeline.py)


def transient_bytes(blocks: Sequence[BlockCost], sharding: ZeroSharding = ZeroSharding(),
                    pipelined: bool = False) -> float:
    """Bytes a stage of ``blocks`` holds for a moment on top of its static bytes and kept activations, as the
    runtime runs it: the largest recompute transient (one block's activations rebuilt during its backward,
    ``act_none - act_full``; reserved whether or not the block recomputes) plus communication buffers: the
    DP gradient bucket at ZeRO 0/1 (``dp > 1``), FSDP2's unsharded parameters of the block running and the
    one prefetched (ZeRO 3) and the unsharded gradients of one block being reduce-scattered (ZeRO 2/3), and
    when ``pipelined`` the stage's receive buffers for its input and its output's gradient (each the size of
    the tensor crossing a stage boundary: the first block's checkpointed input, ``act_full``)."""
    if not blocks:
        return 0.0
    p2p = 2 * blocks[0].act_full_bytes if pipelined else 0
    recompute = max(b.act_none_bytes - b.act_full_bytes for b in blocks)
    unsharded = max(b.param_bytes for b in blocks) * sharding.divisor(3)  # parameter (= gradient) bytes
    if sharding.dp == 1:
        comm = 0.0
    elif sharding.zero >= 2:
        comm = unsharded * (3 if sharding.zero == 3 else 1)
    else:
        comm = min(GRAD_BUCKET_BYTES, sum(b.param_bytes for b in blocks))
    return float(max(recompute, 0) + comm + p2p)
