"""Block ``projector``: vision tokens [T, P, width_v] -> LLM tokens [T, tokens_per_tile, hidden]."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnibal_pl.batch import PackedBatch
from omnibal_pl.model.config import VLMConfig


def pixel_shuffle(x: torch.Tensor) -> torch.Tensor:
    """InternVL's pixel shuffle at ratio 0.5 (its ``ps_version='v2'``): [T, g, g, c] -> [T, g/2, g/2, 4c].

    The channel order must be exactly InternVL's, or its ``mlp1`` weights would see permuted inputs.
    """
    tiles, gw, gh, c = x.shape
    x = x.reshape(tiles, gw, gh // 2, 2 * c).permute(0, 2, 1, 3)
    x = x.reshape(tiles, gh // 2, gw // 2, 4 * c).permute(0, 2, 1, 3)
    return x


class Projector(nn.Module):
    """``pixel_shuffle_mlp`` (InternVL ``mlp1``) or ``mlp2x_gelu`` (LLaVA ``multi_modal_projector``).

    The class token, if the encoder has one, is dropped first (both families do).
    """

    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        width_in = cfg.vision.width * cfg.projector.merge
        shuffle = cfg.projector.kind == "pixel_shuffle_mlp"
        self.norm = nn.LayerNorm(width_in, eps=cfg.projector.norm_eps) if shuffle else None
        self.fc1 = nn.Linear(width_in, cfg.llm.hidden)
        self.fc2 = nn.Linear(cfg.llm.hidden, cfg.llm.hidden)

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        if self.cfg.vision.class_token:
            x = x[:, 1:]
        if self.norm is not None:
            grid = self.cfg.vision.grid
            x = pixel_shuffle(x.reshape(x.shape[0], grid, grid, -1)).reshape(x.shape[0], self.cfg.tokens_per_tile, -1)
            x = self.norm(x)
        return self.fc2(F.gelu(self.fc1(x)))
