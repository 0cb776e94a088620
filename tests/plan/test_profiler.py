"""The block profiler in the run's precision, with the last stage's loss counted in ``llm.head``."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omnibal_pl.batch import MicroBatchShape
from omnibal_pl.errors import ConfigError
from omnibal_pl.model import VLM
from omnibal_pl.plan.costs import CostProfile, ZeroSharding
from omnibal_pl.plan.profiler import (PRECISIONS, cache_path, local_device,
                                      next_token_loss, precision_of, profile_blocks)
from omnibal_pl.plan.saved_bytes import ParameterFilter, saved_bytes

from tests.helpers import model_config

SHAPE = MicroBatchShape(vit_cap=4, token_cap=128)


def profile(precision: str, cache_dir: Path | None = None) -> CostProfile:
    """A one-repeat profile of the tiny model at ``SHAPE`` on the CPU."""
    return profile_blocks(model_config("tiny"), SHAPE, device="cpu", precision=precision, warmup=0, repeats=1,
                          cache_dir=cache_dir)


@pytest.fixture(scope="module")
def profiles() -> dict[str, CostProfile]:
    return {p: profile(p) for p in ("32-true", "bf16-mixed", "bf16-true")}


def block_parameters() -> dict[str, int]:
    return {name: sum(p.numel() for p in block.parameters()) for name, block in VLM(model_config("tiny")).blocks()}


def transformer_activation_bytes(p: CostProfile) -> int:
    return sum(b.act_none_bytes for b in p.blocks if b.kind in ("vision_block", "llm_layer"))


def test_default_precision_is_32_true_on_cpu() -> None:
    assert local_device().type == "cpu"
    assert profile_blocks(model_config("tiny"), SHAPE, warmup=0, repeats=1).micro_batch["precision"] == "32-true"


def test_bf16_mixed_keeps_fp32_parameters_and_autocasts_activations(profiles) -> None:
    counts = block_parameters()
    mixed, full = profiles["bf16-mixed"], profiles["32-true"]
    assert mixed.micro_batch["precision"] == "bf16-mixed" and mixed.micro_batch["dtype"] == "bfloat16"
    for b in mixed.blocks:
        assert b.param_bytes == 4 * counts[b.name]  # fp32 storage, as Lightning's MixedPrecision keeps it
        assert b.grad_opt_bytes == 3 * b.param_bytes
    # without autocast the ratio is exactly 1; with it the matmul and attention activations are bf16 (the
    # residual stream and norms stay fp32: about 0.55 for the ViT blocks, 0.8 for the LLM layers here)
    ratio = transformer_activation_bytes(mixed) / transformer_activation_bytes(full)
    assert ratio < 0.85
    for m, f in zip(mixed.blocks[1:], full.blocks[1:]):
        assert m.act_none_bytes <= f.act_none_bytes
    # the patch embedding saves its input: under 32-true that is the micro-batch's pixel_values (input data,
    # counted apart, not an activation); under autocast its bf16 copy, made per micro-batch
    pixels = SHAPE.vit_cap * 3 * model_config("tiny").vision.image_size ** 2
    assert (full.blocks[0].name, full.blocks[0].act_none_bytes) == ("vision.embed", 0)
    assert mixed.blocks[0].act_none_bytes == 2 * pixels


def test_autocast_weight_copies_are_not_activations(profiles) -> None:
    """Autocast's bf16 copy of a weight is made once per autocast region, not per micro-batch: only the
    activation side of a linear layer counts."""
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(16, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved, out = saved_bytes(lambda: linear(x), ParameterFilter(linear.parameters()))
    assert out.dtype == torch.bfloat16
    assert saved == x.numel() * 2  # the bf16 cast of x; the bf16 cast of the weight (32 x 64) is excluded
    layer = next(b for b in profiles["bf16-mixed"].blocks if b.name == "llm.layers.0")
    assert layer.act_full_bytes == SHAPE.token_cap * model_config("tiny").llm.hidden * 4  # the fp32 input only


def test_bf16_true_stores_two_byte_parameters(profiles) -> None:
    counts = block_parameters()
    for b in profiles["bf16-true"].blocks:
        assert b.param_bytes == 2 * counts[b.name]
        assert b.grad_opt_bytes == 2 * counts[b.name] + 12 * counts[b.name]  # bf16 grad, fp32 master + moments
    assert profiles["bf16-true"].micro_batch["dtype"] == "bfloat16"


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_head_counts_the_loss_on_its_logits(profiles, precision) -> None:
    """The head alone saves its normed input (L x hidden); the loss adds the fp32 log-softmax (L x vocab)."""
    cfg = model_config("tiny")
    head = profiles[precision].blocks[-1]
    assert head.name == "llm.head"
    assert head.act_none_bytes >= SHAPE.token_cap * cfg.llm.vocab_size * 4


def test_cache_key_is_distinct_per_precision(tmp_path) -> None:
    cfg = model_config("tiny")
    cpu = local_device("cpu")
    paths = {p: cache_path(tmp_path, cfg, SHAPE, cpu, p, ZeroSharding()) for p in PRECISIONS}
    assert len(set(paths.values())) == len(PRECISIONS)
    assert paths["32-true"] == cache_path(tmp_path, cfg, SHAPE, cpu, "32", ZeroSharding())  # Lightning's alias
    full = profile("32-true", tmp_path)
    mixed = profile("bf16-mixed", tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 2
    assert profile("bf16-mixed", tmp_path).micro_batch["precision"] == "bf16-mixed"  # read back, not the fp32 one
    assert profile("32-true", tmp_path).blocks == full.blocks
    assert mixed.blocks != full.blocks


def test_unknown_precision_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="bf16-mixed"):
        precision_of("fp8")


def test_the_runtime_loss_is_profiled_with_the_head_and_keys_the_cache(profiles, tmp_path) -> None:
    """``omnibal-train`` profiles ``llm.head`` with its own chunked loss: under bf16-mixed it keeps the bf16
    logits and an fp32 log-sum-exp per position, not the fp32 log-softmax of the plain loss; the cache
    keeps the two apart."""
    from omnibal_pl.train.objective import head_loss_sum

    cfg = model_config("tiny")
    runtime = profile_blocks(cfg, SHAPE, precision="bf16-mixed", warmup=0, repeats=1, head_loss=head_loss_sum)
    head = {p: next(b for b in prof.blocks if b.name == "llm.head") for p, prof in
            (("runtime", runtime), ("plain", profiles["bf16-mixed"]))}
    logits = SHAPE.token_cap * cfg.llm.vocab_size
    assert head["plain"].act_none_bytes >= 4 * logits  # the fp32 log-softmax [L, vocab]
    assert head["runtime"].act_none_bytes >= 2 * logits  # the bf16 logits themselves
    assert head["plain"].act_none_bytes - head["runtime"].act_none_bytes > 1.5 * logits  # ~2 bytes per logit less
    paths = {cache_path(tmp_path, cfg, SHAPE, local_device(), "bf16-mixed", ZeroSharding(), loss)
             for loss in (head_loss_sum, next_token_loss)}
    assert len(paths) == 2
