"""Dynamic-LLaVA context sparsification (arXiv 2412.00876): learned vision / text token predictors.

Mechanism (as published, extended to packed sequences):

- A :class:`Sparsifier` runs once on the hidden states entering LLM layer ``sparse_layer`` and decides,
  per token, keep (1) or drop (0) for three token kinds of every packed sample (:func:`find_spans`):
  its image tokens (vision predictor), its last assistant answer (output-text predictor) and, when
  enabled, the instruction before that answer (instruction-text predictor). Other tokens are always kept.
- Training removes nothing. Decisions are hard Gumbel-softmax samples with straight-through gradients
  (:func:`gumbel_keep`, temperature from :func:`gumbel_tau`); in layers >= ``sparse_layer`` the
  attention weights are multiplied by the keys' keep mask inside the softmax, each token always seeing
  itself (:func:`masked_varlen_attention`), so the predictors get gradient from the LM loss.
- Loss: LM loss + :func:`keep_rate_loss`.
- Inference (eval mode): the top ``int(n * keep_rate)`` image (and instruction) tokens of a sample by
  score are kept, answer tokens by argmax; :mod:`omnibal_pl.model.generate` removes the dropped tokens.

How the keep mask crosses blocks (and pipeline stages): only one tensor passes between blocks, so from
layer ``sparse_layer`` on the hidden state carries the mask as one extra channel: ``llm.layers.<i>``
with ``i >= sparse_layer`` outputs ``[1, L, hidden + 1]`` (last channel = keep mask, 0/1 values with
straight-through gradients) and ``llm.head`` outputs ``[1, L, vocab + 1]`` (logits, then the mask); use
:func:`split_output`. A pipeline cut may therefore fall anywhere: the mask and its gradient travel with
the activation (:func:`boundary_width` gives the stage-boundary width). The cost is one extra channel
per boundary and one concatenation per masked layer.

Modules: :mod:`.config` (:class:`SparsifyConfig`, no torch), :mod:`.spans` (which tokens may be dropped),
:mod:`.predictors` (predictors, Gumbel / top-k decisions, :class:`Sparsifier`), :mod:`.masked_attention`,
:mod:`.cost` (analytic FLOPs and memory), :mod:`.loss` (keep-rate loss), :mod:`.channel` (the mask channel),
:mod:`.original_names` (the original checkpoints' predictor names).
The training-loop callback that anneals the temperature is
:class:`omnibal_pl.train.callbacks.GumbelTemperature`.
"""
from omnibal_pl.model.sparsify.channel import boundary_width, split_output
from omegaconf import OmegaConf

from omnibal_pl.model.sparsify.config import PUBLISHED_SPARSE_LAYER, SparsifyConfig, sparse_layer_for
from omnibal_pl.model.sparsify.cost import MaskedAttentionCost, masked_attention_cost, predictor_flops
from omnibal_pl.model.sparsify.loss import KeepRateLoss, keep_rate_loss
from omnibal_pl.model.sparsify.masked_attention import masked_varlen_attention
from omnibal_pl.model.sparsify.original_names import (
    is_original_predictor_key, load_original_predictors, original_predictor_state_dict, original_to_ours,
)
from omnibal_pl.model.sparsify.predictors import (
    DROP, KEEP, Sparsifier, TextPredictor, VisionPredictor, gumbel_keep, gumbel_tau, set_temperature, sparsified_spans,
    topk_keep,
)
from omnibal_pl.model.sparsify.spans import Spans, find_spans

# conf/model/sparsify/*.yaml read their sparse_layer through this resolver; registered on import, as every
# entry point that resolves a config (omnibal-train, omnibal-plan, omnibal-eval, parse_run_config) imports this
if not OmegaConf.has_resolver("omnibal.sparse_layer"):
    OmegaConf.register_new_resolver("omnibal.sparse_layer", sparse_layer_for)

__all__ = [
    "DROP",
    "KEEP",
    "KeepRateLoss",
    "MaskedAttentionCost",
    "PUBLISHED_SPARSE_LAYER",
    "Sparsifier",
    "SparsifyConfig",
    "Spans",
    "TextPredictor",
    "VisionPredictor",
    "boundary_width",
    "find_spans",
    "gumbel_keep",
    "gumbel_tau",
    "is_original_predictor_key",
    "keep_rate_loss",
    "load_original_predictors",
    "masked_attention_cost",
    "masked_varlen_attention",
    "original_predictor_state_dict",
    "original_to_ours",
    "predictor_flops",
    "set_temperature",
    "sparse_layer_for",
    "sparsified_spans",
    "split_output",
    "topk_keep",
]
