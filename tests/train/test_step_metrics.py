"""StepMeter's accounting: the work of a micro-batch (real tokens, samples, tiles, training FLOPs for MFU)
from its host facts, with padding tiles and the padding segment left out and frozen parts counted by the
backward work they really need; the loss terms summed on the device and handed over in ``local_totals``.

Exact numbers for the tiny model (``conf/model/tiny.yaml``) on a hand-made batch of 2 samples (10 and 6
tokens, one real tile each) packed into 32 tokens (a 16-token padding segment) and 4 tiles (2 padding):

- vision forward, 2 tiles: embed 2*2*16*(3*14^2)*32 = 1,204,224; per block and tile
  2*17*(4*32^2 + 2*32*128) + 4*17^2*32 = 454,784, x 2 blocks x 2 tiles = 1,819,136; total 3,023,360;
- projector forward: 2 * (2 tiles x 4 tokens) * (128*64 + 64^2) = 196,608;
- LLM forward over [10, 6]: per layer 2*16*(64*(64 + 2*2*16) + 64^2 + 3*64*128) + 2*64*(10^2 + 6^2)
  = 1,197,056, x 2 layers, + head 2*16*64*256 = 524,288; total 2,918,400.
"""
from __future__ import annotations

import pytest
import torch

from omnibal_pl.batch import PackedBatch
from omnibal_pl.conf import preset
from omnibal_pl.model import VLMConfig
from omnibal_pl.train.objective import Objective
from omnibal_pl.train.step_metrics import StepMeter

TINY = VLMConfig.from_dict(preset("model", "tiny"))
VISION, PROJECTOR, LLM = 3_023_360.0, 196_608.0, 2_918_400.0  # forward FLOPs (module docstring)


def hand_made_batch() -> PackedBatch:
    """Samples of 10 and 6 tokens (4 image-context tokens each), a 16-token padding segment, tiles [1, 1, 0, 0]."""
    ctx, lengths, length = TINY.image_context_id, (10, 6, 16), 32
    ids = torch.full((length,), 7)
    ids[1:5] = ctx
    ids[11:15] = ctx
    ids[16:] = 0
    cu = torch.tensor([0, 10, 16, 32], dtype=torch.int32)
    size = TINY.vision.image_size
    return PackedBatch(input_ids=ids[None], labels=torch.full((1, length), -100), position_ids=torch.zeros(1, length),
                       cu_seqlens=cu, max_seqlen=16, pixel_values=torch.zeros(4, 3, size, size),
                       image_flags=torch.tensor([1, 1, 0, 0]), loss_weight=torch.zeros(1, length),
                       sample_ids=torch.tensor([3, 8]), num_samples=2, seqlens=lengths, num_tiles=2, image_tokens=8)


@pytest.mark.parametrize("frozen, flops", [
    ((), 3 * (VISION + PROJECTOR + LLM)),  # 18,415,104: all trainable, 3x forward each
    (("vision",), VISION + 3 * (PROJECTOR + LLM)),  # 12,368,384: nothing before the vision encoder needs a gradient
    (("vision", "projector"), VISION + PROJECTOR + 3 * LLM),  # 11,975,168
    (("projector",), 3 * VISION + 2 * PROJECTOR + 3 * LLM),  # 18,218,496: input gradient for the trainable vision
    (("llm",), 3 * (VISION + PROJECTOR) + 2 * LLM),  # 15,496,704
])
def test_flops_count_real_tiles_and_segments_and_frozen_parts_by_their_backward(frozen, flops):
    meter = StepMeter(TINY, peak_tflops=None, frozen=frozen)
    meter.account(hand_made_batch())
    assert meter.flops == flops
    assert (meter.tokens, meter.samples, meter.tiles, meter.micro_batches) == (16, 2, 2, 1)


def test_micro_batches_and_loss_terms_add_up_in_local_totals():
    meter = StepMeter(TINY, peak_tflops=None, frozen=("vision",))
    for loss_sum, weight in ((1.5, 2.0), (0.25, 1.0)):
        meter.account(hand_made_batch())
        meter.add_loss(Objective(torch.tensor(loss_sum), torch.tensor(loss_sum), torch.tensor(weight), None))
    totals = meter.local_totals(torch.device("cpu"))
    assert totals.dtype == torch.float64
    assert totals.tolist() == [1.75, 3.0, 32, 4, 4, 2 * (VISION + 3 * (PROJECTOR + LLM)), 0, 0]  # 0, 0: none dropped


def test_finish_step_turns_global_totals_into_mfu_and_starts_the_next_step():
    meter = StepMeter(TINY, peak_tflops=1.0)
    meter.account(hand_made_batch())
    meter.start -= 2.0  # the step took (at least) 2 s
    metrics = meter.finish_step(0.5, [16, 2, 2, 4e12], lr=1e-4, world_size=2, grad_norm=0.75)
    assert metrics["train/mfu"] == pytest.approx(4e12 / 2.0 / 2e12, rel=1e-3)
    assert metrics["train/tokens_per_s"] == pytest.approx(8.0, rel=1e-3) and "train/keep_rate_loss" not in metrics
    assert (meter.flops, meter.tokens, meter.loss_sum, meter.start) == (0.0, 0, None, None)
    assert metrics["train/loss"] == 0.5 and metrics["train/grad_norm"] == 0.75
