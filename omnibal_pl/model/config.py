"""Configuration dataclasses of the vision-language model.

A :class:`VLMConfig` is built from a plain mapping (a ``conf/model/*.yaml`` file or a Hydra node) with
:meth:`VLMConfig.from_dict`, or directly from the dataclasses. Every field is checked in
``__post_init__``; a bad value raises :class:`~omnibal_pl.errors.ConfigError` naming the field.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Mapping

from omnibal_pl.errors import ConfigError
from omnibal_pl.model.sparsify.config import SparsifyConfig

NORM_TYPES = ("layernorm", "rmsnorm")
VISION_ACTIVATIONS = ("gelu", "quick_gelu", "swiglu")
VISION_FAMILIES = ("vit", "qwen2_vl", "qwen2_5_vl")
PROJECTOR_KINDS = ("pixel_shuffle_mlp", "mlp2x_gelu", "patch_merger")
ATTENTION_BACKENDS = ("auto", "flash", "flex", "sdpa")
TRANSFORMER_BLOCK_PREFIXES = ("vision.blocks.", "llm.layers.")  # blocks that can recompute their attention only


def _require(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"model config: {where}: {message}")


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """``cls(**data)`` with a clear error for unknown or missing keys."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"model config: {where} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    _require(not unknown, where, f"unknown keys {unknown}; valid keys are {sorted(names)}")
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [n for n in required if n not in data]
    _require(not missing, where, f"missing required keys {missing}")
    return cls(**data)


