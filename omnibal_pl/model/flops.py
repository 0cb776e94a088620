"""Forward FLOPs of each block of a :class:`VLMConfig` for one packed micro-batch (2 FLOPs per multiply-add).

Attention-aware, as training cost really is: linear layers cost in proportion to tokens, attention to
the sum over packed sequences of s^2 (never the square of the sum):

- vision block, per tile of S tokens: 2 S (4 w^2 + 2 w m) linear + 4 S^2 w attention (bidirectional);
  Qwen's vision blocks attend over each image frame (full-attention blocks) or each window of it (Qwen2.5's
  windowed blocks; edge windows are smaller), so their attention is 4 w sum_segments n^2 over those segments'
  patch counts n, from the images' patch grids (:func:`vision_segments`); a micro-batch's padding blocks are
  one segment of their own, as the encoder runs them;
- LLM layer over L tokens with packed lengths s_i: 2 L (d (d + 2 kv hd) + d^2 + 3 d f) linear +
  2 sum_i s_i^2 d attention (causal: half of the 4 s^2 d of a full score matrix);
- head: 2 L d V; embeddings and norms are negligible and counted as 0.

Training (:func:`train_flops`) counts each part (vision, projector, llm, in model order) as a multiple
of its forward: 3x when trainable (forward, input gradient, weight gradient); 2x when frozen after a
trainable part (the gradient still flows through it to its inputs, but no weight gradient); 1x when
frozen with nothing trainable before it (no backward reaches it). A part whose weights are frozen but
which holds LoRA adapters (``model.adapter``) counts 2x, like a frozen part after a trainable one: the
gradient flows through all of it to reach the adapters, whose own weight gradients are negligible.
Recomputation adds forward work again and is not counted (MFU counts useful work only).
"""
from __future__ import annotations

import math
from typing import Collection, Sequence

from omnibal_pl.errors import ConfigError
from omnibal_pl.model.config import VLMConfig

Grid = tuple[int, int, int]  # (t, h, w) of an image in patches


def block_kind(name: str) -> str:
    """The kind of a block from its name in ``VLM.blocks()``."""
    if name == "vision.embed":
        return "vision_embed"
    if name.startswith("vision.blocks."):
        return "vision_block"
    if name == "projector":
        return "projector"
    if name == "llm.embed":
        return "llm_embed"
    if name.startswith("llm.layers."):
        return "llm_layer"
    if name == "llm.head":
        return "llm_head"
    raise ConfigError(f"{name!r} is not a block name of VLM.blocks()")


def window_side(cfg: VLMConfig, block: int) -> int:
    """Window side in merge blocks of Qwen vision block ``block``; 0 where it attends over whole image frames."""
    v = cfg.vision
    return v.window_size // (v.patch_size * v.spatial_merge) if v.window_size and block not in v.full_attention_blocks else 0


def vision_segments(cfg: VLMConfig, grids: Sequence[Grid], block: int, tiles: int) -> list[int]:
    """Patch counts of the attention segments of Qwen vision block ``block`` over images ``grids`` in a
    micro-batch of ``tiles`` merge blocks: one per image frame, or per window of a frame in Qwen2.5's windowed
    blocks (``window_size`` / (patch x merge) merge blocks a side; windows at the right and bottom edges are
    cut), then one for the padding blocks (``tiles`` beyond the images')."""
    v = cfg.vision
    unit = v.spatial_merge**2
    side = window_side(cfg, block)
    segments: list[int] = []
    for t, h, w in grids:
        gh, gw = h // v.spatial_merge, w // v.spatial_merge
        if side:
            rows = [min(side, gh - y) for y in range(0, gh, side)]
            cols = [min(side, gw - x) for x in range(0, gw, side)]
            segments += [r * c * unit for _ in range(t) for r in rows for c in cols]
        else:
            segments += [h * w] * t
    padding = tiles * unit - sum(segments)
    if padding < 0:
        raise ConfigError(f"images {list(grids)} hold more than the micro-batch's {tiles} merge blocks")
    return segments + ([padding] if padding else [])


