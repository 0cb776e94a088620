"""Block profiler: measured per-block costs of a real model for one micro-batch shape.

For every block of ``VLM(cfg).blocks()``, with the block's real input (the previous block's output on a
:func:`~omnibal_pl.model.dummy.dummy_batch` of the shape), in the run's precision
(:class:`Precision`: Lightning's ``32-true``, ``16-true``, ``bf16-true``, ``16-mixed``, ``bf16-mixed``):

- forward and backward seconds (backward of a random output gradient), medians over ``repeats`` after
  ``warmup`` runs; CUDA events on GPU, wall clock on CPU (where ops are synchronous);
- the attention core's forward seconds (the time ``attention`` recompute adds), timed around
  :meth:`TransformerBlock.attention_core`; ``full`` recompute adds one forward;
- activation bytes kept for backward under each recompute mode: the distinct storages autograd saves
  during the block's forward (:mod:`omnibal_pl.plan.saved_bytes`), the block input included; parameters,
  what is computed from one parameter alone (the bf16 copies autocast casts the weights to, shared by every
  micro-batch of a step) and the micro-batch's own tensors (input data, counted apart) excluded;
- parameter bytes and gradient + AdamW state bytes (:func:`~omnibal_pl.plan.costs.training_static_bytes`)
  at the precision's parameter storage size (4 bytes under ``*-mixed``, 2 under ``bf16-true``).

Only the block being measured is on the device: the model is built on the host and each block moves to
the device for its measurement and back, so a model larger than one device can be profiled block by block.

The ``llm.head`` block is measured together with the training loss on its logits (``head_loss``), as the
last stage runs it: its times include the loss's forward and backward, its activation bytes what the
loss saves. The default, :func:`next_token_loss`, is a plain cross-entropy: it keeps the fp32 log-softmax
[L, vocab], an upper bound of the runtime's chunked loss (``train/objective.py: packed_loss_sum``, which
keeps the logits and an fp32 log-sum-exp per position: equal under ``32-true``, half the figure under
16-bit precisions). ``omnibal-train`` passes the runtime's own (``train/objective.py: head_loss_sum``).

Results are cached as JSON (``CostProfile.save``) under a name made of the model, the device, the precision
(:attr:`Precision.tag`), the shape and a hash of the whole model config.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import statistics
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from omnibal_pl.batch import IGNORE_INDEX, MicroBatchShape, PackedBatch
from omnibal_pl.errors import ConfigError
from omnibal_pl.model.block import RECOMPUTE_MODES, TransformerBlock
from omnibal_pl.model.config import VLMConfig
from omnibal_pl.model.dummy import dummy_batch
from omnibal_pl.model.flops import block_kind
from omnibal_pl.model.sparsify import split_output
from omnibal_pl.model.vlm import VLM
from omnibal_pl.plan.costs import BlockCost, CostProfile, ZeroSharding, training_static_bytes
from omnibal_pl.plan.saved_bytes import ParameterFilter, saved_bytes

MEASUREMENT_VERSION = 3  # part of the cache key: bump when what is measured changes (3: input data excluded,
#                          non-transformer blocks measured under checkpoint for ``full``)

HeadLoss = Callable[[torch.Tensor, PackedBatch], torch.Tensor]  # (logits [1, L, vocab], batch) -> scalar loss


def _dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Precision:
    """How a run stores its parameters and computes, by Lightning's precision ``name``: parameters (and
    inputs) in ``params``; forward and backward under ``torch.autocast`` to ``autocast`` (None: no autocast,
    everything in ``params``), as Lightning's MixedPrecision plugin runs ``*-mixed``."""

    name: str
    params: torch.dtype
    autocast: torch.dtype | None = None

    @property
    def compute(self) -> torch.dtype:
        """The dtype most activations are computed in."""
        return self.autocast or self.params

    @property
    def tag(self) -> str:
        """File-name part: the parameter dtype, then ``-autocast-<dtype>`` under mixed precision."""
        name = _dtype_name(self.params)
        return name if self.autocast is None else f"{name}-autocast-{_dtype_name(self.autocast)}"

    def context(self, device: torch.device) -> ContextManager[object]:
        """The autocast region forward passes run in (a no-op without autocast)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)


PRECISIONS = {p.name: p for p in (
    Precision("32-true", torch.float32), Precision("16-true", torch.float16), Precision("bf16-true", torch.bfloat16),
    Precision("16-mixed", torch.float32, torch.float16), Precision("bf16-mixed", torch.float32, torch.bfloat16),
)}


_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}  # Lightning's short names


def precision_of(name: str | int) -> Precision:
    """The :class:`Precision` of a Lightning precision name (or its short alias: ``32``, ``16``, ``bf16``);
    :class:`ConfigError` listing the names otherwise."""
    key = _ALIASES.get(str(name), str(name))
    if key not in PRECISIONS:
        raise ConfigError(f"precision {name!r} is not one of {sorted(PRECISIONS)}")
    return PRECISIONS[key]


def default_precision(device: torch.device) -> str:
    """``bf16-mixed`` on CUDA, ``32-true`` elsewhere."""
    return "bf16-mixed" if device.type == "cuda" else "32-true"


def next_token_loss(logits: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """sum_t w_t * CE_t of next-token prediction over ``logits`` [1, L, vocab] (fp32 arithmetic), with the
    training loss's weights: ``loss_weight``, 0 where the next label is ``IGNORE_INDEX``. Saves the fp32
    log-softmax [L - 1, vocab] for backward (an upper bound of the runtime's chunked loss, module docstring)."""
    labels = batch.labels[0, 1:]
    weights = batch.loss_weight[0, 1:].float() * (labels != IGNORE_INDEX)
    ce = F.cross_entropy(logits[0, :-1].float(), labels.clamp(min=0), reduction="none")
    return (ce * weights).sum()


def local_device(device: str | None = None) -> torch.device:
    """``device``, or CUDA when available, else CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_name(device: torch.device) -> str:
    """A file-name-safe name of the device, e.g. ``cpu`` or ``NVIDIA-H100-80GB-HBM3``."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def device_memory_bytes(device: torch.device) -> float:
    """Total memory of ``device``: the GPU's, or the machine's physical memory for CPU."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def profile_batch(cfg: VLMConfig, shape: MicroBatchShape, seed: int = 0) -> PackedBatch:
    """A dummy packed micro-batch of exactly ``shape``: ``shape.samples`` samples with their real tiles
    (:meth:`MicroBatchShape.sample_tiles`), padded to ``shape.token_cap`` tokens and ``shape.vit_cap`` tiles."""
    tiles = shape.sample_tiles(cfg.tokens_per_tile)
    text = [n - t * cfg.tokens_per_tile for n, t in zip(shape.seqlens, tiles)]
    return dummy_batch(cfg, text, tiles, token_cap=shape.token_cap, vit_cap=shape.vit_cap, seed=seed)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """``(fn(), seconds)``; CUDA events on GPU, wall clock on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - begin


class _CoreTimer:
    """Times every ``attention_core`` call of one transformer block while installed."""

    def __init__(self, block: TransformerBlock, device: torch.device) -> None:
        self.block, self.device, self.seconds = block, device, 0.0

    def __enter__(self) -> "_CoreTimer":
        original = type(self.block).attention_core

        def timed(fn, *args):
            out, secs = _timed(lambda: original(self.block, fn, *args), self.device)
            self.seconds += secs
            return out

        self.block.attention_core = timed  # instance attribute shadows the method
        return self

    def __exit__(self, *exc) -> None:
        del self.block.attention_core


def _forward_step(block: torch.nn.Module, x: torch.Tensor, batch: PackedBatch, precision: Precision,
                  device: torch.device, loss: Callable[[torch.Tensor], torch.Tensor] | None
                  ) -> Callable[..., torch.Tensor]:
    """One forward of ``block`` on ``x`` in the precision's autocast region: its output, or ``loss`` of it.
    ``step(checkpointed=True)`` runs the block under ``torch.utils.checkpoint``, as a pipeline stage runs a
    non-transformer block under ``full`` recompute."""

    def step(checkpointed: bool = False) -> torch.Tensor:
        with precision.context(device):
            out = checkpoint(block, x, batch, use_reentrant=False) if checkpointed else block(x, batch)
            return out if loss is None else loss(out)

    return step


def _measure_block(name: str, block: torch.nn.Module, step: Callable[[], torch.Tensor], device: torch.device,
                   warmup: int, repeats: int, skip: ParameterFilter, static: tuple[int, int]) -> BlockCost:
    """The :class:`BlockCost` of ``block`` whose forward is ``step()``; ``static``: its
    ``(param_bytes, grad_opt_bytes)``."""
    forward, backward, core = [], [], []
    for rep in range(warmup + repeats):
        out, f = _timed(step, device)
        _, b = _timed(partial(out.backward, torch.randn_like(out)), device)
        if rep >= warmup:
            forward.append(f)
            backward.append(b)
    transformer = isinstance(block, TransformerBlock)
    if transformer:
        for rep in range(warmup + repeats):
            with _CoreTimer(block, device) as timer:
                step()
            if rep >= warmup:
                core.append(timer.seconds)
    act = {}
    for mode in RECOMPUTE_MODES if transformer else ("none", "full"):
        if transformer:
            block.recompute = mode
        act[mode], out = saved_bytes(partial(step, checkpointed=not transformer and mode == "full"), skip)
        del out
    if transformer:
        block.recompute = "none"
    f_s = statistics.median(forward)
    return BlockCost(
        name=name, kind=block_kind(name), forward_s=f_s, backward_s=statistics.median(backward),
        act_none_bytes=act["none"], act_attention_bytes=act.get("attention", act["none"]),
        act_full_bytes=act["full"],
        recompute_attention_s=statistics.median(core) if core else 0.0,
        recompute_full_s=f_s,
        param_bytes=static[0], grad_opt_bytes=static[1],
    )


def cache_path(cache_dir: str | Path, cfg: VLMConfig, shape: MicroBatchShape, device: torch.device,
               precision: str, sharding: ZeroSharding, head_loss: HeadLoss = next_token_loss) -> Path:
    """Where the profile of this model, device, precision, shape and head loss is cached (one file each)."""
    loss_name = f"{head_loss.__module__}.{head_loss.__qualname__}"
    digest = hashlib.sha1(f"{MEASUREMENT_VERSION}|{cfg!r}|{sharding}|{loss_name}".encode()).hexdigest()[:10]
    tag = precision_of(precision).tag
    return Path(cache_dir) / (f"{cfg.name}-{device_name(device)}-{tag}-t{shape.vit_cap}-L{shape.token_cap}"
                              f"-s{shape.samples}-{digest}.json")


def profile_blocks(cfg: VLMConfig, shape: MicroBatchShape, *, device: str | None = None,
                   precision: str | None = None, warmup: int = 2, repeats: int = 5,
                   sharding: ZeroSharding = ZeroSharding(), cache_dir: str | Path | None = None,
                   head_loss: HeadLoss = next_token_loss, seed: int = 0) -> CostProfile:
    """Measures every block of ``cfg`` for one micro-batch of ``shape`` (see the module docstring).

    ``precision``: Lightning's name (:data:`PRECISIONS`), ``bf16-mixed`` on CUDA and ``32-true`` on CPU by
    default. ``head_loss``: the loss measured with ``llm.head`` (:data:`HeadLoss`). With ``cache_dir``, a
    cached profile of the same model config, device, precision and shape is returned without measuring
    (the cache keys on ``head_loss`` by its qualified name).
    """
    dev = local_device(device)
    prec = precision_of(precision or default_precision(dev))
    if warmup < 0 or repeats < 1:
        raise ConfigError(f"profiler warmup={warmup} must be >= 0 and repeats={repeats} >= 1")
    path = cache_path(cache_dir, cfg, shape, dev, prec.name, sharding, head_loss) if cache_dir is not None else None
    if path is not None and path.exists():
        return CostProfile.load(path)
    torch.manual_seed(seed)
    model = VLM(cfg).to(dtype=prec.params).train()  # on the host: only the block being measured is on ``dev``
    batch = profile_batch(cfg, shape, seed).to(dev)

    def logits_loss(out: torch.Tensor) -> torch.Tensor:
        return head_loss(split_output(out, cfg.sparsify)[0], batch)

    costs = []
    x = batch.pixel_values.to(prec.params)
    for name, block in model.blocks():
        block.to(dev)
        # the block's input as the runtime's: a leaf that requires grad where it does (floating point, past
        # vision.embed); the step's input data is no activation
        x = x.detach().requires_grad_(x.is_floating_point() and name != "vision.embed")
        skip = ParameterFilter([*block.parameters(), *batch.tensors()])
        step = _forward_step(block, x, batch, prec, dev, logits_loss if name == "llm.head" else None)
        count = sum(p.numel() for p in block.parameters())
        static = training_static_bytes(count, prec.params.itemsize, sharding)
        costs.append(_measure_block(name, block, step, dev, warmup, repeats, skip, static))
        with torch.no_grad(), prec.context(dev):
            x = block(x, batch)  # the next block's input
        block.zero_grad(set_to_none=True)
        block.to("cpu")
    profile = CostProfile(blocks=costs, model=cfg.name, device=device_name(dev),
                          micro_batch={**shape.as_dict(), "precision": prec.name, "dtype": _dtype_name(prec.compute)},
                          source="profile")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        profile.save(path)
    return profile
