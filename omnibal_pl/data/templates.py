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

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from omnibal_pl.batch import IGNORE_INDEX
from omnibal_pl.data.messages import IMAGE_PLACEHOLDER, check_roles, normalize_messages
from omnibal_pl.errors import ConfigError, DataError

TOKENIZER_TEMPLATE = "tokenizer"  # template.name of the tokenizer's own chat template


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
    # "<|im_start|>system\n{s}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n..."
    # Qwen2-VL / Qwen2.5-VL: each image <|vision_start|> + one <|image_pad|> per merge block + <|vision_end|>; a
    # reply's closing "<|im_end|>\n" supervised whole, as Qwen's fine-tuning code and LLaMA-Factory do
    "qwen2_vl": ChatFormat(
        system="<|im_start|>system\n{system}<|im_end|>\n",
        user="<|im_start|>user\n{message}<|im_end|>\n",
        assistant_prompt="<|im_start|>assistant\n",
        reply_start="",
        assistant_end="<|im_end|>\n",
        after_reply="",
        default_system="You are a helpful assistant.",
        image_start="<|vision_start|>",
        image_end="<|vision_end|>",
        strip_values=False,
        image_first=False,
        insert_image=True,
        split_at_images=False,
    ),
}


@dataclass
class TemplateConfig:
    """Which chat format, and how images appear in the token stream.

    ``name``: ``tokenizer`` (the tokenizer's own chat template, see :class:`ChatTokenizer`) or a hand format:
    ``internlm2-chat`` (InternVL-Chat-V1.5), ``internvl2_5`` (InternVL 2.5) or ``vicuna_v1`` (LLaVA-1.5).
    ``tokens_per_tile``: LLM tokens per tile (576 for LLaVA-1.5 at 336 px, 256 for InternVL at 448 px).
    ``image_context_token``: the token repeated for image features; must be one token of the tokenizer.
    ``system_message``: the system message of a conversation without one (null: the format's or
    template's default). ``image_start``/``image_end``: the tokens around each image's context tokens
    where the tokenizer's template does not write images itself (null: none; a hand format has its own).
    """

    name: str = "internlm2-chat"
    tokens_per_tile: int = 256
    image_context_token: str = "<IMG_CONTEXT>"
    system_message: str | None = None
    image_start: str | None = None
    image_end: str | None = None

    def __post_init__(self) -> None:
        if self.name != TOKENIZER_TEMPLATE and self.name not in FORMATS:
            raise ConfigError(f"template.name={self.name!r}: expected {TOKENIZER_TEMPLATE!r} (the tokenizer's own chat "
                              f"template) or one of {sorted(FORMATS)}")
        if self.name in FORMATS and (self.image_start is not None or self.image_end is not None):
            raise ConfigError(f"template.image_start/image_end: the hand format {self.name!r} writes its own image "
                              "wrappers; leave them null")
        if self.tokens_per_tile < 1:
            raise ConfigError(f"template.tokens_per_tile={self.tokens_per_tile}: must be >= 1")


class TextTokenizer:
    """A thin wrapper over an HF ``tokenizers.Tokenizer`` or ``transformers`` tokenizer.

    ``encode`` never adds special tokens (the chat format places them); ``token_id`` resolves one token;
    ``bos_ids`` are the ids the tokenizer itself puts in front of an encoding (``<s>`` or nothing);
    ``chat_template``: the tokenizer's own Jinja chat template (a ``transformers`` tokenizer that has one),
    else None.
    """

    def __init__(self, backend: Any, origin: str = "tokenizer") -> None:
        self.backend = backend
        self.origin = origin
        self._fast = hasattr(backend, "encode_batch")  # tokenizers.Tokenizer
        self.bos_ids = self._leading_special_ids()
        self.chat_template: str | None = None if self._fast else getattr(backend, "chat_template", None) or None

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        """``messages`` written by the tokenizer's chat template, as text (special tokens spelled out)."""
        if self.chat_template is None:
            raise DataError(f"{self.origin}: this tokenizer has no chat template; give a tokenizer folder whose "
                            "tokenizer_config.json or chat_template.jinja holds one, or pick a hand format (template.name)")
        try:
            return self.backend.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja raises its own TemplateError / UndefinedError, or whatever the template raises
            raise DataError(f"{self.origin}: the chat template fails on this conversation ({type(e).__name__}: {e})") from e

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
    folder that ``transformers.AutoTokenizer`` can read with ``local_files_only=True``: one without a
    ``tokenizer.json``, or one with a chat template (which only ``transformers`` renders).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such tokenizer path; give a tokenizer.json or a local tokenizer folder")
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.is_file() and not (path.is_dir() and _has_chat_template(path)):
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


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and "chat_template" in json.loads(config.read_text(encoding="utf-8"))


