"""Block profiler: measured per-block costs of a real model for one micro-batch shape.

For every block of ``VLM(cfg).blocks()``, with the block's real input (from one forward of the whole
model on a :func:`~omnibal_pl.model.dummy.dummy_batch` of the shape):

- forward and backward seconds (backward of a random output gradient), medians over ``repeats`` after
  ``warmup`` runs; CUDA events on GPU, wall clock on CPU (where ops are synchronous);
- the attention core's forward seconds (the time ``attention`` recompute adds), timed around
  :meth:`TransformerBlock.attention_core`; ``full`` recompute adds one forward;
- activation bytes kept for backward under each recompute mode: the distinct storages autograd saves
  during the block's forward (``saved_tensors_hooks``), parameters excluded, the block input included;
- parameter bytes and gradient + AdamW state bytes (:func:`~omnibal_pl.plan.costs.training_static_bytes`).

Results are cached as JSON (``CostProfile.save``) under a name made of the model, the device, the dtype,
the shape and a hash of the whole model config.
"""
from __future__ import annotations

import hashlib
import os
import re
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from omnibal_pl.batch import MicroBatchShape, PackedBatch
from omnibal_pl.errors import ConfigError
from omnibal_pl.model.block import TransformerBlock
from omnibal_pl.model.config import VLMConfig
from omnibal_pl.model.dummy import dummy_batch
from omnibal_pl.model.flops import block_kind
from omnibal_pl.model.vlm import VLM
from omnibal_pl.model.block import RECOMPUTE_MODES
from omnibal_pl.plan.costs import BlockCost, CostProfile, ZeroSharding, training_static_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def _saved_bytes(run: Callable[[], torch.Tensor], skip: set[int]) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct storages autograd saves while ``run()`` executes (storages in ``skip``
    excluded), and its output."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(storages.values()), out


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


def _measure_block(name: str, block: torch.nn.Module, x: torch.Tensor, batch: PackedBatch, device: torch.device,
                   warmup: int, repeats: int, skip: set[int], sharding: ZeroSharding) -> BlockCost:
    x = x.detach().requires_grad_(x.is_floating_point() and name != "vision.embed")
    forward, backward, core = [], [], []
    for rep in range(warmup + repeats):
        out, f = _timed(lambda: block(x, batch), device)
        grad = torch.randn_like(out)
        _, b = _timed(partial(out.backward, grad), device)
        if rep >= warmup:
            forward.append(f)
            backward.append(b)
    transformer = isinstance(block, TransformerBlock)
    if transformer:
        for rep in range(warmup + repeats):
            with _CoreTimer(block, device) as timer:
                block(x, batch)
            if rep >= warmup:
                core.append(timer.seconds)
    act = {}
    for mode in RECOMPUTE_MODES if transformer else ("none",):
        if transformer:
            block.recompute = mode
        act[mode], out = _saved_bytes(lambda: block(x, batch), skip)
        del out
    if transformer:
        block.recompute = "none"
    params = list(block.parameters())
    count = sum(p.numel() for p in params)
    element = params[0].element_size() if params else 4
    param_bytes, grad_opt = training_static_bytes(count, element, sharding)
    f_s = statistics.median(forward)
    return BlockCost(
        name=name, kind=block_kind(name), forward_s=f_s, backward_s=statistics.median(backward),
        act_none_bytes=act["none"], act_attention_bytes=act.get("attention", act["none"]),
        act_full_bytes=act.get("full", act["none"]),
        recompute_attention_s=statistics.median(core) if core else 0.0,
        recompute_full_s=f_s if transformer else 0.0,
        param_bytes=param_bytes, grad_opt_bytes=grad_opt,
    )


def cache_path(cache_dir: str | Path, cfg: VLMConfig, shape: MicroBatchShape, device: torch.device, dtype: str,
               sharding: ZeroSharding) -> Path:
    """Where the profile of this model, device, dtype and shape is cached."""
    digest = hashlib.sha1(f"{cfg!r}|{sharding}".encode()).hexdigest()[:10]
    return Path(cache_dir) / (f"{cfg.name}-{device_name(device)}-{dtype}-t{shape.vit_cap}-L{shape.token_cap}"
                              f"-s{shape.samples}-{digest}.json")


def profile_blocks(cfg: VLMConfig, shape: MicroBatchShape, *, device: str | None = None, dtype: str | None = None,
                   warmup: int = 2, repeats: int = 5, sharding: ZeroSharding = ZeroSharding(),
                   cache_dir: str | Path | None = None,
                   seed: int = 0) -> CostProfile:
    """Measures every block of ``cfg`` for one micro-batch of ``shape`` (see the module docstring).

    ``dtype``: ``bfloat16`` on CUDA and ``float32`` on CPU by default. With ``cache_dir``, a cached
    profile of the same model config, device, dtype and shape is returned without measuring.
    """
    dev = local_device(device)
    dtype = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"profiler dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if warmup < 0 or repeats < 1:
        raise ConfigError(f"profiler warmup={warmup} must be >= 0 and repeats={repeats} >= 1")
    path = cache_path(cache_dir, cfg, shape, dev, dtype, sharding) if cache_dir is not None else None
    if path is not None and path.exists():
        return CostProfile.load(path)
    torch.manual_seed(seed)
    model = VLM(cfg).to(device=dev, dtype=DTYPES[dtype]).train()
    batch = profile_batch(cfg, shape, seed).to(dev)
    blocks = model.blocks()
    inputs = []
    with torch.no_grad():
        x = batch.pixel_values.to(DTYPES[dtype])
        for _, block in blocks:
            inputs.append(x)
            x = block(x, batch)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    costs = [_measure_block(name, block, x_in, batch, dev, warmup, repeats, skip, sharding)
             for (name, block), x_in in zip(blocks, inputs)]
    profile = CostProfile(blocks=costs, model=cfg.name, device=device_name(dev),
                          micro_batch={**shape.as_dict(), "dtype": dtype}, source="profile")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        profile.save(path)
    return profile
