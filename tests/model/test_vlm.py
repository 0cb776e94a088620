"""The VLM as a block sequence: order, names, calling convention, packing, recompute, published sizes."""
import copy
import time

import pytest
import torch

from omnibal_pl.errors import ConfigError, DataError
from omnibal_pl.model import VLM, VLMConfig, dummy_batch
from omnibal_pl.conf import preset

from tests.helpers import model_config



def load(name: str) -> VLMConfig:
    return model_config(name)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return VLM(load("tiny"))


def test_blocks_are_ordered_and_named(tiny):
    names = [n for n, _ in tiny.blocks()]
    assert names == [
        "vision.embed", "vision.blocks.0", "vision.blocks.1", "projector",
        "llm.embed", "llm.layers.0", "llm.layers.1", "llm.head",
    ]
    params = dict(tiny.named_parameters())
    for name in ("vision.blocks.1.attn.qkv.weight", "vision.blocks.0.ls1", "projector.norm.weight",
                 "llm.embed.tok.weight", "llm.layers.1.attn.q.weight", "llm.layers.0.mlp.gate.weight",
                 "llm.head.norm.weight", "llm.head.out.weight"):
        assert name in params
    # every parameter belongs to exactly one block
    owned = sum(sum(p.numel() for p in b.parameters()) for _, b in tiny.blocks())
    assert owned == sum(p.numel() for p in tiny.parameters())


def test_block_shapes_and_forward_is_the_block_chain(tiny):
    cfg = tiny.cfg
    batch = dummy_batch(cfg, [5, 9, 3], [2, 0, 1], token_cap=64, vit_cap=4)
    x = batch.pixel_values
    shapes = {}
    for name, block in tiny.blocks():
        x = block(x, batch)
        shapes[name] = tuple(x.shape)
    p = cfg.vision.num_patches + 1
    assert shapes["vision.embed"] == shapes["vision.blocks.1"] == (4, p, cfg.vision.width)
    assert shapes["projector"] == (4, cfg.tokens_per_tile, cfg.llm.hidden)
    assert shapes["llm.embed"] == shapes["llm.layers.1"] == (1, 64, cfg.llm.hidden)
    assert shapes["llm.head"] == (1, 64, cfg.llm.vocab_size)
    torch.testing.assert_close(tiny(batch), x)


def test_image_features_land_on_context_positions(tiny):
    batch = dummy_batch(tiny.cfg, [4, 6], [1, 2], vit_cap=4)
    feats = torch.randn(4, tiny.cfg.tokens_per_tile, tiny.cfg.llm.hidden)
    h = tiny.llm.embed(feats, batch)[0]
    slots = batch.input_ids[0] == tiny.cfg.image_context_id
    torch.testing.assert_close(h[slots], feats[:3].reshape(-1, feats.shape[-1]))  # tiles 0..2 are real
    torch.testing.assert_close(h[~slots], tiny.llm.embed.tok(batch.input_ids[0][~slots]))


def test_image_token_count_mismatch_is_a_clear_error(tiny):
    batch = dummy_batch(tiny.cfg, [4, 6], [1, 1], vit_cap=3)
    batch.image_flags[2] = 1  # a third "real" tile without context tokens
    with pytest.raises(DataError, match="image-context tokens"):
        tiny(batch)


def test_packed_samples_do_not_see_each_other(tiny):
    """Each sample's logits are the same packed with others as alone: masks and positions are per sample."""
    tiny.eval()
    packed = dummy_batch(tiny.cfg, [5, 7, 4], [1, 0, 2], token_cap=48, vit_cap=4, seed=1)
    with torch.no_grad():
        logits = tiny(packed)[0]
        bounds = packed.cu_seqlens.tolist()
        tile_start = 0
        for k, tiles in enumerate([1, 0, 2]):
            s, e = bounds[k], bounds[k + 1]
            alone = copy.copy(packed)
            alone.input_ids = packed.input_ids[:, s:e]
            alone.position_ids = packed.position_ids[:, s:e]
            alone.cu_seqlens = torch.tensor([0, e - s], dtype=torch.int32)
            alone.max_seqlen = e - s
            alone.pixel_values = packed.pixel_values[tile_start: tile_start + max(tiles, 1)]
            alone.image_flags = torch.tensor([1] * tiles if tiles else [0])
            tile_start += tiles
            torch.testing.assert_close(tiny(alone)[0], logits[s:e], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["full", "attention"])
