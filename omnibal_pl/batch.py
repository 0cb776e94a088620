"""The packed micro-batch: the one data structure between the data pipeline and the model.

One balanced *group* of samples becomes one :class:`PackedBatch`. Its shapes are fixed by the group
caps so pipeline stages and compiled kernels see static shapes:

- ``L`` (tokens): the token cap ``Q_t`` (or a multiple of 64, or the group's own length, per the
  collate's ``pad_to`` setting);
- ``T`` (tiles): the tile cap ``Q_v``; tiles beyond the group's own are zero dummies with flag 0.

Invariants:
- ``cu_seqlens`` is int32, starts at 0, is strictly increasing and ends at ``L``; segment ``k`` is
  sample ``k`` for ``k < num_samples``; a trailing padding segment exists iff the group is shorter than ``L``.
- ``position_ids`` restart at 0 at every segment start.
- ``labels`` is -100 wherever no loss is taken (prompts, image tokens, padding).
- ``loss_weight`` is 0 where ``labels == -100`` and otherwise the sample's per-token weight
  (1, 1/n or 1/sqrt(n) for ``token``, ``sample`` and ``square`` weighting, n = the sample's
  supervised tokens); normalisation by the global sum happens in the loss, not here.
- the positions where ``input_ids == image_context_id`` hold, in order, ``tokens_per_tile``
  features of each tile with ``image_flags == 1``, in tile order.

Host facts: ``seqlens``, ``num_tiles`` and ``image_tokens`` are plain Python values describing the
tensors as built (the collate computes them on the CPU, in the loader workers). Accounting and checks in
the training hot path read them instead of the (device) tensors, so a micro-batch needs no host sync
for them. ``to()`` and ``pin_memory()`` keep them. ``skipped`` counts, by reason, the samples of the group
the loader dropped (an image that failed to decode under ``dataset.bad_samples=skip``): they are not in the
batch. ``pixel_norm``: the tiles are ``uint8`` RGB, normalised on the device by the vision embedding with
this (mean, std) (:mod:`omnibal_pl.pixels`). Replacing ``cu_seqlens``, ``image_flags`` or
``input_ids`` after construction re-derives the fact that depends on it; a tensor changed *in place*
leaves the facts stale.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from itertools import accumulate

import torch

from omnibal_pl.errors import ConfigError
from omnibal_pl.pixels import PixelNorm

IGNORE_INDEX = -100  # label of a position that takes no loss (prompts, image tokens, padding)
_HOST_FACT_OF = {"cu_seqlens": "seqlens", "image_flags": "num_tiles", "input_ids": "image_tokens"}  # tensor -> fact


@dataclass
class PackedBatch:
    """Tensors of one packed micro-batch (see the module docstring for shapes and invariants)."""

    input_ids: torch.Tensor  # [1, L] int64
    labels: torch.Tensor  # [1, L] int64, -100 = no loss
    position_ids: torch.Tensor  # [1, L] int64, restart per sample
    cu_seqlens: torch.Tensor  # [S + 1] int32, S segments (samples, then padding if any)
    max_seqlen: int  # longest segment, tokens
    pixel_values: torch.Tensor  # [T, 3, H, W] float, or uint8 RGB with pixel_norm; T = tile cap
    image_flags: torch.Tensor  # [T] int64, 1 = real tile whose features enter the sequence
    loss_weight: torch.Tensor  # [1, L] float32
    sample_ids: torch.Tensor  # [num_samples] int64, dataset indices in packing order
    num_samples: int
    seqlens: tuple[int, ...] | None = None  # [S] segment lengths, tokens (= diff(cu_seqlens)); None: derived
    num_tiles: int | None = None  # tiles with image_flags == 1; None: derived
    image_tokens: int | None = None  # positions holding the image-context id, counted by the collate; None: unknown
    skipped: dict[str, int] = field(default_factory=dict)  # samples of the group dropped by the loader, by reason
    pixel_norm: PixelNorm | None = None  # (mean, std) the model normalises uint8 pixel_values with; None: float pixels

    def __post_init__(self) -> None:
        """Derive the host facts not given from the tensors (one read each; construct on the CPU, or pass them).

        Facts that contradict the tensors' shapes are stale (``dataclasses.replace`` with new tensors passes the
        old facts) and are derived again; ``image_tokens``, which needs the image-context id, then becomes unknown.
        """
        if self.seqlens is None or not self._seqlens_fit():
            self.seqlens, self.image_tokens = tuple(torch.diff(self.cu_seqlens).tolist()), None
        if self.num_tiles is None or self.num_tiles > self.image_flags.shape[0]:
            self.num_tiles = int((self.image_flags == 1).sum())
        object.__setattr__(self, "_built", True)

    def _seqlens_fit(self) -> bool:
        """Whether ``seqlens`` fits the shapes: one length per segment of ``cu_seqlens``, summing to ``L``."""
        return len(self.seqlens) + 1 == self.cu_seqlens.shape[0] and sum(self.seqlens) == self.input_ids.shape[-1]

    def __setattr__(self, name: str, value: object) -> None:
        """Replacing a tensor after construction drops the host fact derived from it and re-derives it."""
        object.__setattr__(self, name, value)
        fact = _HOST_FACT_OF.get(name)
        if fact is not None and self.__dict__.get("_built"):
            object.__setattr__(self, fact, None)
            self.__post_init__()

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "PackedBatch":
        """A copy of the same class with ``fn`` applied to every tensor field; the host fields (ints, tuples,
        None) are kept."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: fn(v) for k, v in values.items() if isinstance(v, torch.Tensor)})

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor field, in field order."""
        return [v for v in (getattr(self, f.name) for f in fields(self)) if isinstance(v, torch.Tensor)]

    @property
    def nbytes(self) -> int:
        """Bytes of all its tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        """A copy with every tensor on ``device``. ``non_blocking=True`` makes host-to-device copies from
        pinned memory (:meth:`pin_memory`) asynchronous on the current stream; leave it False for
        device-to-host copies that the host reads right after."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedBatch":
        """A copy with every tensor in page-locked host memory (needs an accelerator). DataLoader's
        ``pin_memory=True`` calls this on each batch, also inside a list of micro-batches."""
        return self._map_tensors(lambda t: t.pin_memory())

    @property
    def num_tokens(self) -> int:
        """Tokens of real samples (padding excluded), from the host ``seqlens``."""
        return sum(self.sample_seqlens)

    @property
    def sample_seqlens(self) -> tuple[int, ...]:
        """Lengths of the real samples, tokens (the padding segment excluded), from the host ``seqlens``."""
        return self.seqlens[: self.num_samples]

    @property
    def bounds(self) -> tuple[int, ...]:
        """Host copy of ``cu_seqlens``: the S + 1 segment offsets, tokens, starting at 0."""
        return (0, *accumulate(self.seqlens))


@dataclass(frozen=True)
class MicroBatchShape:
    """The fixed shape of every micro-batch of a run, as the data balance pads it: ``vit_cap`` tiles
    through the vision encoder (Q_v), ``token_cap`` tokens through the LLM (Q_t). The planner models
    the tokens as ``samples`` equal-length packed samples (the attention s^2 terms depend on how the
    tokens split into samples); see :meth:`sample_tiles`.
    """

    vit_cap: int
    token_cap: int
    samples: int = 4

    def __post_init__(self) -> None:
        if self.vit_cap < 1 or self.samples < 1 or self.token_cap < self.samples:
            raise ConfigError(f"micro-batch shape vit_cap={self.vit_cap}, token_cap={self.token_cap}, "
                              f"samples={self.samples}: need vit_cap >= 1, samples >= 1 and token_cap >= samples")

    @property
    def seqlens(self) -> list[int]:
        """Packed sample lengths in tokens (they differ by at most one and sum to ``token_cap``)."""
        q, r = divmod(self.token_cap, self.samples)
        return [q + (k < r) for k in range(self.samples)]

    def sample_tiles(self, tokens_per_tile: int) -> list[int]:
        """Real tiles of each sample: its share of ``vit_cap``, at most as many as fit in its length beside
        one text token (the rest of the tiles are padding tiles)."""
        q, r = divmod(self.vit_cap, self.samples)
        return [min(q + (k < r), (n - 1) // tokens_per_tile) for k, n in enumerate(self.seqlens)]

    def image_tokens(self, tokens_per_tile: int) -> list[int]:
        """Image tokens of each sample in the LLM sequence."""
        return [t * tokens_per_tile for t in self.sample_tiles(tokens_per_tile)]

    def as_dict(self) -> dict[str, int]:
        return {"vit_cap": self.vit_cap, "token_cap": self.token_cap, "samples": self.samples}
