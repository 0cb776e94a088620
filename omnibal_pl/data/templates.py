"""Chat templates and tokenisation: a conversation becomes ``input_ids`` and ``labels``.

A conversation is ``[{"from": "human" | "gpt", "value": str}, ...]`` (an optional leading
``"system"`` turn replaces the template's system message). Every ``<image>`` placeholder becomes the
template's image block: ``tokens_per_tile x tiles`` image-context tokens, wrapped in ``<img>``/``</img>``
for ``internlm2-chat``. Labels are -100 everywhere except the assistant replies and their end marker;
image tokens are never supervised.

Text pieces are tokenised one by one and concatenated, so the label mask is exact and the length of a
sample is known without building any pixels. The first token of every sample (BOS) is unsupervised,
so labels can be shifted inside a packed sequence without crossing samples.
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
class _ChatFormat:
    bos: str
    system: str  # formatted with {system}
    user: str  # formatted with {message}; unsupervised
    assistant_prompt: str  # unsupervised
    assistant_end: str  # supervised, closes the reply
    after_assistant: str  # unsupervised
    default_system: str
    image_start: str | None
    image_end: str | None


_FORMATS = {
    # LLaVA-1.5: "<s>{system} USER: {q} ASSISTANT: {a}</s>USER: ..."
    "vicuna_v1": _ChatFormat(
        bos="<s>",
        system="{system} ",
        user="USER: {message} ",
        assistant_prompt="ASSISTANT: ",
        assistant_end="</s>",
        after_assistant="",
        default_system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        image_start=None,
        image_end=None,
    ),
    # InternVL-Chat-V1.5: "<s><|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n..."
    "internlm2-chat": _ChatFormat(
        bos="<s>",
        system="<|im_start|>system\n{system}<|im_end|>\n",
        user="<|im_start|>user\n{message}<|im_end|>\n",
        assistant_prompt="<|im_start|>assistant\n",
        assistant_end="<|im_end|>",
        after_assistant="\n",
        default_system="你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。",
        image_start="<img>",
        image_end="</img>",
    ),
}


@dataclass
class TemplateConfig:
    """Which chat template, and how images appear in the token stream.

    ``name``: ``vicuna_v1`` (LLaVA-1.5) or ``internlm2-chat`` (InternVL).
    ``tokens_per_tile``: LLM tokens per tile (576 for LLaVA-1.5 at 336 px, 256 for InternVL at 448 px).
    ``image_context_token``: the token repeated for image features; must be one token of the tokenizer.
    ``system_message``: overrides the template's default system message when set.
    """

    name: str = "internlm2-chat"
    tokens_per_tile: int = 256
    image_context_token: str = "<IMG_CONTEXT>"
    system_message: str | None = None

    def __post_init__(self) -> None:
        if self.name not in _FORMATS:
            raise ConfigError(f"template.name={self.name!r}: expected one of {sorted(_FORMATS)}")
        if self.tokens_per_tile < 1:
            raise ConfigError(f"template.tokens_per_tile={self.tokens_per_tile}: must be >= 1")


class TextTokenizer:
    """A thin wrapper over an HF ``tokenizers.Tokenizer`` or ``transformers`` tokenizer.

    ``encode`` never adds special tokens (the template places them); ``token_id`` resolves one token.
    """

    def __init__(self, backend: Any, origin: str = "tokenizer") -> None:
        self.backend = backend
        self.origin = origin

    def encode(self, text: str) -> list[int]:
        if hasattr(self.backend, "encode_batch"):  # tokenizers.Tokenizer
            return self.backend.encode(text, add_special_tokens=False).ids
        return self.backend.encode(text, add_special_tokens=False)

    def token_id(self, token: str) -> int:
        """Id of ``token``; raises :class:`DataError` if the tokenizer does not know it as one token."""
        if hasattr(self.backend, "encode_batch"):
            tid = self.backend.token_to_id(token)
        else:
            tid = self.backend.convert_tokens_to_ids(token)
            tid = None if tid == self.backend.unk_token_id and token != self.backend.unk_token else tid
        if tid is None:
            raise DataError(f"{self.origin}: token {token!r} is not in the vocabulary; add it as a special "
                            "token (and resize the model's embeddings) or pick the template that matches this tokenizer")
        return int(tid)

    def __len__(self) -> int:
        if hasattr(self.backend, "encode_batch"):
            return self.backend.get_vocab_size(with_added_tokens=True)
        return len(self.backend)


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
    """Turns conversations into (input_ids, labels) for one template and tokenizer."""

    def __init__(self, tokenizer: TextTokenizer, cfg: TemplateConfig) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.fmt = _FORMATS[cfg.name]
        self.bos_id = tokenizer.token_id(self.fmt.bos)
        self.image_context_id = tokenizer.token_id(cfg.image_context_token)
        self._image_start = [tokenizer.token_id(self.fmt.image_start)] if self.fmt.image_start else []
        self._image_end = [tokenizer.token_id(self.fmt.image_end)] if self.fmt.image_end else []

    @property
    def image_token_ids(self) -> list[int]:
        """Ids that only occur in image blocks (context token and wrappers)."""
        return self._image_start + [self.image_context_id] + self._image_end

    def image_block(self, tiles: int) -> list[int]:
        """Token ids standing for one image of ``tiles`` tiles."""
        return self._image_start + [self.image_context_id] * (self.cfg.tokens_per_tile * tiles) + self._image_end

    def __call__(self, conversations: Sequence[dict], tiles_per_image: Sequence[int], origin: str) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, labels)``, int64 ``[n]`` each; ``tiles_per_image[k]`` tiles for the k-th ``<image>``.

        Raises :class:`DataError` naming ``origin`` on a malformed conversation or when the number of
        ``<image>`` placeholders differs from the number of images.
        """
        turns = list(conversations)
        system = self.cfg.system_message if self.cfg.system_message is not None else self.fmt.default_system
        if turns and isinstance(turns[0], dict) and turns[0].get("from") == "system":
            system = str(turns.pop(0).get("value", ""))
        _check_turns(turns, origin)
        placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
        if placeholders != len(tiles_per_image):
            raise DataError(f"{origin}: {placeholders} '<image>' placeholders but {len(tiles_per_image)} images; "
                            "put exactly one '<image>' in the conversation per image, in image order")

        ids: list[int] = [self.bos_id]
        sup: list[bool] = [False]
        images = iter(tiles_per_image)

        def add(text: str, supervised: bool) -> None:
            parts = text.split(IMAGE_PLACEHOLDER)
            for k, part in enumerate(parts):
                if k:
                    block = self.image_block(next(images))
                    ids.extend(block)
                    sup.extend([False] * len(block))
                if part:
                    piece = self.tokenizer.encode(part)
                    ids.extend(piece)
                    sup.extend([supervised] * len(piece))

        add(self.fmt.system.format(system=system), False)
        for turn in turns:
            if turn["from"] == "human":
                add(self.fmt.user.format(message=turn["value"]), False)
            else:
                add(self.fmt.assistant_prompt, False)
                add(turn["value"] + self.fmt.assistant_end, True)
                add(self.fmt.after_assistant, False)
        input_ids = np.asarray(ids, dtype=np.int64)
        labels = np.where(np.asarray(sup, dtype=bool), input_ids, IGNORE_INDEX)
        return input_ids, labels


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