class ChatTokenizer:
    """Turns conversations into (input_ids, labels) for one chat format and tokenizer.

    A conversation is a list of turns in any spelling :func:`~omnibal_pl.data.messages.normalize_messages`
    accepts, with one ``<image>`` placeholder per image. A hand format (``template.name`` in :data:`FORMATS`)
    writes it as the format's original training code does (a leading system turn replaces the system
    message; no tool turns). The tokenizer's own template (``template.name: tokenizer``) writes it through
    ``apply_chat_template``, and the supervised text is found by rendering it turn by turn: the reply of
    the k-th message (an assistant turn) starts where the render of ``messages[:k]`` with the generation
    prompt ends and ends where the render of ``messages[:k+1]`` ends, less trailing whitespace (its
    end-of-turn token is supervised, a newline after it is not); each partial render must be a prefix of
    the whole one, or no label mask would be right and the sample is refused. An image is written as the
    template writes a ``{"type": "image"}`` content part where that text holds the image context token
    (Qwen2-VL style templates), else as ``image_start`` + context token + ``image_end`` of the config.
    """

    def __init__(self, tokenizer: TextTokenizer, cfg: TemplateConfig) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.fmt = FORMATS.get(cfg.name)
        self.image_context_id = tokenizer.token_id(cfg.image_context_token)
        if self.fmt is None:
            self._check_generation_prompt()
        start, end, self._image_parts = self._image_wrappers()
        self._image_start = [tokenizer.token_id(start)] if start else []
        self._image_end = [tokenizer.token_id(end)] if end else []
        # what an image is written as in a piece of text tokenised at once: one context token, repeated after
        self._image_text = start + cfg.image_context_token + end

    @property
    def image_token_ids(self) -> list[int]:
        """Ids that only occur in image blocks (context token and wrappers)."""
        return self._image_start + [self.image_context_id] + self._image_end

    def image_block(self, tiles: int) -> list[int]:
        """Token ids standing for one image of ``tiles`` tiles."""
        return self._image_start + [self.image_context_id] * (self.cfg.tokens_per_tile * tiles) + self._image_end

    def generation_prompt(self, conversations: Sequence[dict], tiles_per_image: Sequence[int], origin: str) -> list[int]:
        """Ids of a prompt (conversation ending with a user turn) up to where the assistant's reply starts."""
        messages = self._messages(conversations, len(tiles_per_image), origin)
        if self.fmt is not None:
            parts = self._hand_parts(messages) + [(self.fmt.assistant_prompt, False)]
            bos = self.tokenizer.bos_ids
        else:
            parts, bos = [(self._render(messages, True), False)], []
        return bos + self._encode(parts, list(tiles_per_image))[0].tolist()

    @property
    def end_of_turn_id(self) -> int:
        """The token that closes a reply (where generation stops): the hand format's end marker, or the first
        token the tokenizer's template writes after a reply's text."""
        if self.fmt is not None:
            return self.tokenizer.token_id(self.fmt.assistant_end.strip())
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]
        tail = self.tokenizer.encode(self.tokenizer.render_chat(probe, False).rsplit("Yes", 1)[1].strip())
        if not tail:
            raise ConfigError(f"{self.tokenizer.origin}: the chat template writes nothing after a reply, so generation "
                              "has no stop token; pick a hand format (template.name)")
        return tail[0]

    def fingerprint(self) -> str:
        """Everything the token counts depend on: the format's definition (or the tokenizer's template), the
        config and the tokenizer."""
        return f"{self.fmt!r}|{self.tokenizer.chat_template!r}|{self.cfg!r}|{self.tokenizer.fingerprint()}"

    def __call__(self, conversations: Sequence[dict], tiles_per_image: Sequence[int], origin: str) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, labels)``, int64 ``[n]`` each; ``tiles_per_image[k]`` tiles for the k-th ``<image>``.

        Raises :class:`DataError` naming ``origin`` on a malformed conversation, a role the format cannot
        write, or when the number of ``<image>`` placeholders differs from the number of images.
        """
        messages = self._messages(conversations, len(tiles_per_image), origin)
        check_roles(messages, origin, ("system", "user", "assistant") if self.fmt is not None else
                    ("system", "user", "assistant", "tool"))
        if self.fmt is not None:
            parts, bos = self._hand_parts(messages), self.tokenizer.bos_ids
        else:
            parts, bos = self._template_parts(messages, origin), []
        ids, supervised = self._encode(parts, list(tiles_per_image))
        input_ids = np.concatenate([np.asarray(bos, dtype=np.int64), ids])
        labels = np.where(np.concatenate([np.zeros(len(bos), bool), supervised]), input_ids, IGNORE_INDEX)
        return input_ids, labels

    def _messages(self, conversations: Sequence[dict], num_images: int, origin: str) -> list[dict[str, str]]:
        """Normalised messages (copies), images checked against the placeholders; a hand format that inserts a
        missing placeholder (InternVL) does so for a one-image sample."""
        messages, _ = normalize_messages(conversations, origin)
        context = self.cfg.image_context_token
        if context != IMAGE_PLACEHOLDER and any(context in m["content"] for m in messages):
            raise DataError(f"{origin}: the text holds the image context token {context!r}; remove it from the conversation")
        placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if self.fmt is not None and self.fmt.insert_image and num_images == 1 and placeholders == 0 and first_user:
            first_user["content"] = IMAGE_PLACEHOLDER + "\n" + first_user["content"]
            placeholders = 1
        if placeholders != num_images:
            raise DataError(f"{origin}: {placeholders} '<image>' placeholders but {num_images} images; "
                            "put exactly one '<image>' in the conversation per image, in image order")
        if self.fmt is None and self.cfg.system_message is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.cfg.system_message})
        return messages

    def _hand_parts(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """``(text, supervised)`` pieces of the conversation in the hand format, values normalised as its
        original does."""
        fmt = self.fmt
        system = self.cfg.system_message if self.cfg.system_message is not None else fmt.default_system
        lead = [m["content"] for m in messages if m["role"] == "system"]
        system = "\n".join(lead) if lead else system
        parts: list[tuple[str, bool]] = [(fmt.system.format(system=system), False)]
        for m in messages[len(lead):]:
            value = m["content"].strip() if fmt.strip_values else m["content"]
            if fmt.image_first and IMAGE_PLACEHOLDER in value:
                k = value.count(IMAGE_PLACEHOLDER)
                value = ((IMAGE_PLACEHOLDER + "\n") * k + value.replace(IMAGE_PLACEHOLDER, "").strip()).strip()
            if m["role"] == "user":
                parts.append((fmt.user.format(message=value), False))
            else:
                reply = fmt.reply_start + value + fmt.assistant_end
                parts += [(fmt.assistant_prompt, False), (reply, True), (fmt.after_reply, False)]
        return parts

    def _template_parts(self, messages: list[dict[str, str]], origin: str) -> list[tuple[str, bool]]:
        """``(text, supervised)`` pieces of the tokenizer template's render (see the class docstring)."""
        whole = self._render(messages, False)
        parts: list[tuple[str, bool]] = []
        at = 0
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt, turn = self._render(messages[:k], True), self._render(messages[: k + 1], False)
            if not (turn.startswith(prompt) and whole.startswith(turn) and len(prompt) >= at):
                raise DataError(f"{origin}: the chat template writes turns before message {k} differently once message {k} "
                                "follows, so the reply cannot be located; use a hand format (template.name) for this data")
            reply = turn[len(prompt):].rstrip()
            if message["content"].strip() not in reply:
                raise DataError(f"{origin}: the chat template does not write message {k}'s content as it is (it rewrites or "
                                "drops it), so its labels cannot be placed; use a hand format (template.name)")
            parts += [(whole[at : len(prompt)], False), (reply, True)]
            at = len(prompt) + len(reply)
        return parts + [(whole[at:], False)]

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The tokenizer template's text, every image written as an ``<image>`` placeholder."""
        if not self._image_parts:
            return self.tokenizer.render_chat(messages, add_generation_prompt)
        as_parts = [{**m, "content": _content_parts(m["content"])} for m in messages]
        text = self.tokenizer.render_chat(as_parts, add_generation_prompt)
        return text.replace(self._image_text, IMAGE_PLACEHOLDER)

    def _check_generation_prompt(self) -> None:
        probe = [{"role": "user", "content": "Hi"}]
        if self.tokenizer.render_chat(probe, True) == self.tokenizer.render_chat(probe, False):
            raise ConfigError(f"{self.tokenizer.origin}: the chat template adds no generation prompt "
                              "(add_generation_prompt changes nothing), so replies cannot be told from prompts; "
                              "pick a hand format (template.name)")

    def _image_wrappers(self) -> tuple[str, str, bool]:
        """``(image_start, image_end, images as content parts)``: the format's, the template's own (the text
        it writes for an image part, split at the context token), or the config's."""
        if self.fmt is not None:
            return self.fmt.image_start, self.fmt.image_end, False
        context = self.cfg.image_context_token
        try:
            text = self.tokenizer.render_chat([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], False)
            image = self.tokenizer.render_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], False)
        except DataError:  # a text-only template
            text = image = ""
        n = len(os.path.commonprefix([text, image]))
        marker = image[n : n + len(image) - len(text)]
        if marker.count(context) != 1 or image != text[:n] + marker + text[n:]:
            return self.cfg.image_start or "", self.cfg.image_end or "", False
        if self.cfg.image_start is not None or self.cfg.image_end is not None:
            raise ConfigError(f"template.image_start/image_end: the chat template writes an image itself as {marker!r}; "
                              "leave them null")
        start, _, end = marker.partition(context)
        return start, end, True

    def _encode(self, parts: list[tuple[str, bool]], tiles: list[int]) -> tuple[np.ndarray, np.ndarray]:
        text = "".join(t for t, _ in parts)
        chars = np.concatenate([np.full(len(t), s, bool) for t, s in parts])  # per character: supervised?
        split = self.fmt is not None and self.fmt.split_at_images
        return (self._encode_between_images if split else self._encode_with_images)(text, chars, tiles)

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


def _content_parts(content: str) -> list[dict[str, str]]:
    """``content`` as text and image parts, one image part per ``<image>`` placeholder."""
    parts: list[dict[str, str]] = []
    for k, piece in enumerate(content.split(IMAGE_PLACEHOLDER)):
        if k:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts
