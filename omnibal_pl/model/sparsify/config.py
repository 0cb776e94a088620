"""The configuration of Dynamic-LLaVA sparsification: :class:`SparsifyConfig`.

Imports no torch (stdlib and :mod:`omnibal_pl.errors` only), so model and run configs can be built
and checked without loading the tensor stack.
"""
from __future__ import annotations

from dataclasses import dataclass

from omnibal_pl.errors import ConfigError

PUBLISHED_SPARSE_LAYER = 2  # Dynamic-LLaVA's cut in the 32-layer LLaMA of LLaVA-1.5


def sparse_layer_for(llm_layers: int | None) -> int:
    """The layer the ``model/sparsify`` options cut at: the published layer 2, or the last layer of an LLM
    with fewer than 3 layers (the 2-layer tiny model: 1), so the options compose with every model; the
    published layer when the depth is unknown (None). The config resolver ``omnibal.sparse_layer``."""
    if llm_layers is None:
        return PUBLISHED_SPARSE_LAYER
    return max(0, min(PUBLISHED_SPARSE_LAYER, int(llm_layers) - 1))


@dataclass
class SparsifyConfig:
    """Every knob of Dynamic-LLaVA sparsification (published defaults; ``enabled`` off by default).

    Fields:
        enabled: install the predictors and the masked attention path.
        sparse_layer: LLM layer whose *input* hidden states the predictors read; layers >= it are masked.
        vision_predictor / output_text_predictor / instruct_text_predictor: which predictors exist.
        vision_keep_rate: target kept fraction of a sample's image tokens (0.2: 576 -> 115).
        output_text_keep_rate: target kept fraction of the last answer's tokens.
        instruct_text_keep_rate: target kept fraction of the last instruction's tokens.
        output_text_len_for_training: answers shorter than this (tokens) are not sparsified in training.
        instruct_text_len_for_training: the same for instructions.
        predictor_dim: width of the predictors' first projection (512); later MLP widths are /2, /4.
        predictor_heads: attention heads of the vision predictor's blocks.
        predictor_mlp_dim: MLP width of the vision predictor's blocks.
        predictor_blocks: transformer blocks of the vision predictor.
        tau_start / tau_end: Gumbel-softmax temperature at step 0 and at the last step.
        mask_loss_weight: weight of each keep-rate penalty.
        predictor_lr / predictor_weight_decay: optimiser settings of the predictor parameters, which get
            their own AdamW groups (:func:`omnibal_pl.train.optim.param_groups`).
    """

    enabled: bool = False
    sparse_layer: int = 2
    vision_predictor: bool = True
    output_text_predictor: bool = True
    instruct_text_predictor: bool = False
    vision_keep_rate: float = 0.2
    output_text_keep_rate: float = 0.5
    instruct_text_keep_rate: float = 0.5
    output_text_len_for_training: int = 50
    instruct_text_len_for_training: int = 50
    predictor_dim: int = 512
    predictor_heads: int = 8
    predictor_mlp_dim: int = 2048
    predictor_blocks: int = 2
    tau_start: float = 1.0
    tau_end: float = 0.1
    mask_loss_weight: float = 100.0
    predictor_lr: float = 2e-4
    predictor_weight_decay: float = 0.0

    def __post_init__(self) -> None:
        def require(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"model config: sparsify.{name}: {message}")

        require(self.sparse_layer >= 0, "sparse_layer", f"must be >= 0, got {self.sparse_layer}")
        for name in ("vision_keep_rate", "output_text_keep_rate", "instruct_text_keep_rate"):
            require(0.0 < getattr(self, name) <= 1.0, name, f"must be in (0, 1], got {getattr(self, name)}")
        for name in ("output_text_len_for_training", "instruct_text_len_for_training", "predictor_blocks"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("predictor_dim", "predictor_heads", "predictor_mlp_dim", "tau_start", "tau_end"):
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        require(self.predictor_dim % 8 == 0, "predictor_dim", f"must be a multiple of 8 (the MLP halves it twice), got {self.predictor_dim}")
        require(self.predictor_dim % self.predictor_heads == 0, "predictor_heads",
                f"predictor_dim {self.predictor_dim} is not divisible by {self.predictor_heads} heads")
        require(self.mask_loss_weight >= 0 and self.predictor_lr >= 0 and self.predictor_weight_decay >= 0,
                "mask_loss_weight", "mask_loss_weight, predictor_lr and predictor_weight_decay must be >= 0")
        require(not self.enabled or self.vision_predictor or self.output_text_predictor or self.instruct_text_predictor,
                "enabled", "sparsification is on but every predictor is off; enable one or set enabled: false")
