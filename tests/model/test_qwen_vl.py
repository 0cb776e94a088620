"""Qwen2-VL and Qwen2.5-VL: logits of a packed batch against transformers, M-RoPE positions, the window
layout, blocks for the pipeline, and the published sizes."""
from dataclasses import replace

import pytest
import torch

from omnibal_pl.errors import DataError
from omnibal_pl.model import VLM, VLMConfig
from omnibal_pl.model.hf_loading import load_hf_model, vlm_config_from_hf
from omnibal_pl.model.qwen_vision import pack_qwen_samples, vision_layout
from omnibal_pl.model.rope import mrope_position_ids

from tests.helpers import model_config, qwen_hf_model, train_on

transformers = pytest.importorskip("transformers")

IMAGE = 7
PATCH_DIM = 3 * 2 * 14 * 14


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qwen_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    model = qwen_hf_model(request.param, IMAGE)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path, model


# sample 0: text, a 4 x 6 patch image, text; sample 1: text, an 8 x 4 image, text, a 2 x 2 image, text
GRIDS = [[(1, 4, 6)], [(1, 8, 4), (1, 2, 2)]]


def sample_ids(grids, texts, seed, image_id=IMAGE):
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for n, grid in zip(texts, [*grids, None]):
        parts.append(torch.randint(10, 96, (n,), generator=gen))
        if grid is not None:
            parts.append(torch.full((grid[0] * grid[1] * grid[2] // 4,), image_id))
    return torch.cat(parts)


def packed_inputs(cfg: VLMConfig, token_cap: int, block_cap: int):
    image = cfg.image_context_id
    ids = [sample_ids(GRIDS[0], [5, 4], 1, image), sample_ids(GRIDS[1], [3, 6, 2], 2, image)]
    gen = torch.Generator().manual_seed(3)
    pixels = [torch.randn(sum(t * h * w for t, h, w in g), PATCH_DIM, generator=gen) for g in GRIDS]
    return ids, pixels, pack_qwen_samples(cfg, ids, pixels, GRIDS, token_cap=token_cap, block_cap=block_cap)


def test_config_is_read_from_config_json(qwen_dir):
    path, hf = qwen_dir
    cfg = vlm_config_from_hf(path)
    assert cfg.vision.family == hf.config.model_type and cfg.projector.kind == "patch_merger"
    assert cfg.llm.mrope_section == [2, 2, 2] and cfg.llm.qkv_bias and cfg.llm.rope_theta == 1e6
    assert cfg.image_context_id == IMAGE and cfg.tokens_per_tile == 1
    if cfg.vision.family == "qwen2_5_vl":
        assert cfg.vision.act == "swiglu" and cfg.vision.window_size == 56 and cfg.vision.full_attention_blocks == [1]


def test_packed_logits_match_transformers(qwen_dir):
    """Two samples of different image sizes packed (with token and patch padding) against transformers run on
    each sample alone, fp32."""
    path, hf = qwen_dir
    ours = load_hf_model(path).eval()
    ids, pixels, batch = packed_inputs(ours.cfg, token_cap=80, block_cap=20)
    with torch.no_grad():
        got = ours(batch)[0]
        bounds = batch.cu_seqlens.tolist()
        for s in range(2):
            token_types = (ids[s] == IMAGE).int()[None]  # 1 = image token, as the processor returns them
            expected = hf(input_ids=ids[s][None], pixel_values=pixels[s], image_grid_thw=torch.tensor(GRIDS[s]),
                          mm_token_type_ids=token_types).logits[0]
            torch.testing.assert_close(got[bounds[s]:bounds[s + 1]], expected, rtol=1e-4, atol=1e-4)


def test_the_hub_layout_loads_too(qwen_dir, tmp_path):
    """The published checkpoints' spelling (transformers 4): text fields at the top of config.json with
    rope_scaling {type: mrope}, tensors ``visual.*``, ``model.layers.*``, ``lm_head.*``."""
    import json

    from safetensors.torch import load_file, save_file

    path, _ = qwen_dir
    config = json.loads((path / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    hub = {**text, **config, "rope_theta": rope["rope_theta"],
           "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
    (tmp_path / "config.json").write_text(json.dumps(hub))
    tensors = load_file(path / "model.safetensors")
    renamed = {k.replace("model.visual.", "visual.").replace("model.language_model.", "model."): v for k, v in tensors.items()}
    assert any(k.startswith("model.layers.") for k in renamed) and any(k.startswith("visual.") for k in renamed)
    save_file(renamed, tmp_path / "model.safetensors")
    assert vlm_config_from_hf(tmp_path) == vlm_config_from_hf(path, name=tmp_path.name)
    ours, reference = load_hf_model(tmp_path).eval(), load_hf_model(path).eval()
    _, _, batch = packed_inputs(ours.cfg, token_cap=80, block_cap=20)
    with torch.no_grad():
        torch.testing.assert_close(ours(batch), reference(batch), rtol=0, atol=0)


def test_mrope_positions_follow_the_image_grid():
    ids = torch.tensor([1, 2, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, 3])  # a 4 x 6 patch image: 2 x 3 tokens
    pos = mrope_position_ids(ids, [(1, 4, 6)], IMAGE, spatial_merge=2)
    assert pos.tolist() == [[0, 1, 2, 2, 2, 2, 2, 2, 5],
                            [0, 1, 2, 2, 2, 3, 3, 3, 5],
                            [0, 1, 2, 3, 4, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="do not match"):
        mrope_position_ids(ids, [(1, 4, 4)], IMAGE, spatial_merge=2)


def test_packed_positions_restart_per_sample():
    cfg = model_config("qwen2_5_vl_tiny")
    ids, _, batch = packed_inputs(cfg, token_cap=80, block_cap=20)
    start = batch.cu_seqlens[1].item()
    torch.testing.assert_close(batch.position_ids[:, start:start + len(ids[1])],
                               mrope_position_ids(ids[1], GRIDS[1], cfg.image_context_id, 2))
    assert batch.position_ids[:, start].tolist() == [0, 0, 0]


def test_window_layout_segments_and_order():
    """A 4 x 6 patch image (2 x 3 merge blocks) in windows of 2 x 2 blocks: windows of 4 and 2 blocks; block
    order 0 1 3 4 | 2 5; then 2 padding blocks in place."""
    layout = vision_layout(((1, 4, 6),), 32, 2, 2, 8, 10000.0, torch.device("cpu"))
    assert layout.image_bounds == (0, 24, 32) and layout.window_bounds == (0, 16, 24, 32)
    assert layout.order.tolist() == [0, 1, 3, 4, 2, 5, 6, 7]
    assert layout.order[layout.restore].tolist() == list(range(8))
    with pytest.raises(DataError, match="need 24 patches"):
        vision_layout(((1, 4, 6),), 20, 2, 2, 8, 10000.0, torch.device("cpu"))


def test_blocks_chain_equals_forward_and_only_real_blocks_reach_the_llm():
    torch.manual_seed(0)
    model = VLM(model_config("qwen2_5_vl_tiny")).eval()
    cfg = model.cfg
    assert [n for n, _ in model.blocks()] == cfg.block_names()
    _, _, batch = packed_inputs(cfg, token_cap=80, block_cap=24)
    x = batch.pixel_values
    with torch.no_grad():
        for _, block in model.blocks():
            x = block(x, batch)
        torch.testing.assert_close(model(batch), x)
        # changing the padding patches changes nothing
        batch.pixel_values[4 * 18:] = torch.randn(4 * 6, PATCH_DIM)
        torch.testing.assert_close(model(batch), x)


# Published totals: Qwen/Qwen2.5-VL-3B-Instruct "3.75B", Qwen/Qwen2.5-VL-7B-Instruct and Qwen/Qwen2-VL-7B-Instruct
# "8.29B" (model cards).
PUBLISHED = {"qwen2_5_vl_3b": 3.75e9, "qwen2_5_vl_7b": 8.29e9, "qwen2_vl_7b": 8.29e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    cfg = model_config(name)
    with torch.device("meta"):
        model = VLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - PUBLISHED[name]) / PUBLISHED[name] < 0.005, f"{name}: {total / 1e9:.4f}B"
    assert cfg.llm.mrope_section == [16, 24, 24] and cfg.image_context_id == 151655
    if cfg.vision.family == "qwen2_5_vl":
        assert cfg.vision.full_attention_blocks == [7, 15, 23, 31] and cfg.vision.window_size == 112


def test_pipeline_stages_and_recompute_give_the_whole_models_outputs_and_gradients():
    """Stages built as the pipeline builds them (meta model, foreign blocks deleted, filled by name), cut
    inside the vision encoder and inside the LLM, with full and attention-only recompute: the chained stages
    compute the whole model's logits and gradients."""
    from omnibal_pl.parallel import build_stage, initial_state_dict

    from tests.helpers import plan_of

    cfg = model_config("qwen2_5_vl_tiny")
    names = cfg.block_names()
    cut_vision, cut_llm = names.index("vision.blocks.2"), names.index("llm.layers.1")
    stages = [names[:cut_vision], names[cut_vision:cut_llm], names[cut_llm:]]
    recompute = {"vision.blocks.0": "full", "vision.blocks.1": "attention", "vision.blocks.3": "attention",
                 "llm.layers.0": "full"}
    plan = plan_of(cfg, stages, recompute, pp=3, micro_batches=3)
    state = initial_state_dict(cfg, seed=0)
    whole = VLM(cfg)
    whole.load_state_dict(state)
    _, _, batch = packed_inputs(cfg, token_cap=80, block_cap=20)
    expected = whole(batch)
    expected.square().mean().backward()
    x = batch.pixel_values
    parts = [build_stage(cfg, plan, s, "cpu", state) for s in range(3)]
    for part in parts:
        part.micro_batches = [batch]
        x = part(x, torch.tensor(0))
    torch.testing.assert_close(x, expected)
    x.square().mean().backward()
    grads = {n: p.grad for part in parts for n, p in part.model.named_parameters()}
    assert grads.keys() == {n for n, _ in whole.named_parameters()}
    for name, p in whole.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


@pytest.mark.parametrize("window_size", [56, 0])  # Qwen2.5's windows with full blocks 1 and 3; Qwen2's full blocks
def test_block_flops_count_what_the_qwen_blocks_run(window_size):
    """vision.embed (2-frame patches), a vision block's linear layers (gated MLP: 3 matrices) and the merger
    (4w x 4w, then 4w x hidden) against torch's FLOP counter; and each vision block's attention core (SDPA's
    math path on CPU runs as bmm) over its segments: whole images in full-attention blocks, windows cut at
    the image edges in windowed ones, and the padding blocks as one segment."""
    from torch.utils.flop_counter import FlopCounterMode

    from omnibal_pl.model.flops import attention_forward_flops, block_forward_flops, block_kind, part_forward_flops

    cfg = model_config("qwen2_5_vl_tiny")
    cfg = replace(cfg, vision=replace(cfg.vision, window_size=window_size))
    model = VLM(cfg).eval()
    _, _, batch = packed_inputs(cfg, token_cap=80, block_cap=20)
    x = batch.pixel_values
    attention, vision_counted = [], 0
    with torch.no_grad():
        for name, block in model.blocks():
            kind = block_kind(name)
            with FlopCounterMode(display=False) as counter:
                out = block(x, batch)
            x = out
            if kind not in ("vision_embed", "vision_block", "projector"):
                continue
            flops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
            vision_counted += sum(flops.values()) if kind != "projector" else 0
            index = int(name.rsplit(".", 1)[1]) if kind == "vision_block" else 0
            attn = attention_forward_flops(cfg, kind, 20, [80], batch.image_grids, index)
            assert flops.get("aten.bmm", 0) == attn, name
            assert flops.get("aten.mm", 0) + flops.get("aten.addmm", 0) == \
                block_forward_flops(cfg, kind, 20, [80], batch.image_grids, index) - attn, name
            if kind == "vision_block":
                attention.append(attn)
    # images of 4x6, 8x4 and 2x2 patches (2x3, 4x2 and 1x1 blocks), then 5 padding blocks (20 patches); windows of
    # 2x2 blocks cut the first image into 2x2 + 2x1 blocks and the second into two 2x2
    full = 4 * cfg.vision.width * (24**2 + 32**2 + 4**2 + 20**2)
    windowed = 4 * cfg.vision.width * (16**2 + 8**2 + 2 * 16**2 + 4**2 + 20**2)
    assert attention == ([windowed, full, windowed, full] if window_size else [full] * 4)
    assert part_forward_flops(cfg, "vision", 20, [80], batch.image_grids) == vision_counted  # the part: every block


def test_dynamic_resolution_matches_qwens_resize_rule():
    """Grid and token count from the image size alone equal transformers' smart_resize, over sizes from tiny
    (upscaled to min_pixels) to huge (downscaled to max_pixels), with half-way roundings."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from omnibal_pl.image_grid import MAX_PIXELS, MIN_PIXELS, image_grid, image_tokens, resized_size

    sizes = [(1, 1), (10, 30), (27, 29), (42, 42), (70, 98), (224, 224), (336, 500), (480, 640), (1080, 1920),
             (4000, 3000), (14, 2000), (700, 130)]
    for h, w in sizes:
        assert resized_size(h, w) == smart_resize(h, w, 28, MIN_PIXELS, MAX_PIXELS), (h, w)
        rh, rw = smart_resize(h, w, 28, MIN_PIXELS, MAX_PIXELS)
        assert image_grid(h, w) == (1, rh // 14, rw // 14)
        assert image_tokens(h, w) == rh * rw // 28**2
    assert image_tokens(448, 448, min_pixels=256 * 28 * 28, max_pixels=256 * 28 * 28) == 256
    with pytest.raises(DataError, match="aspect ratio"):
        resized_size(10, 2500)
    with pytest.raises(DataError, match="no pixels"):
        resized_size(0, 10)


def test_the_tiny_model_learns_a_packed_batch_with_and_without_lora():
    from omnibal_pl.model.lora import is_adapter_param

    for adapter in ({"kind": "none"}, {"kind": "lora", "r": 4, "targets": ["llm.layers.*.*.*", "vision.blocks.*.attn.qkv"]}):
        data = model_config("qwen2_5_vl_tiny").to_dict()
        data.update(attention_backend="sdpa", adapter=adapter)
        torch.manual_seed(0)
        model = VLM(VLMConfig.from_dict(data))
        _, _, batch = packed_inputs(model.cfg, token_cap=80, block_cap=20)
        losses = train_on(model, batch, 15)
        assert losses[-1] < losses[0] - 1.0, (adapter["kind"], losses)
        if adapter["kind"] == "lora":  # gradients reached the vision adapters through the merger and the LLM
            grads = {n: p.grad for n, p in model.named_parameters() if is_adapter_param(n)}
            assert grads["vision.blocks.0.attn.qkv.lora_a"].abs().sum() > 0


def test_a_tile_batch_is_a_named_error():
    from omnibal_pl.model import dummy_batch

    tiles = dummy_batch(model_config("tiny"), [5], [1])  # fixed-size tiles, as a tiling dataset makes them
    with pytest.raises(DataError, match=r"wants Qwen patches \[P, 1176\]"):
        VLM(model_config("qwen2_5_vl_tiny"))(tiles)


def test_planned_images_are_near_square_and_hold_exactly_their_blocks():
    from omnibal_pl.model.flops import square_grids

    assert square_grids([6, 7, 1, 0], merge=2) == [(1, 4, 6), (1, 6, 4), (1, 2, 2), (1, 2, 2)]
    for n in range(1, 300):
        grids = square_grids([n], merge=2)
        assert sum(t * h * w for t, h, w in grids) == 4 * n
        assert grids[0][1] <= grids[0][2] + 2 * 2  # near-square: sides within a block or so of each other