@dataclass
class VisionConfig:
    """A ViT in the InternViT / CLIP-ViT family; every tile is one independent image.

    Fields:
        image_size: tile side, pixels (448 for InternViT-448px, 336 for CLIP ViT-L/14-336).
        patch_size: patch side, pixels; ``image_size`` must be a multiple of it.
        width: hidden size, channels.
        depth: transformer blocks in the published encoder (the checkpoint's count).
        heads: attention heads; ``width`` must be divisible by it.
        mlp_dim: hidden size of the block MLP, channels (4 x width for both families).
        norm: ``layernorm`` (InternViT-300M, CLIP) or ``rmsnorm`` (InternViT-6B).
        norm_eps: epsilon of every norm in the encoder (1e-6 InternViT, 1e-5 CLIP).
        act: MLP activation, ``gelu`` (InternViT) or ``quick_gelu`` (CLIP).
        qkv_bias: bias on the fused q/k/v projection.
        qk_norm: normalise q and k over the full width before splitting heads (InternViT-6B).
        layerscale: per-channel learned scales on both residual branches (InternViT).
        class_token: a learned CLS token is prepended; the projector drops it.
        patch_bias: bias on the patch-embedding convolution (InternViT yes, CLIP no).
        embed_norm: a norm right after the embeddings (CLIP's ``pre_layrnorm``).
        select_layer: which block's output feeds the projector, Python-index style over the
            ``depth`` block outputs: -1 = last (InternVL), -2 = penultimate (LLaVA). Blocks after it
            are not built, so no parameter goes unused.
        family: ``vit`` (fixed-size tiles, above) or ``qwen2_vl`` / ``qwen2_5_vl`` (Qwen's dynamic-resolution
            encoder, :mod:`omnibal_pl.model.qwen_vision`: every image is its own grid of patches with 2-D
            rotary positions; a "tile" is one ``spatial_merge`` x ``spatial_merge`` block of patches, so
            ``image_size`` = ``patch_size * spatial_merge`` and ``act`` ``swiglu`` is Qwen2.5's gated MLP).
        temporal_patch_size: frames per patch (Qwen: 2; a still image is repeated).
        spatial_merge: patches per side merged into one LLM token (Qwen: 2).
        window_size: window side in pixels of the windowed-attention blocks (Qwen2.5: 112); 0 = every block
            attends over the whole image.
        full_attention_blocks: blocks that attend over the whole image when ``window_size`` > 0.
        rope_theta: base of the vision encoder's 2-D rotary positions (Qwen: 10000).
    """

    image_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_dim: int
    norm: str = "layernorm"
    norm_eps: float = 1e-6
    act: str = "gelu"
    qkv_bias: bool = True
    qk_norm: bool = False
    layerscale: bool = True
    class_token: bool = True
    patch_bias: bool = True
    embed_norm: bool = False
    select_layer: int = -1
    family: str = "vit"
    temporal_patch_size: int = 2
    spatial_merge: int = 2
    window_size: int = 0
    full_attention_blocks: list[int] = field(default_factory=list)
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "width", "depth", "heads", "mlp_dim"):
            _require(int(getattr(self, name)) > 0, f"vision.{name}", f"must be > 0, got {getattr(self, name)}")
        _require(self.image_size % self.patch_size == 0, "vision.image_size",
                 f"{self.image_size} px is not a multiple of patch_size {self.patch_size}")
        _require(self.width % self.heads == 0, "vision.width", f"{self.width} not divisible by heads {self.heads}")
        _require(self.norm in NORM_TYPES, "vision.norm", f"{self.norm!r} is not one of {NORM_TYPES}")
        _require(self.act in VISION_ACTIVATIONS, "vision.act", f"{self.act!r} is not one of {VISION_ACTIVATIONS}")
        _require(-self.depth <= self.select_layer < self.depth, "vision.select_layer",
                 f"{self.select_layer} is outside [-{self.depth}, {self.depth - 1}]")
        _require(self.num_blocks > 0, "vision.select_layer", "selects no block output")
        _require(self.family in VISION_FAMILIES, "vision.family", f"{self.family!r} is not one of {VISION_FAMILIES}")
        if self.family != "vit":
            _require(self.image_size == self.patch_size * self.spatial_merge, "vision.image_size",
                     f"a Qwen tile is one merge block: patch_size x spatial_merge = "
                     f"{self.patch_size * self.spatial_merge}, got {self.image_size}")
            _require(not self.class_token and not self.layerscale, "vision.class_token",
                     "Qwen's encoder has neither a class token nor layer scales")
            _require(self.window_size % (self.patch_size * self.spatial_merge) == 0, "vision.window_size",
                     f"{self.window_size} px is not a multiple of a merge block ({self.patch_size * self.spatial_merge} px)")
            _require(all(0 <= b < self.depth for b in self.full_attention_blocks), "vision.full_attention_blocks",
                     f"{self.full_attention_blocks} are not all blocks of a {self.depth}-block encoder")
        _require(self.act != "swiglu" or self.family != "vit", "vision.act", "swiglu is Qwen2.5's MLP (family qwen2_5_vl)")

    @property
    def grid(self) -> int:
        """Patches per tile side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens per tile (class token excluded)."""
        return self.grid**2

    @property
    def seq_len(self) -> int:
        """Tokens per tile inside the encoder (class token included)."""
        return self.num_patches + int(self.class_token)

    @property
    def num_blocks(self) -> int:
        """Blocks actually built and run: up to and including ``select_layer``."""
        return self.select_layer + 1 if self.select_layer >= 0 else self.depth + 1 + self.select_layer


@dataclass
class ProjectorConfig:
    """Vision-to-language projector.

    Fields:
        kind: ``pixel_shuffle_mlp`` (InternVL: pixel shuffle merges each 2x2 patch block into one
            token with 4x channels, then LayerNorm + Linear + GELU + Linear) or ``mlp2x_gelu``
            (LLaVA-1.5: Linear + GELU + Linear on every patch token).
        downsample_ratio: pixel-shuffle scale (0.5 = 4x fewer tokens); only for ``pixel_shuffle_mlp``.
        norm_eps: epsilon of the LayerNorm of ``pixel_shuffle_mlp``.
    """

    kind: str = "pixel_shuffle_mlp"
    downsample_ratio: float = 0.5
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _require(self.kind in PROJECTOR_KINDS, "projector.kind", f"{self.kind!r} is not one of {PROJECTOR_KINDS}")
        _require(self.downsample_ratio == 0.5 or self.kind != "pixel_shuffle_mlp", "projector.downsample_ratio",
                 f"only 0.5 is supported (InternVL's pixel shuffle), got {self.downsample_ratio}")

    @property
    def merge(self) -> int:
        """Patch tokens merged into one LLM token (4 for pixel shuffle 0.5, else 1)."""
        return 4 if self.kind in ("pixel_shuffle_mlp", "patch_merger") else 1