def test_recompute_gives_identical_gradients(tiny, mode):
    batch = dummy_batch(tiny.cfg, [5, 9], [2, 1], token_cap=40, vit_cap=4)

    def grads(model):
        model.zero_grad()
        model(batch).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    base = grads(tiny)
    tiny.set_recompute(mode)
    assert all(b.recompute == mode for n, b in tiny.blocks() if ".blocks." in n or ".layers." in n)
    again = grads(tiny)
    assert base.keys() == again.keys()
    for n in base:
        torch.testing.assert_close(again[n], base[n], msg=n)


def test_set_recompute_per_block_and_errors(tiny):
    tiny.set_recompute("full", ["llm.layers.1", "vision.blocks.0"])
    modes = {n: getattr(b, "recompute", None) for n, b in tiny.blocks()}
    assert modes["llm.layers.1"] == "full" and modes["vision.blocks.0"] == "full"
    assert modes["llm.layers.0"] == "none" and modes["vision.blocks.1"] == "none"
    with pytest.raises(ConfigError, match="not transformer blocks"):
        tiny.set_recompute("full", ["llm.head"])
    with pytest.raises(ConfigError, match="unknown"):
        tiny.set_recompute("sometimes")


def test_stage_local_model_keeps_parameter_names(tiny):
    full_names = set(dict(tiny.named_parameters()))
    tiny.vision = None
    tiny.projector = None
    del tiny.llm.layers["0"]
    names = [n for n, _ in tiny.blocks()]
    assert names == ["llm.embed", "llm.layers.1", "llm.head"]
    assert set(dict(tiny.named_parameters())) <= full_names
    assert "llm.layers.1.attn.o.weight" in dict(tiny.named_parameters())


def test_tiny_forward_backward_is_fast(tiny):
    batch = dummy_batch(tiny.cfg, [40, 60, 30], [2, 1, 1], token_cap=256, vit_cap=6)
    tiny(batch).mean().backward()  # warm-up
    start = time.perf_counter()
    tiny(batch).float().logsumexp(-1).mean().backward()
    assert time.perf_counter() - start < 0.5


def test_config_errors_name_the_field():
    data = preset("model", "tiny")
    bad = copy.deepcopy(data)
    bad["llm"]["kv_head"] = 2
    with pytest.raises(ConfigError, match=r"llm: unknown keys \['kv_head'\]"):
        VLMConfig.from_dict(bad)
    bad = copy.deepcopy(data)
    bad["llm"]["kv_heads"] = 3
    with pytest.raises(ConfigError, match="llm.kv_heads"):
        VLMConfig.from_dict(bad)
    bad = copy.deepcopy(data)
    bad["vision"]["norm"] = "batchnorm"
    with pytest.raises(ConfigError, match="vision.norm"):
        VLMConfig.from_dict(bad)
    assert VLMConfig.from_dict(load("tiny").to_dict()) == load("tiny")


# Published totals (parameters), from the model cards on Hugging Face:
#   OpenGVLab/InternVL2-2B "2.2B", OpenGVLab/InternVL2-8B "8.1B",
#   OpenGVLab/InternVL-Chat-V1-5 "25.5B"; llava-hf/llava-1.5-7b-hf "7.06B" (Vicuna-7B 6.74B +
#   CLIP ViT-L/14-336 0.30B + projector 0.02B).
# Our LLaVA model does not build the last CLIP block (features come from the penultimate one): -12.6M.
PUBLISHED = {
    "internvl2_2b": 2.2e9,
    "internvl2_8b": 8.1e9,
    "internvl_chat_v1_5": 25.5e9,
    "llava_1_5_7b": 7.06e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    cfg = load(name)
    assert cfg.name == name
    with torch.device("meta"):
        model = VLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - PUBLISHED[name]) / PUBLISHED[name] < 0.01, f"{name}: {total / 1e9:.3f}B"
    expected_tpt = 576 if name.startswith("llava") else 256
    assert cfg.tokens_per_tile == expected_tpt
