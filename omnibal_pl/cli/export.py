"""``omnibal-export``: a trained checkpoint as a Hugging Face folder that transformers (LLaVA, InternVL, Qwen2-VL,
Qwen2.5-VL) or InternVL-Chat's remote code loads, and that ``init_from`` starts another run from.

    omnibal-export checkpoint=outputs/train/<date>/<time>/checkpoints/last.ckpt target=exported/
    omnibal-export checkpoint=<pipeline run>/checkpoints/last.ckpt target=exported/ dtype=bfloat16 overwrite=true

A Hydra app over ``conf/export.yaml``. The checkpoint is read whole into this process
(:mod:`omnibal_pl.train.trained_model`: a Lightning ``.ckpt`` or a distributed checkpoint of any pipeline
layout and ZeRO level) and written by :func:`omnibal_pl.model.hf_export.export_hf`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml
from omegaconf import DictConfig

from omnibal_pl.cli.conf import hydra_app
from omnibal_pl.config import to_dataclass
from omnibal_pl.errors import ConfigError
from omnibal_pl.model.hf_export import ExportResult, export_hf
from omnibal_pl.train.trained_model import read_trained_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportConfig:
    """``conf/export.yaml``: ``source`` and ``tokenizer`` take ``auto`` (the checkpoint's ``init_from``; the source,
    else the run's ``dataset.tokenizer``) or a folder or null; ``max_shard_gb`` in GiB."""

    checkpoint: str
    target: str
    source: Optional[str] = "auto"
    tokenizer: Optional[str] = "auto"
    family: str = "auto"
    dtype: Optional[str] = None
    max_shard_gb: float = 5.0
    overwrite: bool = False


def run_tokenizer(checkpoint: Path) -> str | None:
    """The folder of the tokenizer the run trained with (``dataset.tokenizer`` in its ``config.yaml``, the
    checkpoint being ``<run_dir>/checkpoints/<name>``); None when the run has none (synthetic data)."""
    config = checkpoint.parent.parent / "config.yaml"
    if not config.is_file():
        return None
    tokenizer = ((yaml.safe_load(config.read_text()) or {}).get("dataset") or {}).get("tokenizer")
    if not tokenizer:
        return None
    return str(Path(tokenizer) if Path(tokenizer).is_dir() else Path(tokenizer).parent)


def export(cfg: DictConfig) -> ExportResult:
    """Reads the checkpoint and writes the folder; returns what was written."""
    ecfg = to_dataclass(cfg, ExportConfig, "omnibal-export")
    target = Path(ecfg.target)
    if target.exists() and not ecfg.overwrite:  # before the (possibly long) checkpoint read
        raise ConfigError(f"target={target} exists; choose another folder or pass overwrite=true to replace it")
    if ecfg.dtype is not None and ecfg.dtype not in DTYPES:
        raise ConfigError(f"dtype={ecfg.dtype!r} is not one of {sorted(DTYPES)} (or null: as trained)")
    trained = read_trained_model(ecfg.checkpoint)
    source = trained.init_from if ecfg.source == "auto" else ecfg.source
    if source is not None and not Path(source, "config.json").is_file():
        key = "source (auto: the checkpoint's init_from)" if ecfg.source == "auto" else "source"
        raise ConfigError(f"{key}={source}: not a Hugging Face folder (no config.json); give source=<folder> or source=null")
    tokenizer = (source or run_tokenizer(Path(ecfg.checkpoint))) if ecfg.tokenizer == "auto" else ecfg.tokenizer
    result = export_hf(trained.build(), target, source=source, tokenizer_source=tokenizer, family=ecfg.family,
                       dtype=DTYPES[ecfg.dtype] if ecfg.dtype else None,
                       max_shard_bytes=int(ecfg.max_shard_gb * 2**30), overwrite=ecfg.overwrite)
    print(f"{result.folder}: {len(result.weight_files)} safetensors file(s), config.json"
          + (f", tokenizer files {result.tokenizer_files}" if result.tokenizer_files else ""))
    if not result.tokenizer_files:
        print(f"omnibal-export: tokenizer: no tokenizer files copied (tokenizer={tokenizer}); the weights are exported, "
              "set tokenizer=<folder with tokenizer.json or tokenizer.model> to add them", file=sys.stderr)
    return result


main = hydra_app("export", "omnibal-export", export)

if __name__ == "__main__":
    main()