def square_grids(units: Sequence[int], merge: int) -> list[Grid]:
    """Images of ``units`` merge blocks each as patch grids (for a planned micro-batch, whose images' shapes are
    not known): ``a`` x ``n // a`` blocks with ``a`` = round(sqrt(n)), the ``n % a`` left over as a strip of their
    own, so the grids hold exactly ``sum(units)`` blocks."""
    grids: list[Grid] = []
    for n in units:
        if n > 0:
            a = max(1, round(math.sqrt(n)))
            grids.append((1, a * merge, n // a * merge))
            if n % a:
                grids.append((1, merge, n % a * merge))
    return grids


def attention_forward_flops(cfg: VLMConfig, kind: str, tiles: int, seqlens: Sequence[int],
                            grids: Sequence[Grid] | None = None, block: int = 0) -> float:
    """The attention-core part (softmax(QK^T)V, the s^2 terms) of :func:`block_forward_flops`; 0 for
    blocks without attention. Qwen vision blocks need the images' ``grids`` and the ``block`` index (windowed
    or full attention); see :func:`vision_segments`."""
    if kind == "vision_block" and cfg.vision.family != "vit":
        if grids is None:
            raise ConfigError("the attention of a Qwen vision block depends on its images: pass their patch grids")
        return 4.0 * cfg.vision.width * sum(n * n for n in vision_segments(cfg, grids, block, tiles))
    if kind == "vision_block":
        return tiles * 4.0 * cfg.vision.seq_len**2 * cfg.vision.width
    if kind == "llm_layer":
        return 2.0 * cfg.llm.hidden * sum(int(x) ** 2 for x in seqlens)
    return 0.0


def block_forward_flops(cfg: VLMConfig, kind: str, tiles: int, seqlens: Sequence[int],
                        grids: Sequence[Grid] | None = None, block: int = 0) -> float:
    """Forward FLOPs of one block of ``kind`` for ``tiles`` tiles and packed LLM sequences ``seqlens``.

    ``seqlens`` are the segment lengths of the micro-batch (padding included where it is computed); ``grids``
    and ``block``: Qwen vision blocks only (:func:`attention_forward_flops`).
    """
    v, llm = cfg.vision, cfg.llm
    s = v.seq_len  # tokens per tile inside the encoder
    tokens = int(sum(seqlens))
    frames = v.temporal_patch_size if v.family != "vit" else 1  # Qwen's patches hold 2 frames
    mlp_matrices = 3 if v.act == "swiglu" else 2
    if kind == "vision_embed":
        return 2.0 * tiles * v.num_patches * 3 * frames * v.patch_size**2 * v.width
    if kind == "vision_block":
        linear = tiles * 2.0 * s * (4 * v.width**2 + mlp_matrices * v.width * v.mlp_dim)
        return linear + attention_forward_flops(cfg, kind, tiles, seqlens, grids, block)
    if kind == "projector" and cfg.projector.kind == "patch_merger":  # Qwen: Linear(4w, 4w), Linear(4w, hidden)
        width_in = v.width * cfg.projector.merge
        return 2.0 * tiles * width_in * (width_in + llm.hidden)
    if kind == "projector":
        width_in = v.width * cfg.projector.merge
        rows = tiles * cfg.tokens_per_tile
        return 2.0 * rows * (width_in * llm.hidden + llm.hidden**2)
    if kind == "llm_embed":
        return 0.0
    if kind == "llm_layer":
        d, hd = llm.hidden, llm.head_dim
        linear = 2.0 * tokens * (d * (d + 2 * llm.kv_heads * hd) + d * d + 3 * d * llm.intermediate)
        return linear + attention_forward_flops(cfg, kind, tiles, seqlens)
    if kind == "llm_head":
        return 2.0 * tokens * llm.hidden * llm.vocab_size
    raise ConfigError(f"unknown block kind {kind!r}")


PART_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("vision", ("vision_embed", "vision_block")),
    ("projector", ("projector",)),
    ("llm", ("llm_embed", "llm_layer", "llm_head")),
)  # the model's parts (``optim.freeze`` names) in forward order, with their block kinds


def block_counts(cfg: VLMConfig) -> dict[str, int]:
    """How many blocks of each kind the model has."""
    return {"vision_embed": 1, "vision_block": cfg.vision.num_blocks, "projector": 1, "llm_embed": 1,
            "llm_layer": cfg.llm.layers, "llm_head": 1}


def part_forward_flops(cfg: VLMConfig, part: str, tiles: int, seqlens: Sequence[int],
                       grids: Sequence[Grid] | None = None) -> float:
    """Forward FLOPs of one part (``vision``, ``projector`` or ``llm``) for one micro-batch (``grids``: its
    images, for Qwen's vision blocks, whose attention differs from block to block)."""
    counts = block_counts(cfg)
    kinds = dict(PART_KINDS).get(part)
    if kinds is None:
        raise ConfigError(f"{part!r} is not a model part; choose from {[name for name, _ in PART_KINDS]}")
    total = 0.0
    for kind in kinds:
        if kind == "vision_block" and cfg.vision.family != "vit":
            # blocks differ only in their window side: one count per side, times the blocks that have it
            blocks_of_side: dict[int, list[int]] = {}
            for b in range(counts[kind]):
                blocks_of_side.setdefault(window_side(cfg, b), []).append(b)
            total += sum(len(bs) * block_forward_flops(cfg, kind, tiles, seqlens, grids, bs[0])
                         for bs in blocks_of_side.values())
        else:
            total += counts[kind] * block_forward_flops(cfg, kind, tiles, seqlens)
    return total


def model_forward_flops(cfg: VLMConfig, tiles: int, seqlens: Sequence[int], grids: Sequence[Grid] | None = None) -> float:
    """Forward FLOPs of the whole model for one micro-batch."""
    return sum(part_forward_flops(cfg, part, tiles, seqlens, grids) for part, _ in PART_KINDS)


def pass_multiples(frozen: Collection[str] = (), adapted: Collection[str] = ()) -> dict[str, float]:
    """Training FLOPs of each part as a multiple of its forward FLOPs (see the module docstring):
    3 trainable, 2 frozen after a trainable part or holding adapters (``adapted``), 1 frozen with nothing
    trainable before it."""
    unknown = (set(frozen) | set(adapted)) - {part for part, _ in PART_KINDS}
    if unknown:
        raise ConfigError(f"frozen parts {sorted(unknown)} are not model parts; choose from {[p for p, _ in PART_KINDS]}")
    multiples: dict[str, float] = {}
    backward_reaches = False  # a trainable part earlier in the forward needs the gradient of its output
    for part, _ in PART_KINDS:
        if part in adapted:
            multiples[part], backward_reaches = 2.0, True
        elif part in frozen:
            multiples[part] = 2.0 if backward_reaches else 1.0
        else:
            multiples[part], backward_reaches = 3.0, True
    return multiples


def adapter_parts(cfg: VLMConfig) -> tuple[list[str], list[str]]:
    """(frozen, adapted) parts of a LoRA model: a part is adapted when a ``targets`` pattern names it, trained
    in full (neither) when a ``trainable`` pattern does, frozen otherwise. A pattern starting with a wildcard
    counts for every part."""
    def named(patterns: Sequence[str]) -> set[str]:
        heads = {p.split(".", 1)[0] for p in patterns}
        return {part for part, _ in PART_KINDS if part in heads or any(h[:1] in "*?[" for h in heads)}

    trained, adapted = named(cfg.adapter.trainable), named(cfg.adapter.targets)
    parts = [part for part, _ in PART_KINDS]
    return ([p for p in parts if p not in trained and p not in adapted], [p for p in parts if p in adapted and p not in trained])


def train_flops(cfg: VLMConfig, tiles: int, seqlens: Sequence[int], frozen: Collection[str] = (),
                grids: Sequence[Grid] | None = None) -> float:
    """Forward + backward FLOPs of one micro-batch, without recomputation (useful work, for MFU).

    ``tiles``: real tiles (flag 1; padding and dummy tiles excluded); ``seqlens``: the real samples'
    lengths (the padding segment excluded); ``frozen``: the ``optim.freeze`` parts. With LoRA
    (``cfg.adapter``) the parts come from the adapter config instead (:func:`adapter_parts`). ``grids``: the
    real images' patch grids (Qwen; required there, see :func:`attention_forward_flops`).
    """
    multiples = pass_multiples(*adapter_parts(cfg)) if cfg.adapter.enabled else pass_multiples(frozen)
    return sum(multiples[part] * part_forward_flops(cfg, part, tiles, seqlens, grids) for part, _ in PART_KINDS)
