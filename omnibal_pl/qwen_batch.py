"""The Qwen2-VL / Qwen2.5-VL micro-batch: :class:`QwenPackedBatch`, M-RoPE position ids and the patch rows.

Ground floor: the data pipeline (``data/collate.py``) builds these batches and the model
(``model/qwen_vision.py``, ``model/rope.py``) reads them, so both take the layout from here.

Layout of one micro-batch (see :mod:`omnibal_pl.model.qwen_vision` for what the encoder does with it):

- ``pixel_values`` [B * m^2, 3 * t * p * p]: the patches of every image, images in packing order, the m^2
  patches of one ``m x m`` merge block consecutive, blocks row-major; then zero padding rows up to ``B``
  merge blocks (the block cap);
- ``image_flags`` [B]: one entry per merge block (the family's "tile", one LLM token), 1 for the real blocks,
  which come first;
- ``position_ids`` [3, L]: M-RoPE (temporal, height, width) positions, restarting at 0 in every segment
  (each sample, then the padding segment, as the 1-D positions of :class:`~omnibal_pl.batch.PackedBatch`);
- ``image_grids``: the (t, h, w) patch grid of every image in packing order (host values).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from omnibal_pl.batch import PackedBatch
from omnibal_pl.errors import DataError

Grid = tuple[int, int, int]  # (t, h, w) in patches, as Qwen's image processor reports ``image_grid_thw``


@dataclass
class QwenPackedBatch(PackedBatch):
    """A :class:`PackedBatch` of the Qwen family: ``pixel_values`` [P, 3 * t * p * p] patches, ``image_flags``
    [P / m^2] per merge block, ``position_ids`` [3, L] (M-RoPE), and ``image_grids``: the (t, h, w) patch
    grid of every image in packing order (host values)."""

    image_grids: tuple[Grid, ...] = ()


def mrope_position_ids(input_ids: torch.Tensor, grids: Sequence[Grid], image_token_id: int,
                       spatial_merge: int) -> torch.Tensor:
    """M-RoPE positions [3, n] of one sample's ``input_ids`` [n], whose images (``grids``, in order) each
    occupy ``t * h * w / spatial_merge**2`` consecutive ``image_token_id`` tokens.

    Text tokens have the same position on all three axes, consecutive; an image's tokens sit at
    ``(start + frame, start + row, start + column)`` of its merge blocks, and the text after it continues
    from ``start + max(h, w) / spatial_merge``. Raises :class:`DataError` when the image tokens do not
    match the grids.
    """
    ids = input_ids.tolist()
    out: list[torch.Tensor] = []
    pos, i, images = 0, 0, iter(grids)
    while i < len(ids):
        if ids[i] != image_token_id:
            j = i
            while j < len(ids) and ids[j] != image_token_id:
                j += 1
            out.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos, i = pos + j - i, j
            continue
        t, h, w = next(images, (0, 0, 0))
        gh, gw = h // spatial_merge, w // spatial_merge
        n = t * gh * gw
        if n == 0 or ids[i:i + n] != [image_token_id] * n:
            raise DataError(f"mrope_position_ids: image tokens at {i} do not match the image grids {list(grids)}")
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        out.append(torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + pos)
        pos, i = pos + max(gh, gw), i + n  # text after an image continues after its largest extent
    if next(images, None) is not None:
        raise DataError(f"mrope_position_ids: {len(grids)} image grids but fewer images in the tokens")
    return torch.cat(out, dim=1) if out else torch.zeros(3, 0, dtype=torch.long)


@dataclass
class QwenVisionFields:
    """The Qwen-specific fields of one packed micro-batch (see the module docstring)."""

    position_ids: torch.Tensor  # [3, L] int64
    pixel_values: torch.Tensor  # [block_cap * m^2, patch dim]
    image_flags: torch.Tensor  # [block_cap] int64
    image_grids: tuple[Grid, ...]


def pack_qwen_vision(input_ids: Sequence[torch.Tensor], patches: Sequence[torch.Tensor], grids: Sequence[Sequence[Grid]],
                     image_token_id: int, spatial_merge: int, length: int, block_cap: int | None = None,
                     patch_dim: int | None = None) -> QwenVisionFields:
    """Positions, patch rows, block flags and grids of samples packed end to end in a sequence of ``length``
    tokens (sample ``k``: ``input_ids[k]`` [n_k], its images' ``patches[k]`` [p_k, D] and ``grids[k]``);
    the patch rows padded with zeros to ``block_cap`` merge blocks (None: no padding). ``patch_dim`` (D) is
    needed only without samples (a group whose every sample was dropped: padding only).

    Raises :class:`DataError` when the samples need more than ``length`` tokens or ``block_cap`` blocks, or
    when a sample's patch rows are not its grids' patches.
    """
    unit = spatial_merge**2
    used = sum(len(s) for s in input_ids)
    if used > length:
        raise DataError(f"Qwen packing: {used} tokens exceed the {length} of the micro-batch")
    for k, (rows, sample_grids) in enumerate(zip(patches, grids)):
        want = sum(t * h * w for t, h, w in sample_grids)
        if rows.shape[0] != want:
            raise DataError(f"Qwen packing: sample {k} has {rows.shape[0]} patch rows, its image grids "
                            f"{list(sample_grids)} have {want} patches")
    positions = [mrope_position_ids(s, g, image_token_id, spatial_merge) for s, g in zip(input_ids, grids)]
    positions.append(torch.arange(length - used).expand(3, -1))  # the padding segment restarts too
    pixels = torch.cat(list(patches)) if patches else torch.zeros(0, patch_dim or 0)
    blocks = pixels.shape[0] // unit
    cap = blocks if block_cap is None else block_cap
    if blocks > cap:
        raise DataError(f"Qwen packing: {blocks} merge blocks exceed the block cap {block_cap}")
    return QwenVisionFields(
        position_ids=torch.cat(positions, dim=1),
        pixel_values=F.pad(pixels, (0, 0, 0, (cap - blocks) * unit)),
        image_flags=(torch.arange(cap) < blocks).long(),
        image_grids=tuple(tuple(g) for sample in grids for g in sample))
