"""A minimal LightningModule that records which samples each rank trained on (for data-pipeline tests)."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from omnibal_pl.data.batch import PackedBatch


class RecordingModule(L.LightningModule):
    """One scalar parameter; the loss touches every micro-batch so DDP has gradients to sync.

    Records (epoch, global step, sample ids, tiles, tokens) per micro-batch and, at the end of fit,
    writes them to ``out_dir/rank{global_rank}.jsonl`` when ``out_dir`` is set.
    """

    def __init__(self, out_dir: str | None = None) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.out_dir = out_dir
        self.seen: list[dict] = []

    def training_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor:
        self.seen.append({"epoch": self.current_epoch, "step": self.global_step, "batch_idx": batch_idx,
                          "ids": batch.sample_ids.tolist(), "tiles": batch.num_tiles, "tokens": batch.num_tokens,
                          "shape": list(batch.input_ids.shape), "tile_shape": list(batch.pixel_values.shape)})
        return (self.w - 1.0) ** 2 * batch.loss_weight.sum() / batch.loss_weight.sum().clamp(min=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_fit_end(self) -> None:
        if self.out_dir:
            path = Path(self.out_dir) / f"rank{self.global_rank}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in self.seen))
