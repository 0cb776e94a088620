"""The Qwen2-VL / Qwen2.5-VL data path: patches equal to transformers' image processor, samples whose tiles are
merge blocks (counted from image headers alone), ChatML with Qwen's vision tokens, the packing collate's
QwenPackedBatch (M-RoPE positions restarting per sample, logits equal to pack_qwen_samples'), and the
dataset-versus-model check."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from omnibal_pl.data import LlavaDataset, TemplateConfig, TilingConfig
from omnibal_pl.data.collate import PackingCollate
from omnibal_pl.data.skips import DroppedSample
from omnibal_pl.data.tiling import count_tiles, dummy_tiles, tile_image
from omnibal_pl.data.training_data import ModelSpec, check_fits_model
from omnibal_pl.errors import ConfigError
from omnibal_pl.image_grid import image_tokens
from omnibal_pl.model import VLM, VLMConfig
from omnibal_pl.model.qwen_vision import pack_qwen_samples
from omnibal_pl.qwen_batch import QwenPackedBatch, mrope_position_ids

from tests.data.golden_tokenizers import qwen_vl_byte_level_bpe, qwen_vl_tokenizer_folder
from tests.helpers import conversation, model_config, write_jsonl

transformers = pytest.importorskip("transformers")

MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 24  # at most 24 merge blocks per image: small batches
QWEN_TILING = TilingConfig(mode="qwen", image_size=28, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
QWEN_TEMPLATE = TemplateConfig(name="qwen2_vl", tokens_per_tile=1, image_context_token="<|image_pad|>")
SIZES = [(90, 50), (37, 120), (200, 150), (60, 61)]  # (width, height): every one resized, two clamped by max_pixels


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """Random pixels: any change of patch order or resampling changes the patch values."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def qwen_data(tmp_path_factory):
    """A LLaVA JSONL over noise images of several sizes (one text-only and one two-image sample among them), the
    byte-level tokenizer with Qwen's vision tokens, and the dataset."""
    root = tmp_path_factory.mktemp("qwen_data")
    rows = []
    for k, (w, h) in enumerate(SIZES):
        noise_image(w, h, k).save(root / f"img{k}.png")
        rows.append({"id": f"s{k}", "image": f"img{k}.png", "conversations": conversation()})
    rows.append({"id": "text", "conversations": conversation("hello world", "yes", images=0)})
    rows.append({"id": "multi", "image": ["img0.png", "img1.png"], "conversations": conversation("compare", "no", images=2)})
    annotation = write_jsonl(root / "train.jsonl", rows)
    qwen_vl_byte_level_bpe().save(str(root / "tokenizer.json"))
    dataset = LlavaDataset(annotation, root / "tokenizer.json", QWEN_TEMPLATE, QWEN_TILING)
    return root, dataset


def processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, temporal_patch_size=2,
                                    merge_size=2)


def test_patches_equal_qwens_image_processor():
    """Two images of different sizes: grids and every patch value as transformers' Qwen2VLImageProcessor makes them
    (bicubic resize, CLIP normalisation, the frame repeated, merge blocks' patches consecutive)."""
    images = [noise_image(90, 50, 0), noise_image(300, 170, 1)]
    expected = processor()(images=images, return_tensors="pt")
    ours = [tile_image(im, QWEN_TILING) for im in images]
    grids = [(1, 4, 6), (1, 6, 12)]  # 84 x 56 px; 300 x 170 px scaled down into max_pixels: 168 x 84
    assert expected["image_grid_thw"].tolist() == [list(g) for g in grids]
    assert [o.shape for o in ours] == [(6, 4, 1176), (18, 4, 1176)]  # merge blocks of 4 patch rows
    assert [count_tiles(im.width, im.height, QWEN_TILING) for im in images] == [6, 18]
    torch.testing.assert_close(torch.cat([o.flatten(0, 1) for o in ours]), expected["pixel_values"], rtol=0, atol=1e-5)


