"""InternVL2.5 / InternVL3 (InternViT-300M-448px-V2_5 + MLP projector + Qwen2.5): presets and loading parity.

The reference is transformers' own InternVL (``InternVLForConditionalGeneration``, the "-hf" port of the
same architecture). Its random weights are written under the names of OpenGVLab's remote-code
``InternVLChatModel`` (the layout of the published checkpoints) with that layout's ``config.json``, then
read by :func:`load_hf_model`; a packed batch of two samples must give transformers' logits.
"""
import json

import pytest
import torch
from safetensors.torch import save_file

from omnibal_pl.model import VLM, dummy_batch
from omnibal_pl.model.hf_loading import load_hf_model, vlm_config_from_hf

from tests.helpers import model_config

transformers = pytest.importorskip("transformers")

IMAGE_TOKEN = 7


def remote_code_name(key: str) -> str | None:
    """transformers' InternVL key -> the remote-code name (None for q/k/v, which are fused below)."""
    key = key.removeprefix("model.")
    rules = [("vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
             ("vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding"),
             ("vision_tower.embeddings.patch_embeddings.projection", "vision_model.embeddings.patch_embedding"),
             ("vision_tower.encoder.layer.", "vision_model.encoder.layers."),
             ("attention.projection_layer", "attn.proj"), ("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
             ("lambda_1", "ls1"), ("lambda_2", "ls2"),
             ("multi_modal_projector.layer_norm", "mlp1.0"), ("multi_modal_projector.linear_1", "mlp1.1"),
             ("multi_modal_projector.linear_2", "mlp1.3"),
             ("language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")]
    if ".attention." in key and key.split(".attention.")[1][:6] in ("q_proj", "k_proj", "v_proj"):
        return None
    for old, new in rules:  # in this order: lm_head's new name contains "language_model."
        key = key.replace(old, new, 1)
    return key


def to_remote_code(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {name: t for key, t in state.items() if (name := remote_code_name(key)) is not None}
    for key in state:
        if key.endswith("attention.q_proj.weight") or key.endswith("attention.q_proj.bias"):
            kind = key.rsplit(".", 1)[1]
            prefix = remote_code_name(key.replace(f"q_proj.{kind}", f"projection_layer.{kind}")).rsplit(".proj.", 1)[0]
            out[f"{prefix}.qkv.{kind}"] = torch.cat([state[key.replace("q_proj", n)] for n in ("q_proj", "k_proj", "v_proj")])
    return out


@pytest.fixture(scope="module")
def internvl3_dir(tmp_path_factory):
    """A tiny random transformers InternVL with a Qwen2 LLM, saved in the remote-code layout."""
    torch.manual_seed(0)
    vision = transformers.InternVLVisionConfig(
        hidden_size=40, num_hidden_layers=2, num_attention_heads=5, intermediate_size=80, image_size=56,
        patch_size=14, attention_bias=True, use_qk_norm=False, norm_type="layer_norm", layer_norm_eps=1e-6)
    text = transformers.Qwen2Config(
        vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)
    config = transformers.InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                                         tie_word_embeddings=False)
    model = transformers.InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-trivial norms, biases and layer scales: a mapping mistake shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name or "lambda" in name or "cls_token" in name or "position" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("internvl3")
    save_file({k: v.contiguous() for k, v in to_remote_code(model.state_dict()).items()}, path / "model.safetensors")
    remote_config = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internvl2_5",
        "select_layer": -1, "downsample_ratio": 0.5, "ps_version": "v2", "force_image_size": 56,
        "vision_config": {"architectures": ["InternVisionModel"], "hidden_size": 40, "image_size": 56, "patch_size": 14,
                          "num_hidden_layers": 2, "num_attention_heads": 5, "intermediate_size": 80, "qkv_bias": True,
                          "qk_normalization": False, "norm_type": "layer_norm", "layer_norm_eps": 1e-6},
        "llm_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 96, "hidden_size": 48,
                       "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
                       "intermediate_size": 64, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                       "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"}},
    }
    (path / "config.json").write_text(json.dumps(remote_config))
    (path / "added_tokens.json").write_text(json.dumps({"<IMG_CONTEXT>": IMAGE_TOKEN}))
    return path, model


def test_remote_code_config_reads_as_a_qwen2_5_llm(internvl3_dir):
    path, _ = internvl3_dir
    cfg = vlm_config_from_hf(path)
    assert cfg.llm.qkv_bias and cfg.llm.rope_theta == 1e6 and cfg.llm.rms_eps == 1e-6 and not cfg.llm.tie_embeddings
    assert cfg.vision.norm == "layernorm" and cfg.vision.qkv_bias and not cfg.vision.qk_norm
    assert cfg.image_context_id == IMAGE_TOKEN and cfg.tokens_per_tile == 4


def test_packed_logits_match_transformers_internvl(internvl3_dir):
    """Two samples packed in one sequence (1 and 3 tiles) against transformers run on each sample alone."""
    path, hf = internvl3_dir
    ours = load_hf_model(path).eval()
    batch = dummy_batch(ours.cfg, [9, 14], [1, 3], seed=4)
    with torch.no_grad():
        got = ours(batch)[0]
        bounds = batch.cu_seqlens.tolist()
        tiles = [0, 1, 4]
        for s in range(2):
            ids = batch.input_ids[:, bounds[s]:bounds[s + 1]]
            expected = hf(input_ids=ids, pixel_values=batch.pixel_values[tiles[s]:tiles[s + 1]]).logits[0]
            torch.testing.assert_close(got[bounds[s]:bounds[s + 1]], expected, rtol=1e-4, atol=1e-4)


# Published totals from the Hugging Face model cards: InternVL2_5-1B and InternVL3-1B "938M" (0.9B class),
# InternVL3-8B "7.94B".
PUBLISHED = {"internvl2_5_1b": 0.938e9, "internvl3_1b": 0.938e9, "internvl3_8b": 7.94e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    cfg = model_config(name)
    assert cfg.name == name and cfg.llm.qkv_bias and cfg.llm.rope_theta == 1e6 and cfg.image_context_id == 151667
    with torch.device("meta"):
        model = VLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - PUBLISHED[name]) / PUBLISHED[name] < 0.002, f"{name}: {total / 1e9:.4f}B"
    assert cfg.tokens_per_tile == 256
