"""Distributed checkpoints of a pipeline x data parallel run, keyed by the model's own names.

A checkpoint is a folder written by ``torch.distributed.checkpoint`` (every rank writes its stage's
tensors; DP replicas hold equal tensors under equal keys, which DCP saves once) plus ``meta.pt``,
Lightning's rank-independent rest (loops, sampler position, callbacks), written by global rank 0.

Keys never mention the pipeline layout, so a checkpoint loads into any other layout or PP size:

- ``state_dict.model.<name>``: parameters and buffers, ``<name>`` as in ``VLM.state_dict()``
  (a tied embedding split across ranks appears as both ``llm.embed.tok.weight`` and ``llm.head.out.weight``);
- ``optimizer_0.state.<name>.<key>``: the optimizer's per-parameter state (AdamW: ``step``, ``exp_avg``,
  ``exp_avg_sq``);
- ``optimizer_0.group.<name>.<key>``: the hyperparameters of the parameter's group (``lr``,
  ``initial_lr``, ``weight_decay``, ...), so groups need not line up across layouts.

``<name>`` in the optimizer keys is the parameter's single-process name: the head's copy of a tied
embedding is named ``llm.embed.tok.weight`` there (both copies have the same state).

Crash safety: :func:`save` writes into ``<name>.tmp/`` and global rank 0 renames the folder to ``<name>`` once
every rank's files, DCP's ``.metadata`` and ``meta.pt`` are on disk (:func:`publish`), so a folder with the
final name is always complete. ``meta.pt`` is read with ``weights_only=True`` (:func:`load_meta`).
"""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.optim import ZeroRedundancyOptimizer

from omnibal_pl.errors import ConfigError
from omnibal_pl.model.lora import trainable_state_dict

MODEL_KEY = "state_dict"
OPTIMIZER_KEY = "optimizer_0"
META_FILE = "meta.pt"
TEMP_SUFFIX = ".tmp"  # a checkpoint being written; never read


