"""The trained model of an ``omnibal-train`` checkpoint, gathered whole into one process (CPU, no process group).

Two checkpoint kinds, by what ``path`` is:

- a file: Lightning's ``.ckpt`` of a data-parallel run (``state_dict`` keys ``model.<name>``);
- a folder: the distributed checkpoint of a pipeline run (:mod:`omnibal_pl.parallel.dcp`), of any pipeline
  layout and ZeRO level: its keys name the model's own parameters, and DCP reassembles sharded tensors
  into their full shapes when read into plain tensors.

Either way the model config, ``init_from`` and the seed come from the checkpoint's ``hyper_parameters`` (what
:class:`~omnibal_pl.train.module.VLMTrainingModule` saved), so no ``model=`` is needed to read it.

LoRA runs (``model/adapter=lora``): a data-parallel checkpoint holds only the trained parameters; the frozen
ones are rebuilt as the run built them (the seed, then ``init_from``'s weights). :meth:`TrainedModel.build`
returns the adapted model with its adapters folded into the base weights (:func:`~omnibal_pl.model.lora.merge_lora`),
a plain model under the base names, which is what an export writes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from omnibal_pl.errors import ConfigError
from omnibal_pl.model import VLM, VLMConfig
from omnibal_pl.model.lora import merge_lora, trainable_state_dict
from omnibal_pl.parallel.dcp import META_FILE, MODEL_KEY, load_meta
from omnibal_pl.train.module import VLMTrainingModule

_PREFIX = "model."  # the LightningModule holds the VLM as ``self.model``


@dataclass
class TrainedModel:
    """A checkpoint's model: its config, its state (``VLM.state_dict()`` names, on CPU; a LoRA run's
    data-parallel checkpoint holds only the trained parameters), the Hugging Face folder the run was
    initialised from (None: trained from a seeded initialisation) and the run's model seed."""

    cfg: VLMConfig
    state: dict[str, torch.Tensor]
    init_from: str | None
    seed: int = 0

    def build(self) -> VLM:
        """The trained :class:`VLM` in eval mode, adapters merged (see the module docstring)."""
        if self.cfg.adapter.enabled:
            return merge_lora(self._adapted()).eval()
        with torch.device("meta"):
            model = VLM(self.cfg)
        model.load_state_dict(self.state, strict=True, assign=True)
        if self.cfg.llm.tie_embeddings:
            model.llm.head.out.weight = model.llm.embed.tok.weight
        return model.eval()

    def _adapted(self) -> VLM:
        """The LoRA model: the frozen weights as the run built them, the checkpoint's over them (all the trained ones
        must be there)."""
        model = VLMTrainingModule(self.cfg, seed=self.seed, init_from=self.init_from).model  # built as the run did
        missing = sorted(set(trainable_state_dict(model)) - set(self.state))
        if missing:
            raise ConfigError(f"checkpoint: lacks trained parameters {missing[:6]}; it was saved with another "
                              "model.adapter config")
        model.load_state_dict(self.state, strict=False)
        return model


def read_trained_model(path: str | Path) -> TrainedModel:
    """The model of a Lightning ``.ckpt`` file or a distributed checkpoint folder (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        meta = load_meta(path / META_FILE) if (path / META_FILE).is_file() else None
        if meta is None or not (path / ".metadata").is_file():
            raise ConfigError(f"checkpoint={path}: a folder, but not a distributed checkpoint of omnibal-train "
                              f"(.metadata and {META_FILE}); give a Lightning .ckpt file or a pipeline run's checkpoint folder")
        state = _read_dcp_model(path)
    elif path.is_file():
        meta = load_meta(path)
        if "state_dict" not in meta:
            raise ConfigError(f"checkpoint={path}: no state_dict; not a Lightning checkpoint")
        state = {k[len(_PREFIX):]: v for k, v in meta["state_dict"].items() if k.startswith(_PREFIX)}
    else:
        raise ConfigError(f"checkpoint={path}: no such file or folder")
    hyper = meta.get("hyper_parameters") or {}
    if "model" not in hyper:
        raise ConfigError(f"checkpoint={path}: its hyper_parameters hold no model config; it was not written by omnibal-train")
    return TrainedModel(VLMConfig.from_dict(hyper["model"]), state, hyper.get("init_from"), int(hyper.get("seed", 0)))


def _read_dcp_model(path: Path) -> dict[str, torch.Tensor]:
    """Every ``state_dict.model.<name>`` tensor of a distributed checkpoint, at its full shape."""
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    head = f"{MODEL_KEY}.{_PREFIX}"
    model = {key[len(MODEL_KEY) + 1:]: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
             for key, meta in stored.items() if key.startswith(head) and isinstance(meta, TensorStorageMetadata)}
    dcp.load({MODEL_KEY: model}, checkpoint_id=path, no_dist=True)
    return {k[len(_PREFIX):]: v for k, v in model.items()}
