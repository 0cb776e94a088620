"""Chat-format data (``dataset=chat``): rows in the formats datasets are released in read as the same samples,
bad rows named by file and line, and ``omnibal-train`` on a chat JSONL with the tokenizer's own template."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from omnibal_pl.batch import IGNORE_INDEX
from omnibal_pl.cli.train import train
from omnibal_pl.data import LlavaDataset, read_annotation
from omnibal_pl.data.templates import load_tokenizer
from omnibal_pl.errors import DataError
from tests.helpers import (LLAVA_TEMPLATE, LLAVA_TILING, assert_stats_equal_samples, cfg_of, conversation, make_image, make_tokenizer, write_json,
                           write_jsonl)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def as_messages(conv: list[dict], image_parts: list[str] | None = None) -> list[dict]:
    """A LLaVA conversation as OpenAI-style messages; ``image_parts``: the first turn's images as content parts
    (with their paths) instead of ``<image>`` placeholders."""
    role = {"human": "user", "gpt": "assistant"}
    out = [{"role": role[t["from"]], "content": t["value"]} for t in conv]
    if image_parts is not None:
        text = out[0]["content"].replace("<image>\n", "\n")
        out[0]["content"] = [{"type": "image", "image": p} for p in image_parts] + [{"type": "text", "text": text}]
    return out


def test_every_row_format_gives_the_same_sample(tmp_path):
    """LLaVA {from, value} with `image`, OpenAI {role, content} with `images`, and content parts naming their images:
    the same ids, labels and pixels."""
    make_image(tmp_path / "a.png", 40, 30)
    make_image(tmp_path / "b.png", 30, 90, (10, 200, 30))
    conv = conversation(images=2)
    rows = [{"id": "llava", "image": ["a.png", "b.png"], "conversations": conv},
            {"id": "openai", "images": ["a.png", "b.png"], "messages": as_messages(conv)},
            {"id": "parts", "messages": as_messages(conv, image_parts=["a.png", "b.png"])}]
    tok = load_tokenizer(make_tokenizer(tmp_path / "tok"))
    ds = LlavaDataset(write_jsonl(tmp_path / "rows.jsonl", rows), tok, LLAVA_TEMPLATE, LLAVA_TILING)
    first = ds[0]
    assert first.image_flags.tolist() == [1, 1] and (first.labels != IGNORE_INDEX).any()
    for i in (1, 2):
        assert torch.equal(ds[i].input_ids, first.input_ids) and torch.equal(ds[i].labels, first.labels)
        assert torch.equal(ds[i].pixel_values, first.pixel_values)
    assert [r.images for r in ds.records][1:] == [ds.records[0].images] * 2


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}, "rows.jsonl:2: turn 1 has role 'bot'"),
    ({"images": ["a.png"], "messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]}]},
     "rows.jsonl:2: images are named both in the content parts and in 'images'"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, r"rows.jsonl:2: turn 0: content part .* is neither"),
    ({"images": "a.png"}, "rows.jsonl:2: a sample needs 'messages'"),
])
def test_bad_rows_are_named_by_file_and_line(tmp_path, row, message):
    """Refused when the statistics tokenise them (where ``dataset.bad_samples`` chooses error or a counted skip);
    images named twice at once when read."""
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}
    tok = load_tokenizer(make_tokenizer(tmp_path / "tok"))
    with pytest.raises(DataError, match=message):
        LlavaDataset(write_jsonl(tmp_path / "rows.jsonl", [ok, row]), tok, LLAVA_TEMPLATE, LLAVA_TILING).lengths()


def chat_tokenizer_folder(path: Path) -> Path:
    """The word-level test tokenizer as a transformers folder with a ChatML chat template."""
    from transformers import PreTrainedTokenizerFast

    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(make_tokenizer(path / "raw") / "tokenizer.json"))
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<|im_end|>")
    hf.chat_template = CHATML
    hf.save_pretrained(path / "hf")
    return path / "hf"


def chat_rows(root: Path) -> list[dict]:
    """Chat rows over images of several sizes under ``root``: system prompts, image content parts, a tool turn."""
    sizes = [(56, 56), (112, 56), (56, 150), (200, 150), (60, 61)]
    rows = []
    for k, (w, h) in enumerate(sizes):
        make_image(root / f"img{k}.png", w, h, (40 * k, 200 - 30 * k, 90))
        turns = as_messages(conversation("what is this", "a red cat" if k % 2 else "a blue dog"), image_parts=[])
        turns[0]["content"].insert(0, {"type": "image"})  # an image part without its path: the path is in `images`
        rows.append({"id": f"s{k}", "images": [f"img{k}.png"],
                     "messages": [{"role": "system", "content": "describe the image"}, *turns]})
    rows.append({"id": "tool", "messages": [{"role": "user", "content": "hello world"},
                                            {"role": "assistant", "content": "the image"},
                                            {"role": "tool", "content": "red"}, {"role": "assistant", "content": "yes"}]})
    return rows


def test_statistics_from_image_headers_equal_the_samples(tmp_path):
    """What ``omnibal-stats`` computes for chat rows (headers only, in 2 worker processes) is what training reads."""
    from omnibal_pl.data import TemplateConfig, TilingConfig, compute_lengths

    annotation = write_jsonl(tmp_path / "train.jsonl", chat_rows(tmp_path))
    template = TemplateConfig(name="tokenizer", tokens_per_tile=4, image_context_token="<IMG_CONTEXT>",
                              image_start="<img>", image_end="</img>")
    tiling = TilingConfig(mode="internvl", image_size=56, max_tiles=4)
    ds = LlavaDataset(annotation, chat_tokenizer_folder(tmp_path / "tok"), template, tiling)
    table = compute_lengths(ds, num_workers=2, chunk_size=2)
    assert_stats_equal_samples(ds, table)
    assert table.vit.tolist() == [1, 3, 4, 5, 1, 1]  # 1x1, 2x1, 1x3, 2x2 grids (+ a thumbnail beyond one tile); text: 1


def test_train_on_chat_jsonl_with_the_tokenizers_template(tmp_path):
    """``dataset=chat``: 20 balanced steps of the tiny model on a chat JSONL (system prompts, image content parts,
    a tool turn); the loss falls and nothing is lost."""
    annotation = write_jsonl(tmp_path / "data" / "train.jsonl", chat_rows(tmp_path / "data") * 4)
    summary = train(cfg_of(
        "dataset=chat", f"dataset.annotation={annotation}", f"dataset.tokenizer={chat_tokenizer_folder(tmp_path / 'tok')}",
        "dataset.template.tokens_per_tile=4", "dataset.tiling.image_size=56", "dataset.tiling.max_tiles=4",
        "model.image_context_id=7",  # <IMG_CONTEXT> in the test tokenizer
        "balance.dp=1", "balance.vit_cap=8", "balance.token_cap=256", "trainer.max_steps=20", "optim.lr=3e-3",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", f"run_dir={tmp_path / 'run'}"))
    assert summary["steps"] == 20 and summary["loss_end"] < summary["loss_start"] - 0.5
    assert json.loads((tmp_path / "run" / "balance_report.json").read_text())["samples_lost"] == 0


def test_chat_preset_reads_llava_rows_too(tmp_path):
    """The same dataset class reads LLaVA rows: one mechanism for every row format."""
    recs = [{"id": "a", "conversations": conversation(images=0)}]
    rows = read_annotation(write_json(tmp_path / "a.json", recs))
    assert rows[0].conversations[0] == {"role": "user", "content": "what is this"}
    assert [m["role"] for m in rows[0].conversations] == ["user", "assistant", "user", "assistant"]
