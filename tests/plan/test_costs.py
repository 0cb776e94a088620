"""Block costs: the cost model against the config, the profiler on the tiny model (real CPU run)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from omnibal_pl.batch import MicroBatchShape
from omnibal_pl.conf import preset
from omnibal_pl.errors import ConfigError
from omnibal_pl.model import VLM, VLMConfig
from omnibal_pl.model.flops import block_forward_flops
from omnibal_pl.model.sparsify import SparsifyConfig
from omnibal_pl.plan.cost_model import block_work, cost_model_profile, device_preset, fit_device
from omnibal_pl.plan.costs import (GRAD_BUCKET_BYTES, BlockCost, CostProfile, ZeroSharding, training_static_bytes,
                                   transient_bytes)
from omnibal_pl.plan.profiler import profile_blocks

from tests.helpers import model_config



def load(name: str) -> VLMConfig:
    return model_config(name)


def test_internvl_chat_v1_5_parameter_bytes_match_the_config() -> None:
    cfg = load("internvl_chat_v1_5")
    profile = cost_model_profile(cfg, MicroBatchShape(18, 5280), "h100_80gb")
    params = {b.name: b.param_bytes // 2 for b in profile.blocks}
    assert len(profile.blocks) == 1 + 45 + 1 + 1 + 48 + 1
    assert sum(params.values()) == pytest.approx(25.5e9, rel=0.01)  # InternVL-Chat-V1-5: 25.5B parameters
    llm, v = cfg.llm, cfg.vision
    d, hd = llm.hidden, llm.head_dim
    # closed forms from the config: q, k, v, o, SwiGLU and two RMSNorm weights; qkv + proj + MLP (+ biases,
    # qk-norm, two RMSNorms, layer scales) for InternViT-6B
    assert params["llm.layers.0"] == d * (d + 2 * llm.kv_heads * hd) + d * d + 3 * d * llm.intermediate + 2 * d
    w = v.width
    assert params["vision.blocks.0"] == 4 * w * w + w + 2 * w * v.mlp_dim + v.mlp_dim + w + 2 * w + 2 * w + 2 * w
    assert params["llm.head"] == d * llm.vocab_size + d
    # bf16 AdamW: 2 bytes of parameter and 14 of gradient + master + moments, the 12 fp32 ones sharded
    block = profile.blocks[50]
    assert block.grad_opt_bytes == 14 * block.param_bytes // 2
    sharded = cost_model_profile(cfg, MicroBatchShape(18, 5280), "h100_80gb", sharding=ZeroSharding(1, 8)).blocks[50]
    assert sharded.grad_opt_bytes == block.param_bytes + 12 * (block.param_bytes // 2) // 8


def test_attention_term_grows_with_the_square_of_sample_length() -> None:
    cfg = load("internvl2_8b")
    one = block_work(cfg, "llm.layers.3", MicroBatchShape(4, 8192, samples=1))
    eight = block_work(cfg, "llm.layers.3", MicroBatchShape(4, 8192, samples=8))
    assert one.linear_flops == pytest.approx(eight.linear_flops)
    assert one.attention_flops == pytest.approx(8 * eight.attention_flops)
    assert one.linear_flops + one.attention_flops == pytest.approx(block_forward_flops(cfg, "llm_layer", 4, [8192]))
    short = cost_model_profile(cfg, MicroBatchShape(4, 8192, samples=8)).blocks[30]
    long = cost_model_profile(cfg, MicroBatchShape(4, 8192, samples=1)).blocks[30]
    assert long.forward_s > short.forward_s and long.recompute_attention_s == pytest.approx(8 * short.recompute_attention_s)


def test_recompute_modes_order_bytes_and_time() -> None:
    profile = cost_model_profile(load("internvl2_8b"), MicroBatchShape(16, 4096))
    for b in profile.blocks:
        if b.name.startswith(("vision.blocks.", "llm.layers.")):
            assert b.act_full_bytes <= b.act_attention_bytes <= b.act_none_bytes
        else:  # no attention core; full recompute keeps the block's checkpointed inputs (more, for a cheap block)
            assert b.act_attention_bytes == b.act_none_bytes and (b.act_full_bytes > 0 or b.name == "vision.embed")
        assert b.forward_s > 0 and b.backward_s > b.forward_s
        if b.kind in ("vision_block", "llm_layer"):
            assert b.act_full_bytes < b.act_none_bytes / 5
            assert 0 < b.recompute_attention_s < b.recompute_full_s == b.forward_s
        else:  # only transformer blocks can recompute
            assert b.act_full_bytes == b.act_none_bytes and b.recompute_full_s == 0


def test_presets_rank_by_speed_and_memory() -> None:
    cfg, shape = load("internvl2_8b"), MicroBatchShape(16, 4096)
    total = {d: sum(b.forward_s + b.backward_s for b in cost_model_profile(cfg, shape, d).blocks)
             for d in ("h100_80gb", "h200", "a100_80gb")}
    assert total["h200"] <= total["h100_80gb"] < total["a100_80gb"]
    assert device_preset("h200").memory_bytes > device_preset("h100_80gb").memory_bytes
    with pytest.raises(ConfigError, match="h100_80gb"):
        device_preset("tpu_v5")


def test_dynamic_llava_costs_more_in_training_and_less_at_prefill() -> None:
    off = load("llava_1_5_7b")
    on = dataclasses.replace(off, sparsify=SparsifyConfig(enabled=True))
    shape = MicroBatchShape(4, 4 * 700, samples=4)  # one 576-token image per sample
    train_off, train_on = (cost_model_profile(c, shape) for c in (off, on))
    layer = train_off.names.index("llm.layers.5")
    early = train_off.names.index("llm.layers.1")
    assert train_on.blocks[early] == train_off.blocks[early]  # before sparse_layer: unchanged
    assert train_on.blocks[layer].forward_s > train_off.blocks[layer].forward_s  # masked eager attention
    assert train_on.blocks[layer].act_none_bytes > train_off.blocks[layer].act_none_bytes
    # attention recompute frees the float32 scores of the masked path
    assert train_on.blocks[layer].act_attention_bytes < 0.5 * train_on.blocks[layer].act_none_bytes
    pre_off, pre_on = (cost_model_profile(c, shape, phase="prefill") for c in (off, on))
    assert pre_on.blocks[early].forward_s == pre_off.blocks[early].forward_s
    # 576 -> 115 image tokens of 700 per sample from layer 2 on
    assert pre_on.blocks[layer].forward_s < 0.45 * pre_off.blocks[layer].forward_s
    assert sum(b.forward_s for b in pre_on.blocks) < sum(b.forward_s for b in pre_off.blocks)


def test_shape_splits_tokens_and_tiles() -> None:
    shape = MicroBatchShape(vit_cap=18, token_cap=5282, samples=4)
    assert shape.seqlens == [1321, 1321, 1320, 1320] and sum(shape.seqlens) == 5282
    assert shape.sample_tiles(256) == [5, 5, 4, 4]
    assert shape.sample_tiles(576) == [2, 2, 2, 2]  # capped by the length: padding tiles make up the rest
    with pytest.raises(ConfigError, match="token_cap >= samples"):
        MicroBatchShape(vit_cap=1, token_cap=2, samples=4)


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory) -> tuple[CostProfile, Path]:
    cache = tmp_path_factory.mktemp("profile_cache")
    return profile_blocks(load("tiny"), MicroBatchShape(8, 256), warmup=1, repeats=3, cache_dir=cache), cache


def test_profiler_measures_every_block_of_the_tiny_model(tiny_profile) -> None:
    profile, _ = tiny_profile
    cfg = load("tiny")
    model = VLM(cfg)
    assert profile.source == "profile" and profile.device == "cpu"
    profile.check_blocks([n for n, _ in model.blocks()])
    modules = dict(model.blocks())
    for b in profile.blocks:
        assert 0 < b.forward_s < 1.0 and 0 < b.backward_s < 1.0
        assert b.param_bytes == 4 * sum(p.numel() for p in modules[b.name].parameters())  # float32 on CPU
        assert b.grad_opt_bytes == 3 * b.param_bytes  # fp32 gradient + two moments, no master copy
        # the patch embedding saves only its input, the micro-batch's pixels: input data, not an activation
        assert b.act_none_bytes > 0 or b.name == "vision.embed"
        if b.name.startswith(("vision.blocks.", "llm.layers.")):
            assert b.act_full_bytes <= b.act_attention_bytes <= b.act_none_bytes
        else:  # no attention core; full recompute keeps the block's checkpointed inputs (more, for a cheap block)
            assert b.act_attention_bytes == b.act_none_bytes and (b.act_full_bytes > 0 or b.name == "vision.embed")
    layer = profile.blocks[profile.names.index("llm.layers.0")]
    tokens_x_hidden = 256 * cfg.llm.hidden * 4
    assert layer.act_full_bytes == tokens_x_hidden  # checkpointing keeps only the block input
    assert layer.act_none_bytes > 5 * tokens_x_hidden
    assert 0 < layer.recompute_attention_s < layer.forward_s
    # the profile's activations agree with the cost model's count for the vision blocks (float32 here)
    model_bytes = block_work(cfg, "vision.blocks.0", MicroBatchShape(8, 256), element_bytes=4).act_none
    assert profile.blocks[1].act_none_bytes == pytest.approx(model_bytes, rel=0.05)


def test_profiler_cache_hit_returns_the_saved_profile(tiny_profile) -> None:
    profile, cache = tiny_profile
    files = list(cache.glob("tiny-cpu-float32-t8-L256-s4-*.json"))
    assert len(files) == 1
    again = profile_blocks(load("tiny"), MicroBatchShape(8, 256), warmup=1, repeats=3, cache_dir=cache)
    assert again.blocks == profile.blocks  # a new measurement would not repeat every timing exactly
    other = load("tiny")
    other.llm.intermediate = 96  # another config: another cache entry
    assert not profile_blocks(other, MicroBatchShape(8, 256), warmup=0, repeats=1, cache_dir=cache).blocks == profile.blocks
    assert len(list(cache.glob("*.json"))) == 2


def test_measured_preset_fits_the_profile(tiny_profile) -> None:
    profile, _ = tiny_profile
    cfg = load("tiny")
    preset = fit_device(profile, cfg, memory_bytes=2**30)
    assert preset.bf16_tflops > 0 and preset.overhead_s >= 0 and preset.memory_bytes == 2**30
    fitted = cost_model_profile(cfg, MicroBatchShape(8, 256), preset, element_bytes=4)
    measured = sum(b.forward_s + b.backward_s for b in profile.blocks)
    modelled = sum(b.forward_s + b.backward_s for b in fitted.blocks)
    assert modelled == pytest.approx(measured, rel=0.5)


@pytest.mark.parametrize("element, state", [(4, 8), (2, 12)])
def test_static_bytes_split_by_zero_level(element, state) -> None:
    """Level 1 splits the optimizer state, 2 the gradients too, 3 the parameters too; nothing else moves."""
    n, dp = 1000, 4
    rows = {z: training_static_bytes(n, element, ZeroSharding(z, dp)) for z in range(4)}
    assert rows[0] == (n * element, n * element + n * state)
    assert rows[1] == (n * element, n * element + n * state // dp)
    assert rows[2] == (n * element, (n * element + n * state) // dp)
    assert rows[3] == (n * element // dp, (n * element + n * state) // dp)
    assert training_static_bytes(n, element, ZeroSharding(3, 1)) == rows[0]  # one rank shards nothing
    with pytest.raises(ConfigError, match="ZeRO level 4"):
        ZeroSharding(4, 2)


def test_transient_bytes_follow_the_runtime_at_each_zero_level() -> None:
    """The recompute transient (the largest act_none - act_full) plus what the runtime communicates: the DP
    gradient bucket at ZeRO 0/1 (capped at 25 MiB), FSDP2's unsharded gradients of one block at ZeRO 2, and
    at ZeRO 3 also the unsharded parameters of the running and the prefetched block; nothing at dp = 1."""
    def block(name: str, params: int, none: int, full: int) -> BlockCost:
        return BlockCost(name=name, kind="llm_layer", forward_s=1e-3, backward_s=2e-3, act_none_bytes=none,
                         act_attention_bytes=none, act_full_bytes=full, recompute_attention_s=0.0,
                         recompute_full_s=1e-3, param_bytes=params, grad_opt_bytes=3 * params)

    blocks = [block("llm.layers.0", 10 * 2**20, 500, 100), block("llm.layers.1", 40 * 2**20, 300, 250)]
    recompute = 400
    assert transient_bytes(blocks, ZeroSharding(0, 1)) == recompute
    assert transient_bytes(blocks, ZeroSharding(1, 4)) == recompute + GRAD_BUCKET_BYTES
    assert transient_bytes(blocks[:1], ZeroSharding(0, 4)) == recompute + 10 * 2**20  # less than one bucket
    assert transient_bytes(blocks, ZeroSharding(2, 4)) == recompute + 40 * 2**20
    # at ZeRO 3 the profile's parameter bytes are this rank's shard: unsharded is dp times that
    assert transient_bytes(blocks, ZeroSharding(3, 4)) == recompute + 3 * 4 * 40 * 2**20
    # a pipeline stage also receives its input and its output's gradient (the first block's checkpointed input)
    assert transient_bytes(blocks, ZeroSharding(0, 1), pipelined=True) == recompute + 2 * 100


def test_qwen2_5_full_attention_vision_blocks_cost_more_than_windowed_ones():
    """Qwen2.5-VL-7B: blocks 7, 15, 23 and 31 attend over whole images, the others within 112 px windows. With
    images of 1,280 merge blocks (5,120 patches) a full block's attention core is ~80x a windowed one's."""
    cfg = VLMConfig.from_dict(preset("model", "qwen2_5_vl_7b"))
    profile = cost_model_profile(cfg, MicroBatchShape(4 * 1280, 4 * 1280 + 4 * 512, samples=4), "h100_80gb")
    vision = {b.name: b for b in profile.blocks if b.kind == "vision_block"}
    full = [vision[f"vision.blocks.{i}"].recompute_attention_s for i in cfg.vision.full_attention_blocks]
    windowed = [b.recompute_attention_s for n, b in vision.items() if int(n.rsplit(".", 1)[1])
                not in cfg.vision.full_attention_blocks]
    assert sorted(cfg.vision.full_attention_blocks) == [7, 15, 23, 31] and len(windowed) == 28
    assert len(set(full)) == 1 and len(set(windowed)) == 1  # same images, same cost within each kind
    assert 40 < full[0] / windowed[0] < 120