def temp_path(path: Path) -> Path:
    """Where ``path`` is written before :func:`publish` renames it (same folder, so the rename is atomic)."""
    return path.with_name(path.name + TEMP_SUFFIX)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, path: Path) -> None:
    """Gives the finished ``tmp`` (a file, a folder or a symbolic link) the name ``path`` in one rename, after
    flushing its contents to disk. A folder already at ``path`` is first moved aside to ``<name>.old.tmp`` and
    removed after the rename (a kill in between leaves no checkpoint under that name, never a partial one)."""
    if not tmp.is_symlink():
        for f in ([tmp] if tmp.is_file() else [p for p in tmp.rglob("*") if p.is_file()]):
            _fsync(f)
    old = None
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(path.name + ".old" + TEMP_SUFFIX)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def model_state(modules: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """``{"model.<name>": tensor}`` of every stage's pruned VLM (``module.model``); tensors share storage."""
    return {f"model.{k}": v for m in modules for k, v in m.model.state_dict().items()}


def state_holder(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's per-parameter state: under ZeRO 1 the local optimizer of
    ``ZeroRedundancyOptimizer`` (the parameters this rank updates), else ``optimizer`` itself."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def optimizer_state(optimizer: torch.optim.Optimizer, names: Mapping[nn.Parameter, str]) -> dict[str, Any]:
    """The optimizer's state flattened to ``state.<name>.<key>`` (the parameters whose state this rank holds)
    and ``group.<name>.<key>`` (every parameter's group hyperparameters) entries."""
    out: dict[str, Any] = {}
    held = state_holder(optimizer).state
    for group in optimizer.param_groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        for p in group["params"]:
            name = names[p]
            for k, v in held.get(p, {}).items():
                out[f"state.{name}.{k}"] = v
            for k, v in hyper.items():
                out[f"group.{name}.{k}"] = v
    return out


def save(path: Path, model: Mapping[str, torch.Tensor], optimizer: Mapping[str, Any], meta: dict[str, Any],
         is_global_zero: bool) -> None:
    """Collective: write ``model`` and ``optimizer`` (this rank's entries) and, from rank 0, ``meta`` into
    ``<path>.tmp``; rank 0 then renames it to ``path`` (see the module docstring)."""
    tmp = temp_path(path)
    if is_global_zero and tmp.exists():
        shutil.rmtree(tmp)  # left by a save that was killed
    _barrier()
    tmp.mkdir(parents=True, exist_ok=True)
    dcp.save({MODEL_KEY: dict(model), OPTIMIZER_KEY: dict(optimizer)}, checkpoint_id=tmp)
    if is_global_zero:
        torch.save(meta, tmp / META_FILE)
        publish(tmp, path)
    _barrier()


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def load(path: Path, modules: Sequence[nn.Module], optimizer: torch.optim.Optimizer | None,
         names: Mapping[nn.Parameter, str], trained_only: bool = False) -> dict[str, Any]:
    """Collective: fill this rank's stages (and ``optimizer``) from ``path``; return ``meta``.

    ``trained_only``: the checkpoint of an adapter run holds only the parameters that train; the frozen
    ones keep the values the stages were built with. Raises :class:`ConfigError` when ``path`` is not such
    a checkpoint or lacks an entry this rank needs (a different model, or one saved without optimizer state).
    """
    if not (path / ".metadata").is_file() or not (path / META_FILE).is_file():
        raise ConfigError(f"checkpoint {path}: not a distributed checkpoint of the omnibal strategy (a folder with "
                          f".metadata and {META_FILE}); resume pipeline runs from their own checkpoints/ folder")
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    model = model_state(modules)
    if trained_only:
        trained = {f"model.{n}" for m in modules for n in trainable_state_dict(m.model)}
        model = {k: v for k, v in model.items() if k in trained}
    wanted = {f"{MODEL_KEY}.{k}" for k in model}
    flat: dict[str, Any] = {}
    if optimizer is not None:
        # hyperparameters load over their current values; state tensors into buffers of the stored shapes
        flat = {k: v for k, v in optimizer_state(optimizer, names).items() if k.startswith("group.")}
        wanted |= {f"{OPTIMIZER_KEY}.{k}" for k in flat}
        holder = state_holder(optimizer)
        own = {p for group in holder.param_groups for p in group["params"]}
        for p, name in names.items():
            if p not in own:
                continue  # under ZeRO 1 another rank holds this parameter's state
            for key, meta in stored.items():
                if key.startswith(f"{OPTIMIZER_KEY}.state.{name}.") and isinstance(meta, TensorStorageMetadata):
                    like_param = tuple(meta.size) == tuple(p.shape)  # exp_avg & co: sharded as the parameter
                    flat[key[len(OPTIMIZER_KEY) + 1:]] = (
                        torch.empty_like(p, dtype=meta.properties.dtype) if like_param
                        else torch.empty(meta.size, dtype=meta.properties.dtype, device="cpu"))
    missing = sorted(wanted - set(stored))
    if missing:
        raise ConfigError(f"checkpoint {path}: missing {missing[:6]}{' ...' if len(missing) > 6 else ''}; it was "
                          "saved from another model config or without optimizer state")
    state = {MODEL_KEY: model, OPTIMIZER_KEY: flat}
    dcp.load(state, checkpoint_id=path)
    if optimizer is not None:
        _apply_optimizer_state(optimizer, names, state[OPTIMIZER_KEY])
    return load_meta(path / META_FILE)


def _apply_optimizer_state(optimizer: torch.optim.Optimizer, names: Mapping[nn.Parameter, str],
                           flat: Mapping[str, Any]) -> None:
    for group in optimizer.param_groups:
        if not group["params"]:
            continue  # a rank with nothing to train (a frozen stage under LoRA) has one empty group
        first = names[group["params"][0]]
        for k in group:
            if k != "params" and f"group.{first}.{k}" in flat:
                group[k] = flat[f"group.{first}.{k}"]
    holder = state_holder(optimizer)
    for group in holder.param_groups:
        for p in group["params"]:
            prefix = f"state.{names[p]}."
            state = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
            if state:
                holder.state[p] = state


def load_meta(path: Path) -> dict[str, Any]:
    """Lightning's rest of a checkpoint, unpickled with ``weights_only=True``: plain containers, numbers,
    strings and tensors only, so loading someone else's checkpoint runs no code of theirs."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(f"checkpoint {path}: holds Python objects beyond plain containers and tensors, which are "
                          f"not unpickled (that could run code): {str(err).splitlines()[0]}") from None
