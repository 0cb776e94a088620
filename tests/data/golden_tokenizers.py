"""Whitespace-sensitive BPE tokenizers built in the tests, shaped like the ones the real checkpoints ship.

- :func:`sentencepiece_bpe`: SentencePiece-style, spaces become ``▁``, unknown characters fall back to
  ``<0xNN>`` byte tokens, ``<s>`` is added in front. ``prefix="every"`` also prepends ``▁`` to every
  piece of text between special tokens, as LLaMA's (legacy) tokenizer does; ``"first"`` only to a piece
  that starts the input (``Metaspace(prepend_scheme="first")``, as newer LLaMA-family tokenizer.json
  files); ``"none"`` never, as InternLM2's.
- :func:`byte_level_bpe`: GPT-2 / Qwen style byte-level BPE (``Ġ`` for a space, ``Ċ`` for a newline),
  no BOS.

Vocabularies are built by hand (no training), so token ids are fixed by construction: special tokens
first, then (SentencePiece) the 256 byte tokens or (byte level) the 256 byte characters, then the base
characters, then one token per merge, each word merged left to right (words with a leading space
first, so they win, as in a trained vocabulary).
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.processors import TemplateProcessing

SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<image>"]
# words the golden conversations use, as the tokenizer sees them (▁ / Ġ for a leading space)
WORDS = ["system", "user", "assistant", "USER", "ASSISTANT", "What", "this", "cat", "red", "Yes", "is", "it",
         "Be", "brief", "Compare", "them", "first", "The", "Name", "color", "Red", "Hi", "there", "Hello"]
ASCII = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:.,?!-'"


def _merges(words: list[str]) -> list[tuple[str, str]]:
    """Left-to-right merges building each word from its characters (shared prefixes merged once)."""
    out: list[tuple[str, str]] = []
    for w in words:
        for k in range(2, len(w) + 1):
            pair = (w[: k - 1], w[k - 1])
            if pair not in out:
                out.append(pair)
    return out


def _bpe(base: list[str], words: list[str], **kw) -> Tokenizer:
    merges = _merges(words)
    vocab: dict[str, int] = {}
    for t in [*SPECIAL, *base, *(a + b for a, b in merges)]:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(BPE(vocab, merges, **kw))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    return tok


def sentencepiece_bpe(prefix: str) -> Tokenizer:
    """SentencePiece-style BPE with ``▁`` and byte fallback; adds ``<s>`` in front of an encoding.

    ``prefix``: where a ``▁`` is prepended to text: ``"every"`` piece, the ``"first"`` or ``"none"``.
    """
    words = ["▁" + w for w in WORDS] + WORDS
    base = [f"<0x{b:02X}>" for b in range(256)] + ["▁"] + list(ASCII)
    tok = _bpe(base, words, unk_token="<unk>", byte_fallback=True)
    if prefix == "first":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        steps = [normalizers.Prepend("▁")] if prefix == "every" else []
        tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


def byte_level_bpe() -> Tokenizer:
    """Byte-level BPE like Qwen's: every byte is a base token, ``Ġ`` marks a space; no BOS."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_char = {b: c for b, c in zip(range(256), sorted(alphabet, key=_byte_of))}
    words = ["Ġ" + w for w in WORDS] + WORDS + ["ĊĊ"]
    tok = _bpe([byte_char[b] for b in range(256)], words)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _byte_of(char: str) -> int:
    """The byte a GPT-2 byte-level character stands for (printable bytes map to themselves)."""
    code = ord(char)
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


QWEN_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]


def qwen_vl_byte_level_bpe() -> Tokenizer:
    """:func:`byte_level_bpe` with Qwen2-VL's vision tokens as special tokens (ids after the vocabulary)."""
    tok = byte_level_bpe()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_VISION_TOKENS])
    return tok


# A chat template written like Qwen2-VL's: a default system turn, image content parts as the vision tokens
QWEN_VL_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qwen_vl_tokenizer_folder(path: Path) -> Path:
    """:func:`qwen_vl_byte_level_bpe` saved as a transformers tokenizer folder with :data:`QWEN_VL_CHAT_TEMPLATE`."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=qwen_vl_byte_level_bpe(), eos_token="<|im_end|>")
    hf.chat_template = QWEN_VL_CHAT_TEMPLATE
    hf.save_pretrained(path)
    return path