@dataclass
class LLMConfig:
    """A decoder in the Llama / InternLM2 / Qwen2 family (RMSNorm, RoPE, GQA, SwiGLU).

    Fields:
        vocab_size: embedding rows (tokenizer vocabulary incl. added special tokens).
        hidden: hidden size, channels.
        layers: decoder layers.
        heads: query heads; ``hidden`` must be divisible by it (head_dim = hidden / heads).
        kv_heads: key/value heads (GQA); ``heads`` must be divisible by it.
        intermediate: SwiGLU hidden size, channels.
        rope_theta: RoPE base (1e6 InternLM2, 1e4 Llama-2 / Vicuna).
        rms_eps: RMSNorm epsilon.
        tie_embeddings: the output head shares the input embedding matrix.
        qkv_bias: bias on the q/k/v projections (Qwen2).
        mrope_section: multimodal rotary positions (Qwen2-VL's M-RoPE): how many of the ``head_dim / 2``
            rotary frequencies follow the temporal, height and width position (e.g. [16, 24, 24]); empty =
            ordinary 1-D RoPE. Needs ``position_ids`` [3, L].
    """

    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    mrope_section: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden", "layers", "heads", "kv_heads", "intermediate"):
            _require(int(getattr(self, name)) > 0, f"llm.{name}", f"must be > 0, got {getattr(self, name)}")
        _require(self.hidden % self.heads == 0, "llm.hidden", f"{self.hidden} not divisible by heads {self.heads}")
        _require(self.heads % self.kv_heads == 0, "llm.kv_heads",
                 f"heads {self.heads} not divisible by kv_heads {self.kv_heads}")
        _require((self.hidden // self.heads) % 2 == 0, "llm.heads", "head_dim must be even for RoPE")
        _require(not self.mrope_section or (len(self.mrope_section) == 3 and sum(self.mrope_section) == self.head_dim // 2),
                 "llm.mrope_section", f"{self.mrope_section} must be 3 sections summing to head_dim / 2 = {self.head_dim // 2}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


ADAPTER_KINDS = ("none", "lora")


@dataclass
class AdapterConfig:
    """Parameter-efficient fine-tuning (the ``model/adapter`` config group): ``none`` trains the model as
    ``optim`` says, ``lora`` freezes every parameter and adds a trainable low-rank update
    ``(alpha / r) * B A`` to each targeted linear layer (:mod:`omnibal_pl.model.lora`).

    Fields:
        kind: ``none`` or ``lora``.
        r: rank of the update (rows of A, columns of B).
        alpha: scale numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout probability on the update's input (training only).
        targets: ``fnmatch`` patterns over the full names of ``nn.Linear`` modules that get an adapter
            (``llm.layers.*.attn.*`` = q, k, v, o of every decoder layer; add ``vision.blocks.*.attn.qkv``
            to adapt the vision encoder). Every pattern must match at least one linear layer.
        trainable: ``fnmatch`` patterns over parameter names trained in full beside the adapters
            (``projector.*``); everything else stays frozen.
    """

    kind: str = "none"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["llm.layers.*.attn.*", "llm.layers.*.mlp.*"])
    trainable: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(self.kind in ADAPTER_KINDS, "adapter.kind", f"{self.kind!r} is not one of {ADAPTER_KINDS}")
        _require(int(self.r) > 0, "adapter.r", f"must be > 0, got {self.r}")
        _require(self.alpha > 0, "adapter.alpha", f"must be > 0, got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, "adapter.dropout", f"must be in [0, 1), got {self.dropout}")
        _require(self.kind == "none" or len(self.targets) > 0, "adapter.targets",
                 "lora needs at least one target pattern (e.g. 'llm.layers.*.attn.*')")

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @property
    def scale(self) -> float:
        """Multiplier of the low-rank update, ``alpha / r``."""
        return self.alpha / self.r


@dataclass
class VLMConfig:
    """The whole model: vision encoder -> projector -> LLM.

    Fields:
        name: the config's name (``conf/model/<name>.yaml``).
        vision, projector, llm: the three parts.
        image_context_id: token id whose positions in ``input_ids`` receive image features,
            ``tokens_per_tile`` per real tile (``<IMG_CONTEXT>`` = 92546 for InternLM2-based InternVL,
            ``<image>`` = 32000 for llava-hf LLaVA-1.5).
        attention_backend: varlen attention of the LLM: ``auto`` (the first that runs here of flash-attn,
            torch's varlen kernel, compiled flex, SDPA per segment), ``flash``, ``flex`` or ``sdpa``
            (see :mod:`omnibal_pl.model.attention`).
        sparsify: Dynamic-LLaVA token sparsification (off by default; see :mod:`omnibal_pl.model.sparsify`).
        adapter: LoRA fine-tuning (off by default; see :class:`AdapterConfig`).
    """

    name: str
    vision: VisionConfig
    llm: LLMConfig
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    image_context_id: int = 0
    attention_backend: str = "auto"
    sparsify: SparsifyConfig = field(default_factory=SparsifyConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)

    def __post_init__(self) -> None:
        _require(self.attention_backend in ATTENTION_BACKENDS, "attention_backend",
                 f"{self.attention_backend!r} is not one of {ATTENTION_BACKENDS}")
        _require(not self.sparsify.enabled or self.sparsify.sparse_layer < self.llm.layers, "sparsify.sparse_layer",
                 f"{self.sparsify.sparse_layer} is not a layer of the {self.llm.layers}-layer LLM")
        _require(0 <= self.image_context_id < self.llm.vocab_size, "image_context_id",
                 f"{self.image_context_id} is outside the vocabulary [0, {self.llm.vocab_size})")
        _require((self.projector.kind == "patch_merger") == (self.vision.family != "vit"), "projector.kind",
                 f"{self.projector.kind!r} does not fit vision.family {self.vision.family!r}: Qwen's encoders take "
                 "patch_merger, InternViT/CLIP pixel_shuffle_mlp or mlp2x_gelu")
        if self.projector.kind == "pixel_shuffle_mlp":
            _require(self.vision.grid % 2 == 0, "vision.image_size",
                     f"pixel shuffle needs an even patch grid, got {self.vision.grid} x {self.vision.grid}")

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens of one tile after the projector (256 for InternVL 448 px, 576 for LLaVA-1.5)."""
        return self.vision.num_patches // self.projector.merge

    def block_names(self) -> list[str]:
        """Names of the whole model's blocks in execution order: what ``VLM(cfg).blocks()`` yields, known
        without building the model (a pipeline stage is a contiguous run of these)."""
        return ["vision.embed", *(f"vision.blocks.{i}" for i in range(self.vision.num_blocks)), "projector",
                "llm.embed", *(f"llm.layers.{i}" for i in range(self.llm.layers)), "llm.head"]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VLMConfig":
        """Build from a plain nested mapping (e.g. a loaded ``conf/model/*.yaml``)."""
        data = dict(data)
        for key, sub in (("vision", VisionConfig), ("llm", LLMConfig), ("projector", ProjectorConfig),
                         ("sparsify", SparsifyConfig), ("adapter", AdapterConfig)):
            if key in data and not isinstance(data[key], sub):
                data[key] = _build(sub, data[key], key)
        return _build(cls, data, "model")

    def to_dict(self) -> dict[str, Any]:
        """The plain nested mapping that :meth:`from_dict` reads back."""
        return asdict(self)
