"""Crash-safe checkpoints and the automatic resume that finds them.

Writing (a kill at any point leaves every checkpoint with its final name complete):

- a Lightning checkpoint file (data-parallel runs) is written by :class:`AtomicCheckpointIO` to
  ``<name>.tmp`` beside its final name, flushed to disk, then renamed over it
  (:func:`~omnibal_pl.parallel.dcp.publish`);
- a distributed checkpoint folder (pipeline runs) is written the same way by
  :func:`omnibal_pl.parallel.dcp.save`: every rank into ``<name>.tmp/``, then global rank 0 renames it;
- ``last.ckpt`` is a symbolic link to the newest step checkpoint, swapped in one rename
  (:class:`CrashSafeCheckpoint`), so it only ever names a complete checkpoint.

Reading: ``ckpt_path=auto`` (or Lightning's ``last``) resolves, before the Trainer starts, to the newest
complete checkpoint in the run directory's ``checkpoints/`` folder (:func:`latest_checkpoint`, by the step in
its name), or to no checkpoint (a fresh start) when there is none yet. The same command line therefore starts
a run and continues it after a kill: torchrun's ``--max-restarts`` and a requeued SLURM job (hydra-submitit's
checkpoint hook resubmits the same job into the same run directory, ``cluster=slurm`` sets ``ckpt_path: auto``)
resume where the last checkpoint left off. torchrun's c10d rendezvous (``--standalone``, ``--rdzv-backend=c10d``)
keeps one store across restarts by default, so a restarted worker can read the previous attempt's addresses and
fail to connect; launch it with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (a warning says so at start). Checkpoints
are loaded with ``weights_only=True``: plain containers,
numbers, strings and tensors; anything else is refused before it can run.
"""
from __future__ import annotations

import logging
import os
import warnings
import pickle
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import lightning.pytorch as pl
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from omnibal_pl.errors import ConfigError
from omnibal_pl.parallel.dcp import META_FILE, TEMP_SUFFIX, publish, temp_path

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"  # under the run directory
AUTO_RESUME = ("auto", "last")  # ckpt_path values that mean: the newest complete checkpoint of this run, if any
STEP_NAME = "step{step:06d}"  # ModelCheckpoint's file name pattern; the step is read back from it
_STEP = re.compile(r"^step(\d+)\.ckpt$")


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a finished checkpoint: a Lightning file, or a distributed checkpoint folder holding
    DCP's ``.metadata`` and Lightning's ``meta.pt`` (both are renamed into place only once complete)."""
    if path.name.endswith(TEMP_SUFFIX):
        return False
    if path.is_dir():
        return (path / ".metadata").is_file() and (path / META_FILE).is_file()
    return path.is_file() and path.stat().st_size > 0


def latest_checkpoint(folder: Path) -> Path | None:
    """The complete checkpoint with the highest step in ``folder`` (names ``step<N>.ckpt``); None when there is
    none. ``last.ckpt`` is not read: it links to one of them."""
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP.match(p.name)) and not p.is_symlink()]
    complete = [(step, p) for step, p in found if is_complete(p)]
    return max(complete)[1] if complete else None


def resolve_ckpt_path(ckpt_path: Optional[str], run_dir: Path) -> Optional[str]:
    """The checkpoint a run starts from: ``auto``/``last`` -> the newest complete one under
    ``run_dir/checkpoints`` (None: start fresh); a path must exist; None stays None."""
    if ckpt_path is None:
        return None
    if ckpt_path in AUTO_RESUME:
        _warn_on_shared_rendezvous_store(os.environ)
        found = latest_checkpoint(run_dir / CHECKPOINT_DIR)
        log.info("ckpt_path=%s: %s", ckpt_path, f"resuming from {found}" if found else
                 f"no complete checkpoint in {run_dir / CHECKPOINT_DIR}: starting fresh")
        return None if found is None else str(found)
    if not Path(ckpt_path).exists():
        raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint; give an existing file or folder, or "
                          "ckpt_path=auto to resume from the run directory's newest checkpoint")
    return ckpt_path


def _warn_on_shared_rendezvous_store(env: Mapping[str, str]) -> None:
    """Warns when torchrun may restart this job (``--max-restarts``) with its shared rendezvous store."""
    restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if restarts and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and env.get("RANK", "0") == "0":
        warnings.warn("torchrun --max-restarts with the shared rendezvous store: a restarted worker may read the last "
                      "attempt's addresses and fail to connect; launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
                      stacklevel=3)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint files written crash-safe (temporary name, flush, rename) and read with
    ``weights_only=True`` (a checkpoint carrying other pickled objects is refused with a :class:`ConfigError`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        final = Path(path)
        tmp = temp_path(final)
        super().save_checkpoint(checkpoint, tmp, storage_options)
        publish(tmp, final)

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise ConfigError(f"checkpoint {path}: holds Python objects beyond plain containers, numbers, strings and "
                              f"tensors, which are not unpickled (that could run code): "
                              f"{str(err).strip().splitlines()[0]}") from None


class CrashSafeCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` saving ``step<N>.ckpt`` every ``every_n_train_steps`` steps, all kept, with
    ``last.ckpt`` a symbolic link to the newest, replaced in one rename (Lightning removes the old link first)."""

    def __init__(self, dirpath: Path, every_n_train_steps: int) -> None:
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_train_steps, save_last="link", save_top_k=-1,
                         filename=STEP_NAME, auto_insert_metric_name=False, enable_version_counter=False)

    @staticmethod
    def _link_checkpoint(trainer: pl.Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            link = Path(linkpath)
            tmp = temp_path(link)
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            tmp.symlink_to(os.path.relpath(filepath, link.parent))
            publish(tmp, link)
        trainer.strategy.barrier()
