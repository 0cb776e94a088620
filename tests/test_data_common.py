"""Shared builders for the data tests: a tiny local tokenizer, small images, annotation files.

Nothing is downloaded: the tokenizer is a word-level ``tokenizers.Tokenizer`` built here.
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from omnibal_pl.data import TemplateConfig, TilingConfig

SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<image>"]
WORDS = ["USER", "ASSISTANT", ":", "system", "user", "assistant", "what", "is", "this", "a", "cat", "dog",
         "describe", "image", "the", "and", "it", "red", "blue", "compare", "hello", "world", "yes", "no"]

# small tiles keep pixel work negligible; the tiling logic is the same at 448 px
TILE = 28
INTERNVL_TILING = TilingConfig(mode="internvl", image_size=TILE, min_tiles=1, max_tiles=6)
LLAVA_TILING = TilingConfig(mode="llava", image_size=TILE, max_tiles=1, use_thumbnail=False)
INTERNVL_TEMPLATE = TemplateConfig(name="internlm2-chat", tokens_per_tile=4, image_context_token="<IMG_CONTEXT>")
LLAVA_TEMPLATE = TemplateConfig(name="vicuna_v1", tokens_per_tile=9, image_context_token="<image>")


def make_tokenizer(folder: Path) -> Path:
    """Writes ``folder/tokenizer.json`` (word level, the special tokens of both templates); returns the folder."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def make_image(path: Path, width: int, height: int, color: tuple[int, int, int] = (200, 30, 90)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), color).save(path)
    return path


def conversation(question: str = "what is this", answer: str = "a red cat", images: int = 1) -> list[dict]:
    return [
        {"from": "human", "value": "<image>\n" * images + question},
        {"from": "gpt", "value": answer},
        {"from": "human", "value": "describe it"},
        {"from": "gpt", "value": "the cat is red and the dog is blue"},
    ]


def llava_records(root: Path) -> list[dict]:
    """Single-image samples of several aspect ratios, a text-only and a multi-image sample; images under root."""
    sizes = [(28, 28), (90, 30), (30, 100), (200, 150), (60, 61)]
    recs = []
    for k, (w, h) in enumerate(sizes):
        make_image(root / f"img{k}.png", w, h)
        recs.append({"id": f"s{k}", "image": f"img{k}.png", "conversations": conversation()})
    recs.append({"id": "text", "conversations": conversation("hello world", "yes", images=0)})
    recs.append({"id": "multi", "image": ["img1.png", "img3.png"], "conversations": conversation("compare", "no", images=2)})
    return recs


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
