"""Loading Hugging Face checkpoints: LLaVA parity against transformers, InternVL-Chat round trip."""
import json

import pytest
import torch

from omnibal_pl.errors import ConfigError
from omnibal_pl.model import VLMConfig, dummy_batch
from omnibal_pl.model.hf_loading import Layout, load_hf_model, to_hf_state_dict, vlm_config_from_hf

from tests.helpers import internvl_model, write_internvl_checkpoint

transformers = pytest.importorskip("transformers")

IMAGE_TOKEN = 100


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    """A tiny random LlavaForConditionalGeneration saved in several safetensors shards."""
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        image_size=56, patch_size=14, projection_dim=16,
    )
    text = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
    )
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random non-trivial norms and biases, so a mapping mistake shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "class_embedding" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("llava")
    model.save_pretrained(path, max_shard_size="100KB")
    assert len(list(path.glob("*.safetensors"))) > 1 and (path / "model.safetensors.index.json").exists()
    return path, model


def test_llava_config_is_read_from_config_json(llava_dir):
    path, _ = llava_dir
    cfg = vlm_config_from_hf(path)
    assert cfg.vision.select_layer == -2 and cfg.vision.num_blocks == 2
    assert cfg.vision.act == "quick_gelu" and cfg.vision.embed_norm and not cfg.vision.layerscale
    assert cfg.projector.kind == "mlp2x_gelu" and cfg.tokens_per_tile == 16
    assert (cfg.llm.hidden, cfg.llm.kv_heads, cfg.llm.rms_eps) == (64, 2, 1e-5)
    assert cfg.image_context_id == IMAGE_TOKEN


def test_llava_logits_match_transformers(llava_dir):
    path, hf = llava_dir
    ours = load_hf_model(path).eval()
    batch = dummy_batch(ours.cfg, [23], [2], seed=3)  # one sample, two image tiles
    with torch.no_grad():
        expected = hf(input_ids=batch.input_ids, pixel_values=batch.pixel_values).logits
        got = ours(batch)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("llm_arch", ["InternLM2ForCausalLM", "Qwen2ForCausalLM"])
def test_internvl_round_trip(tmp_path, llm_arch):
    model = internvl_model(llm_arch)
    layout = write_internvl_checkpoint(model, tmp_path, llm_arch)
    state = to_hf_state_dict(model, layout)
    if layout.llm == "internlm2":
        assert "language_model.model.layers.1.attention.wqkv.weight" in state
        assert "language_model.output.weight" in state
    else:
        assert "language_model.model.layers.1.self_attn.q_proj.bias" in state
    assert "mlp1.0.weight" in state and "vision_model.encoder.layers.2.attn.q_norm.weight" in state

    loaded = load_hf_model(tmp_path).eval()
    assert loaded.cfg == VLMConfig.from_dict({**model.cfg.to_dict(), "name": tmp_path.name})
    ours, theirs = dict(model.named_parameters()), dict(loaded.named_parameters())
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], rtol=0, atol=0, msg=name)
    batch = dummy_batch(model.cfg, [6, 9], [1, 2], token_cap=64, vit_cap=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), model(batch))


def test_internlm2_wqkv_grouping_matches_the_reference_rearrange():
    """Row layout of wqkv: per kv head, its query heads then its key then its value (InternLM2's einops split)."""
    model = internvl_model("InternLM2ForCausalLM")
    t = model.cfg.llm
    wqkv = to_hf_state_dict(model, Layout("internvit", "internlm2"))["language_model.model.layers.0.attention.wqkv.weight"]
    x = torch.randn(5, t.hidden)
    groups = t.heads // t.kv_heads
    qkv = (x @ wqkv.T).view(5, t.kv_heads, groups + 2, t.head_dim)
    layer = model.llm.layers["0"].attn
    torch.testing.assert_close(qkv[:, :, :groups].reshape(5, -1), layer.q(x))
    torch.testing.assert_close(qkv[:, :, -2].reshape(5, -1), layer.k(x))
    torch.testing.assert_close(qkv[:, :, -1].reshape(5, -1), layer.v(x))


def test_missing_and_unexpected_keys_are_named(tmp_path):
    model = internvl_model("InternLM2ForCausalLM")
    write_internvl_checkpoint(model, tmp_path, "InternLM2ForCausalLM", shards=1)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    del index["weight_map"]["mlp1.1.bias"]
    index["weight_map"]["language_model.model.extra.weight"] = next(iter(index["weight_map"].values()))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"missing keys \['mlp1.1.bias'\].*unexpected keys \['language_model.model.extra.weight'\]"):
        load_hf_model(tmp_path)


def test_unknown_model_type_and_missing_token_id(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip"}))
    with pytest.raises(ConfigError, match="model_type 'blip' is not supported"):
        vlm_config_from_hf(tmp_path)
    model = internvl_model("InternLM2ForCausalLM")
    write_internvl_checkpoint(model, tmp_path, "InternLM2ForCausalLM", shards=1)
    (tmp_path / "added_tokens.json").unlink()
    with pytest.raises(ConfigError, match="image-context token id"):
        vlm_config_from_hf(tmp_path)
    assert vlm_config_from_hf(tmp_path, image_context_id=7).image_context_id == 7


@pytest.mark.parametrize("grid", [4, 8])
def test_pixel_shuffle_matches_transformers_internvl(grid):
    """Channel order of the pixel shuffle decides whether InternVL's mlp1 weights fit: compare with transformers'."""
    from transformers.models.internvl.modeling_internvl import InternVLModel

    from omnibal_pl.model.projector import pixel_shuffle

    x = torch.randn(3, grid, grid, 5)
    torch.testing.assert_close(pixel_shuffle(x), InternVLModel.pixel_shuffle(None, x, scale_factor=0.5), rtol=0, atol=0)