def test_samples_are_merge_blocks_counted_from_headers(qwen_data):
    _, dataset = qwen_data
    lengths = dataset.lengths()
    tok = dataset.chat.tokenizer
    pad, start, end = (tok.token_id(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
    for i, (w, h) in enumerate(SIZES):
        sample = dataset[i]
        blocks = image_tokens(h, w, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        assert sample.num_tiles == lengths.vit[i] == blocks and sample.pixel_values.shape[1:] == (4, 1176)
        t, gh, gw = sample.image_grids[0]
        assert len(sample.image_grids) == 1 and t * gh * gw == 4 * blocks
        ids = sample.input_ids.tolist()
        assert ids.count(pad) == blocks and lengths.tokens[i] == len(ids)
        first = ids.index(start)
        assert ids[first + 1: first + 1 + blocks] == [pad] * blocks and ids[first + 1 + blocks] == end
    text = dataset[len(SIZES)]
    assert text.image_grids == () and text.image_flags.tolist() == [0] and lengths.vit[len(SIZES)] == 1
    multi = dataset[len(SIZES) + 1]
    assert multi.image_grids == dataset[0].image_grids + dataset[1].image_grids
    assert multi.num_tiles == lengths.vit[0] + lengths.vit[1]


def test_the_chat_format_is_qwens_chatml(qwen_data):
    """The rendering of a one-image sample, and the supervised text: each reply with its closing ``<|im_end|>\\n``."""
    _, dataset = qwen_data
    sample = dataset[0]
    tok = dataset.chat.tokenizer.backend
    image = "<|vision_start|>" + "<|image_pad|>" * sample.num_tiles + "<|vision_end|>"
    assert tok.decode(sample.input_ids.tolist(), skip_special_tokens=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{image}\nwhat is this<|im_end|>\n<|im_start|>assistant\na red cat<|im_end|>\n"
        "<|im_start|>user\ndescribe it<|im_end|>\n<|im_start|>assistant\nthe cat is red and the dog is blue<|im_end|>\n")
    supervised = sample.labels[sample.labels != -100].tolist()
    assert tok.decode(supervised, skip_special_tokens=False) == \
        "a red cat<|im_end|>\nthe cat is red and the dog is blue<|im_end|>\n"


def tiny_qwen(dataset) -> VLM:
    """qwen2_5_vl_tiny with the test tokenizer's vocabulary and image token."""
    data = model_config("qwen2_5_vl_tiny").to_dict()
    data["llm"]["vocab_size"] = len(dataset.chat.tokenizer)
    data.update(image_context_id=dataset.chat.image_context_id, attention_backend="sdpa")
    torch.manual_seed(0)
    return VLM(VLMConfig.from_dict(data)).eval()


def test_collate_packs_a_qwen_batch_with_restarting_positions(qwen_data):
    _, dataset = qwen_data
    samples = [dataset[i] for i in (0, 4, 5)]  # image, text only (a dummy block), two images
    context = dataset.chat.image_context_id
    blocks = sum(s.num_tiles for s in samples) - 1
    collate = PackingCollate(token_cap=500, vit_cap=blocks + 3, image_context_id=context, tokens_per_tile=1,
                             spatial_merge=2)
    batch = collate(samples)
    assert isinstance(batch, QwenPackedBatch)
    assert batch.pixel_values.shape == (4 * (blocks + 3), 1176) and batch.num_tiles == blocks
    assert batch.image_flags.tolist() == [1] * blocks + [0] * 3  # the text sample's dummy block is left out
    assert batch.image_grids == samples[0].image_grids + samples[2].image_grids
    real = torch.cat([samples[0].pixel_values, samples[2].pixel_values]).flatten(0, 1)
    torch.testing.assert_close(batch.pixel_values[: 4 * blocks], real, rtol=0, atol=0)
    bounds = batch.cu_seqlens.tolist()
    for k, s in enumerate(samples):
        torch.testing.assert_close(batch.position_ids[:, bounds[k]:bounds[k + 1]],
                                   mrope_position_ids(s.input_ids, s.image_grids, context, 2))
    assert batch.position_ids.shape == (3, 500) and batch.position_ids[:, bounds[-2]].tolist() == [0, 0, 0]
    moved = batch.to("cpu")  # what the training step and the pipeline do to every micro-batch
    assert isinstance(moved, QwenPackedBatch) and moved.image_grids == batch.image_grids
    assert torch.equal(moved.position_ids, batch.position_ids)


def test_collated_logits_equal_pack_qwen_samples(qwen_data):
    """The collate's batch and pack_qwen_samples' of the same samples give the same logits (the samples' text,
    patches and grids reach the model the same way)."""
    _, dataset = qwen_data
    model = tiny_qwen(dataset)
    samples = [dataset[i] for i in (1, 5, 3)]
    blocks = sum(s.num_tiles for s in samples)
    collated = PackingCollate(token_cap=520, vit_cap=blocks + 2, image_context_id=model.cfg.image_context_id,
                              tokens_per_tile=1, spatial_merge=2)(samples)
    packed = pack_qwen_samples(model.cfg, [s.input_ids for s in samples], [s.pixel_values.flatten(0, 1) for s in samples],
                               [s.image_grids for s in samples], token_cap=520, block_cap=blocks + 2)
    with torch.no_grad():
        torch.testing.assert_close(model(collated), model(packed), rtol=0, atol=0)


def test_a_group_whose_every_sample_was_dropped_is_a_padding_only_qwen_batch_the_model_runs(qwen_data):
    """Under dataset.bad_samples=skip every DP rank still runs the step: the group becomes padding blocks and one
    padding segment, nothing supervised, the drops counted (before, a Qwen group of nothing else was an error)."""
    _, dataset = qwen_data
    model = tiny_qwen(dataset)
    dummy = dummy_tiles(1, dataset.tiling)
    collate = PackingCollate(token_cap=64, vit_cap=6, image_context_id=model.cfg.image_context_id, tokens_per_tile=1,
                             spatial_merge=2)
    batch = collate([DroppedSample(3, "unreadable_image", dummy), DroppedSample(8, "missing_image", dummy)])
    assert isinstance(batch, QwenPackedBatch) and batch.image_grids == () and batch.num_samples == 0
    assert batch.pixel_values.shape == (4 * 6, dummy.shape[-1]) and batch.image_flags.tolist() == [0] * 6
    assert batch.seqlens == (64,) and batch.position_ids.tolist() == [list(range(64))] * 3
    assert batch.skipped == {"unreadable_image": 1, "missing_image": 1} and float(batch.loss_weight.sum()) == 0
    with torch.no_grad():
        assert model(batch).shape[1] == 64


def test_a_dataset_that_does_not_fit_the_model_family_is_a_named_error():
    qwen = ModelSpec(vocab_size=440, image_size=28, tokens_per_tile=1, image_context_id=439, family="qwen2_5_vl")
    vit = ModelSpec(vocab_size=440, image_size=28, tokens_per_tile=4, image_context_id=7)
    node = {"name": "llava_qwen", "tiling": {"mode": "qwen", "image_size": 28}, "template": {"tokens_per_tile": 1}}
    check_fits_model(node, qwen)
    with pytest.raises(ConfigError, match=r"dataset.tiling.mode='llava' does not fit .* 'qwen2_5_vl'"):
        check_fits_model({**node, "tiling": {"mode": "llava", "image_size": 28}}, qwen)
    with pytest.raises(ConfigError, match=r"dataset.tiling.mode='qwen' does not fit .* 'vit'"):
        check_fits_model(node, vit)
    with pytest.raises(ConfigError, match=r"dataset.tiling.image_size=336"):
        check_fits_model({**node, "tiling": {"mode": "qwen", "image_size": 336}}, qwen)
    with pytest.raises(ConfigError, match=r"dataset.template.tokens_per_tile=256"):
        check_fits_model({**node, "template": {}}, qwen)
    with pytest.raises(ConfigError, match="synthetic"):
        check_fits_model({"name": "synthetic_small", "kind": "synthetic"}, qwen)


def test_hand_format_ids_equal_a_qwen_style_chat_template(qwen_data, tmp_path):
    """The same rows through the hand format ``qwen2_vl`` and through the tokenizer's own Qwen2-VL-style chat
    template (``template.name: tokenizer``): identical ids; the labels differ only on the newline after each
    reply's ``<|im_end|>``, which the hand format supervises (as Qwen's fine-tuning code) and the template path
    does not."""
    root, hand = qwen_data
    folder = qwen_vl_tokenizer_folder(tmp_path / "tok")
    own = LlavaDataset(root / "train.jsonl", folder, TemplateConfig(name="tokenizer", tokens_per_tile=1,
                                                                   image_context_token="<|image_pad|>"), QWEN_TILING)
    newline, im_end = hand.chat.tokenizer.encode("\n"), hand.chat.tokenizer.token_id("<|im_end|>")
    for i in range(len(own)):
        a, b = hand[i], own[i]
        assert torch.equal(a.input_ids, b.input_ids), i
        differ = (a.labels != b.labels).nonzero().flatten().tolist()
        assert differ and all(a.input_ids[j].tolist() == newline[0] and a.input_ids[j - 1] == im_end for j in differ), i
        assert all(b.labels[j] == -100 for j in differ)


def test_statistics_in_worker_processes_equal_the_samples(qwen_data):
    """``omnibal-stats``' parallel path (2 processes, image headers only) counts what training reads."""
    from omnibal_pl.data import compute_lengths

    _, dataset = qwen_data
    table = compute_lengths(dataset, num_workers=2, chunk_size=2)
    samples = [dataset[i] for i in range(len(dataset))]
    assert table.vit.tolist() == [s.num_tiles for s in samples]  # merge blocks (a text-only sample: its dummy)
    assert table.image_flag.tolist() == [int(s.image_flags.sum()) for s in samples]
    assert table.tokens.tolist() == [s.num_tokens for s in samples]


def test_unpadded_qwen_batches_hold_only_their_blocks(qwen_data):
    """``pad_to: none`` (data-parallel runs): an image group has exactly its merge blocks, a text-only group one
    dummy block (the encoder still runs)."""
    _, dataset = qwen_data
    collate = PackingCollate(token_cap=500, vit_cap=64, pad_to="none", image_context_id=dataset.chat.image_context_id,
                             tokens_per_tile=1, spatial_merge=2)
    images = collate([dataset[0], dataset[2]])
    blocks = dataset[0].num_tiles + dataset[2].num_tiles
    assert images.image_flags.tolist() == [1] * blocks and images.pixel_values.shape == (4 * blocks, 1176)
    assert images.input_ids.shape[1] == dataset[0].num_tokens + dataset[2].num_tokens
    text = collate([dataset[4]])
    assert text.image_flags.tolist() == [0] and text.pixel_values.shape == (4, 1176) and text.image_grids == ()


def test_the_data_path_gives_transformers_logits(qwen_data, tmp_path):
    """End to end against transformers: our samples (dataset=llava_qwen) packed by the collate through our model
    loaded from a small random Qwen2.5-VL checkpoint, against transformers' model on the same token ids with its
    own image processor's pixels, sample by sample (fp32, 1e-4)."""
    from omnibal_pl.model.hf_loading import load_hf_model

    root, dataset = qwen_data
    tok = dataset.chat.tokenizer
    ids = dict(image_token_id=tok.token_id("<|image_pad|>"), vision_start_token_id=tok.token_id("<|vision_start|>"),
               vision_end_token_id=tok.token_id("<|vision_end|>"), video_token_id=tok.token_id("<|im_start|>"))
    text = dict(vocab_size=len(tok), hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 2, 2]})
    vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=40, out_hidden_size=48, window_size=56,
                  fullatt_block_indexes=[1])
    torch.manual_seed(0)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(
        transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_model(tmp_path / "hf").eval()
    rows = (0, 5, 1)  # one image, two images, one image
    samples = [dataset[i] for i in rows]
    blocks = sum(s.num_tiles for s in samples)
    batch = PackingCollate(token_cap=600, vit_cap=blocks + 4, image_context_id=ours.cfg.image_context_id,
                           tokens_per_tile=1, spatial_merge=2)(samples)
    bounds = batch.cu_seqlens.tolist()
    with torch.no_grad():
        got = ours(batch)[0]
        for k, i in enumerate(rows):
            images = [Image.open(p).convert("RGB") for p in dataset.records[i].images]
            pixels = processor()(images=images, return_tensors="pt")
            s = samples[k].input_ids[None]
            expected = hf(input_ids=s, pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"],
                          mm_token_type_ids=(s == ids["image_token_id"]).int()).logits[0]
            torch.testing.assert_close(got[bounds[k]:bounds[k + 1]], expected, rtol=1e-4, atol=1e-4)


def test_an_image_qwen_cannot_take_is_a_bad_sample_naming_its_file(tmp_path):
    """More than 200 times longer than wide: refused by Qwen's resize rule as a bad sample naming the record and the
    file, with the reason ``bad_samples=skip`` counts it under."""
    from omnibal_pl.data.skips import BadSampleError

    Image.new("RGB", (3000, 10)).save(tmp_path / "strip.png")
    Image.new("RGB", (60, 40)).save(tmp_path / "ok.png")
    rows = [{"id": "ok", "image": "ok.png", "conversations": conversation()},
            {"id": "strip", "image": "strip.png", "conversations": conversation()}]
    qwen_vl_byte_level_bpe().save(str(tmp_path / "tokenizer.json"))
    dataset = LlavaDataset(write_jsonl(tmp_path / "train.jsonl", rows), tmp_path / "tokenizer.json", QWEN_TEMPLATE, QWEN_TILING)
    with pytest.raises(BadSampleError, match=r"train.jsonl:2: image file .*strip.png: image of 3000 x 10 px: aspect ratio 300") as e:
        dataset.lengths()
    assert e.value.reason == "unusable_image"
