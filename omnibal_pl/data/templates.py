"""Chat formats and tokenisation: a conversation becomes ``input_ids`` and ``labels`` as the original
training code makes them.

A conversation is ``[{"from": "human" | "gpt", "value": str}, ...]`` (an optional leading ``"system"``
turn replaces the format's system message). A :class:`ChatFormat` says how turns are written, which text
is supervised (each reply and its end marker; never image tokens), how values and ``<image>``
placeholders are normalised, and which pieces of the prompt are encoded in one tokenizer call:

- ``internlm2-chat`` (InternVL-Chat-V1.5, ``preprocess_internlm``): MPT style with ``<|im_end|>`` as the
  separator and no newline after it; values stripped; the whole prompt encoded at once.
- ``internvl2_5`` (InternVL 2.5, ``preprocess_internvl2_5``): ``<|im_end|>\\n`` after every turn, the
  newline after a reply unsupervised; values kept as written. The original encodes every turn on its
  own; we encode the whole prompt, which gives the same tokens: each turn starts with ``<|im_start|>``,
  so every piece of text lies between special tokens, which a tokenizer splits off before normalising
  and pre-tokenising, and no piece starts the input (where some tokenizers prepend ``▁``) in either.
- ``vicuna_v1`` (LLaVA-1.5, ``preprocess_v1``): ``"{system} USER: {q} ASSISTANT: {a}</s>"``; a turn
  holding ``<image>`` is rewritten as ``<image>\\n`` + its stripped text; the prompt is encoded in the
  pieces between images (``tokenizer_image_token``).

A sample starts with the tokenizer's own BOS where the tokenizer adds one (LLaMA, InternLM2; Qwen adds
none), as the originals' tokenizer calls do. Labels follow the characters: a token is supervised when
every character it covers (from the tokenizer's offsets) belongs to a reply or its end marker. The
first token of a sample is never supervised, so labels can be shifted inside a packed sequence.

The originals place labels by counting the tokens of pieces encoded on their own. Where that count
agrees with the encoding (the usual case, and every golden test) the labels are the same; where it does
not we do not follow it: ``internlm2-chat`` then trains on no token of the sample (InternVL's "tokenization
mismatch", e.g. a tokenizer without BOS); ``internvl2_5`` leaves only the last token of a reply's turn
unsupervised, so a tokenizer writing the closing newline as ``▁`` + ``\\n`` gets the ``▁`` supervised there,
not here. InternVL also supervises the tokens of an image placed inside a reply; image tokens never are here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from omnibal_pl.batch import IGNORE_INDEX
from omnibal_pl.errors import ConfigError, DataError

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class ChatFormat:
    """How one model family writes a conversation.

    ``system``/``user`` are formatted with ``{system}``/``{message}``; ``assistant_prompt`` opens a reply;
    ``reply_start`` and ``assistant_end`` enclose it and are supervised with it; ``after_reply`` follows
    unsupervised.
    ``image_start``/``image_end`` wrap each image's context tokens (empty: no wrapper).
    ``strip_values``: strip every turn's value. ``image_first``: a value holding ``<image>`` becomes
    ``<image>\\n`` (once per placeholder) + the rest stripped. ``insert_image``: a one-image sample without
    a placeholder gets ``<image>\\n`` in front of its first human turn.
    ``split_at_images``: encode the pieces of the prompt between ``<image>`` placeholders one by one and
    place the image tokens between them (LLaVA's ``tokenizer_image_token``); otherwise the whole prompt
    is encoded at once, each image written as its block of special tokens.
    """

    system: str
    user: str
    assistant_prompt: str
    reply_start: str
    assistant_end: str
    after_reply: str
    default_system: str
    image_start: str
    image_end: str
    strip_values: bool
    image_first: bool
    insert_image: bool
    split_at_images: bool


INTERNVL_V15_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
INTERNVL_25_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"

FORMATS: dict[str, ChatFormat] = {
    # "<s><|im_start|>system\n{s}<|im_end|><|im_start|>user\n{q}<|im_end|><|im_start|>assistant\n{a}<|im_end|>..."
    "internlm2-chat": ChatFormat(
        system="<|im_start|>system\n{system}<|im_end|>",
        user="<|im_start|>user\n{message}<|im_end|>",
        assistant_prompt="<|im_start|>assistant\n",
        reply_start="",
        assistant_end="<|im_end|>",
        after_reply="",
        default_system=INTERNVL_V15_SYSTEM,
        image_start="<img>",
        image_end="</img>",
        strip_values=True,
        image_first=False,
        insert_image=True,
        split_at_images=False,
    ),
    # "<|im_start|>system\n{s}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n..."
    "internvl2_5": ChatFormat(
        system="<|im_start|>system\n{system}<|im_end|>\n",
        user="<|im_start|>user\n{message}<|im_end|>\n",
        assistant_prompt="<|im_start|>assistant\n",
        reply_start="",
        assistant_end="<|im_end|>",
        after_reply="\n",
        default_system=INTERNVL_25_SYSTEM,
        image_start="<img>",
        image_end="</img>",
        strip_values=False,
        image_first=False,
        insert_image=True,
        split_at_images=False,
    ),
    # "<s>{s} USER: {q} ASSISTANT: {a}</s>USER: ..."
    "vicuna_v1": ChatFormat(
        system="{system} ",
        user="USER: {message} ",
        assistant_prompt="ASSISTANT:",
        reply_start=" ",  # LLaVA supervises the token holding this space (alone, or merged into the reply's first word)
        assistant_end="</s>",
        after_reply="",
        default_system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        image_start="",
        image_end="",
        strip_values=False,
        image_first=True,
        insert_image=False,
        split_at_images=True,
    ),
}


@dataclass
class TemplateConfig:
    """Which chat format, and how images appear in the token stream.

    ``name``: ``internlm2-chat`` (InternVL-Chat-V1.5), ``internvl2_5`` (InternVL 2.5) or ``vicuna_v1``
    (LLaVA-1.5). ``tokens_per_tile``: LLM tokens per tile (576 for LLaVA-1.5 at 336 px, 256 for InternVL
    at 448 px). ``image_context_token``: the token repeated for image features; must be one token of the
    tokenizer. ``system_message``: overrides the format's default system message when set.
    """

    name: str = "internlm2-chat"
    tokens_per_tile: int = 256
    image_context_token: str = "<IMG_CONTEXT>"
    system_message: str | None = None

    def __post_init__(self) -> None:
        if self.name not in FORMATS:
            raise ConfigError(f"template.name={self.name!r}: expected one of {sorted(FORMATS)}")
        if self.tokens_per_tile < 1:
            raise ConfigError(f"template.tokens_per_tile={self.tokens_per_tile}: must be >= 1")


class TextTokenizer:
    """A thin wrapper over an HF ``tokenizers.Tokenizer`` or ``transformers`` tokenizer.

    ``encode`` never adds special tokens (the chat format places them); ``token_id`` resolves one token;
    ``bos_ids`` are the ids the tokenizer itself puts in front of an encoding (``<s>`` or nothing).
    """

    def __init__(self, backend: Any, origin: str = "tokenizer") -> None:
        self.backend = backend
        self.origin = origin
        self._fast = hasattr(backend, "encode_batch")  # tokenizers.Tokenizer
        self.bos_ids = self._leading_special_ids()

    def encode(self, text: str) -> list[int]:
        return self.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` without special tokens added, and each id's ``(start, end)`` characters in ``text``."""
        if self._fast:
            enc = self.backend.encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets
        try:
            out = self.backend(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError as e:
            raise DataError(f"{self.origin}: a slow (Python) tokenizer gives no character offsets; give its "
                            "tokenizer.json (a fast tokenizer) instead") from e
        return out["input_ids"], [tuple(o) for o in out["offset_mapping"]]

    def token_id(self, token: str) -> int:
        """Id of ``token``; raises :class:`DataError` if the tokenizer does not know it as one token."""
        if self._fast:
            tid = self.backend.token_to_id(token)
        else:
            tid = self.backend.convert_tokens_to_ids(token)
            tid = None if tid == self.backend.unk_token_id and token != self.backend.unk_token else tid
        if tid is None:
            raise DataError(f"{self.origin}: token {token!r} is not in the vocabulary; add it as a special "
                            "token (and resize the model's embeddings) or pick the template that matches this tokenizer")
        return int(tid)

    def fingerprint(self) -> str:
        """The tokenizer's full definition (vocabulary, merges, normalisation, added tokens) as text."""
        if self._fast:
            return self.backend.to_str()
        vocab = sorted(self.backend.get_vocab().items())
        return f"{type(self.backend).__name__}|{vocab}|{self.backend.init_kwargs}"

    def __len__(self) -> int:
        if self._fast:
            return self.backend.get_vocab_size(with_added_tokens=True)
        return len(self.backend)

    def _leading_special_ids(self) -> list[int]:
        probe = "a"
        plain = self.backend.encode(probe, add_special_tokens=False)
        full = self.backend.encode(probe, add_special_tokens=True)
        plain, full = (plain.ids, full.ids) if self._fast else (list(plain), list(full))
        for k in range(len(full) - len(plain) + 1):
            if full[k : k + len(plain)] == plain:
                return list(full[:k])
        raise DataError(f"{self.origin}: cannot tell which special tokens this tokenizer adds ({full} around {plain})")


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """Loads a tokenizer from a local path, never from the hub.

    ``path`` is a ``tokenizer.json`` file or a folder holding one (read with HF ``tokenizers``), or a
    folder that ``transformers.AutoTokenizer`` can read with ``local_files_only=True``.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such tokenizer path; give a tokenizer.json or a local tokenizer folder")
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.is_file():
        from tokenizers import Tokenizer

        try:
            return TextTokenizer(Tokenizer.from_file(str(file)), str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise DataError(f"{file}: cannot read tokenizer ({e})") from e
    from transformers import AutoTokenizer

    try:
        return TextTokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True), str(path))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: transformers cannot load a tokenizer from this folder ({e})") from e


class ChatTokenizer:
    """Turns conversations into (input_ids, labels) for one chat format and tokenizer."""

    def __init__(self, tokenizer: TextTokenizer, cfg: TemplateConfig) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.fmt = FORMATS[cfg.name]
        self.image_context_id = tokenizer.token_id(cfg.image_context_token)
        self._image_start = [tokenizer.token_id(self.fmt.image_start)] if self.fmt.image_start else []
        self._image_end = [tokenizer.token_id(self.fmt.image_end)] if self.fmt.image_end else []
        # what an image is written as in a piece of text tokenised at once: one context token, repeated after
        self._image_text = self.fmt.image_start + cfg.image_context_token + self.fmt.image_end

    @property
    def image_token_ids(self) -> list[int]:
        """Ids that only occur in image blocks (context token and wrappers)."""
        return self._image_start + [self.image_context_id] + self._image_end

    def image_block(self, tiles: int) -> list[int]:
        """Token ids standing for one image of ``tiles`` tiles."""
        return self._image_start + [self.image_context_id] * (self.cfg.tokens_per_tile * tiles) + self._image_end

    def fingerprint(self) -> str:
        """Everything the token counts depend on: the format's definition, the config and the tokenizer."""
        return f"{self.fmt!r}|{self.cfg!r}|{self.tokenizer.fingerprint()}"

    def __call__(self, conversations: Sequence[dict], tiles_per_image: Sequence[int], origin: str) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, labels)``, int64 ``[n]`` each; ``tiles_per_image[k]`` tiles for the k-th ``<image>``.

        Raises :class:`DataError` naming ``origin`` on a malformed conversation or when the number of
        ``<image>`` placeholders differs from the number of images.
        """
        system, turns = self._turns(conversations, len(tiles_per_image), origin)
        fmt = self.fmt
        parts: list[tuple[str, bool]] = [(fmt.system.format(system=system), False)]  # (text, supervised)
        for turn in turns:
            if turn["from"] == "human":
                parts.append((fmt.user.format(message=turn["value"]), False))
            else:
                reply = fmt.reply_start + turn["value"] + fmt.assistant_end
                parts += [(fmt.assistant_prompt, False), (reply, True), (fmt.after_reply, False)]
        text = "".join(t for t, _ in parts)
        chars = np.concatenate([np.full(len(t), s, bool) for t, s in parts])  # per character: supervised?
        encode = self._encode_between_images if fmt.split_at_images else self._encode_with_images
        ids, supervised = encode(text, chars, list(tiles_per_image))
        bos = np.asarray(self.tokenizer.bos_ids, dtype=np.int64)
        input_ids = np.concatenate([bos, ids])
        labels = np.where(np.concatenate([np.zeros(len(bos), bool), supervised]), input_ids, IGNORE_INDEX)
        return input_ids, labels

    def _turns(self, conversations: Sequence[dict], num_images: int, origin: str) -> tuple[str, list[dict]]:
        """The system message and the turns, values normalised as the format's original does."""
        turns = [dict(t) if isinstance(t, dict) else t for t in conversations]
        system = self.cfg.system_message if self.cfg.system_message is not None else self.fmt.default_system
        if turns and isinstance(turns[0], dict) and turns[0].get("from") == "system":
            system = str(turns.pop(0).get("value", ""))
        _check_turns(turns, origin)
        context = self.cfg.image_context_token
        if context != IMAGE_PLACEHOLDER and any(context in t["value"] for t in [*turns, {"value": system}]):
            raise DataError(f"{origin}: the text holds the image context token {context!r}; remove it from the conversation")
        placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
        if self.fmt.insert_image and num_images == 1 and placeholders == 0:
            turns[0]["value"] = IMAGE_PLACEHOLDER + "\n" + turns[0]["value"]
            placeholders = 1
        if placeholders != num_images:
            raise DataError(f"{origin}: {placeholders} '<image>' placeholders but {num_images} images; "
                            "put exactly one '<image>' in the conversation per image, in image order")
        for turn in turns:
            if self.fmt.strip_values:
                turn["value"] = turn["value"].strip()
            if self.fmt.image_first and IMAGE_PLACEHOLDER in turn["value"]:
                k = turn["value"].count(IMAGE_PLACEHOLDER)
                rest = turn["value"].replace(IMAGE_PLACEHOLDER, "").strip()
                turn["value"] = ((IMAGE_PLACEHOLDER + "\n") * k + rest).strip()
        return system, turns

    def _encode_text(self, text: str, chars: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ids of ``text`` (one tokenizer call) and, per id, whether all the characters it covers are
        supervised (an id with an empty span, e.g. a trimmed byte-level space, goes with the character at
        its start)."""
        piece, offsets = self.tokenizer.encode_with_offsets(text)
        start, end = np.asarray(offsets, dtype=np.int64).reshape(-1, 2).T
        supervised_before = np.concatenate([[0], np.cumsum(chars)])  # supervised characters in text[:k]
        whole = supervised_before[end] - supervised_before[start] == end - start
        return np.asarray(piece, dtype=np.int64), np.where(end > start, whole, np.append(chars, False)[start])

    def _encode_with_images(self, text: str, chars: np.ndarray, tiles: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """One tokenizer call over ``text``, each ``<image>`` written as its image block.

        The block is tokenised with a single context token and expanded afterwards: the context token and
        its wrappers are special tokens, which the tokenizer splits off before anything else, so the text
        around them encodes the same way whatever the repeat count (and the tokenizer is spared matching
        thousands of repeats per sample).
        """
        pieces = text.split(IMAGE_PLACEHOLDER)
        compact_chars = [chars[: len(pieces[0])]]
        at = len(pieces[0])
        for piece in pieces[1:]:
            at += len(IMAGE_PLACEHOLDER)
            compact_chars += [np.zeros(len(self._image_text), bool), chars[at : at + len(piece)]]  # images: never supervised
            at += len(piece)
        ids, supervised = self._encode_text(self._image_text.join(pieces), np.concatenate(compact_chars))
        context = ids == self.image_context_id
        if context.sum() != len(tiles):
            raise DataError(f"{self.tokenizer.origin}: {self._image_text!r} does not encode as its special tokens; "
                            "add them to the tokenizer as special tokens")
        repeats = np.ones(len(ids), dtype=np.int64)
        repeats[context] = self.cfg.tokens_per_tile * np.asarray(tiles, dtype=np.int64)
        return np.repeat(ids, repeats), np.repeat(supervised, repeats)

    def _encode_between_images(self, text: str, chars: np.ndarray, tiles: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """One tokenizer call per piece of ``text`` between ``<image>`` placeholders, image blocks between."""
        ids: list[np.ndarray] = []
        supervised: list[np.ndarray] = []
        at = 0
        for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if k:
                block = np.asarray(self.image_block(tiles[k - 1]), dtype=np.int64)
                ids.append(block)
                supervised.append(np.zeros(len(block), bool))
                at += len(IMAGE_PLACEHOLDER)
            piece_ids, piece_supervised = self._encode_text(piece, chars[at : at + len(piece)])
            ids.append(piece_ids)
            supervised.append(piece_supervised)
            at += len(piece)
        return np.concatenate(ids), np.concatenate(supervised)


def _check_turns(turns: list, origin: str) -> None:
    if not turns:
        raise DataError(f"{origin}: empty conversation; a sample needs at least one human and one gpt turn")
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{origin}: turn {k} must be an object with a string 'value'")
        expected = "human" if k % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            raise DataError(f"{origin}: turn {k} is from {turn.get('from')!r}, expected {expected!r} "
                            "(turns alternate human, gpt, starting with human)")
