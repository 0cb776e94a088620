"""The predictors under the parameter names of the original Dynamic-LLaVA checkpoints (Osilly/dynamic_llava).

There the predictors hang off the LLaMA model: ``model.image_score_predictor`` (``down_mlp``, ``transformer.<i>``
with ``attn.qkv`` (no bias), ``attn.proj``, ``norm1``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``, then ``output_mlp``),
``model.output_text_score_predictor`` and ``model.instruct_score_predictor`` (``output_mlp``). Ours live on
decoder layer ``sparse_layer`` (``llm.layers.<k>.sparsifier.{vision,output_text,instruct_text}``) with the
same tensors one to one: :func:`original_predictor_state_dict` exports, :func:`load_original_predictors`
loads.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from omnibal_pl.errors import ConfigError

# our predictor attribute -> the original's module
ORIGINAL_PREDICTORS = {
    "vision": "model.image_score_predictor",
    "output_text": "model.output_text_score_predictor",
    "instruct_text": "model.instruct_score_predictor",
}
# inside a predictor: our module path -> the original's (the layouts differ only in names)
_VISION_BLOCK = {"norm1": "norm1", "qkv": "attn.qkv", "proj": "attn.proj", "norm2": "norm2", "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}
_VISION = {"embed.0": "down_mlp.0", "embed.1": "down_mlp.1", "out.0": "output_mlp.0", "out.2": "output_mlp.2",
           "out.4": "output_mlp.4"}
_TEXT = {f"net.{k}": f"output_mlp.{k}" for k in (0, 1, 3, 5, 7)}


def _inner_name(kind: str, name: str) -> str:
    """The original's name, inside its predictor, of our parameter ``name`` of predictor ``kind``."""
    module, leaf = name.rsplit(".", 1)
    if kind == "vision" and module.startswith("blocks."):
        _, index, rest = module.split(".", 2)
        return f"transformer.{index}.{_VISION_BLOCK[rest]}.{leaf}"
    return f"{(_VISION if kind == 'vision' else _TEXT)[module]}.{leaf}"


def _original_names(model: nn.Module) -> dict[str, str]:
    """The original's name -> our full parameter name, for every predictor parameter of ``model``."""
    names = {}
    for full, _ in model.named_parameters():
        if ".sparsifier." not in full:
            continue
        kind, name = full.split(".sparsifier.", 1)[1].split(".", 1)
        names[f"{ORIGINAL_PREDICTORS[kind]}.{_inner_name(kind, name)}"] = full
    if not names:
        raise ConfigError("the model has no Dynamic-LLaVA predictors; enable model.sparsify first")
    return names


def is_original_predictor_key(key: str) -> bool:
    """Whether a checkpoint key names a parameter of an original Dynamic-LLaVA predictor."""
    return key.startswith(tuple(f"{prefix}." for prefix in ORIGINAL_PREDICTORS.values()))


def original_predictor_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The predictors' parameters of ``model`` under the original checkpoint names (detached)."""
    params = dict(model.named_parameters())
    return {theirs: params[ours].detach() for theirs, ours in _original_names(model).items()}


def original_to_ours(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The predictor tensors of an original Dynamic-LLaVA state dict under ``model``'s parameter names.

    Keys of ``state`` that are not predictor keys (the LLM, the projector) are ignored; every predictor
    parameter of ``model`` must be found with its shape and no other predictor key may be present, or
    :class:`ConfigError` lists the keys (e.g. an instruction predictor the model lacks: set
    ``instruct_text_predictor``).
    """
    names = _original_names(model)
    given = {k for k in state if is_original_predictor_key(k)}
    missing, unexpected = sorted(set(names) - given), sorted(given - set(names))
    if missing or unexpected:
        raise ConfigError(f"original Dynamic-LLaVA predictors: missing {missing[:10]} ({len(missing)}), unexpected "
                          f"{unexpected[:10]} ({len(unexpected)}); match model.sparsify (predictors, predictor_blocks)")
    params = dict(model.named_parameters())
    for theirs, ours in names.items():
        if tuple(state[theirs].shape) != tuple(params[ours].shape):
            raise ConfigError(f"original Dynamic-LLaVA predictors: {theirs} has shape {tuple(state[theirs].shape)}, "
                              f"{ours} wants {tuple(params[ours].shape)}; match predictor_dim / predictor_mlp_dim")
    return {ours: state[theirs].to(params[ours].dtype) for theirs, ours in names.items()}


def load_original_predictors(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load the predictors of ``model`` from an original Dynamic-LLaVA state dict (:func:`original_to_ours`)."""
    model.load_state_dict(original_to_ours(model, state), strict=False)
