"""Conversation rows in the formats people release data in, normalised to one: ``[{role, content}]``.

Accepted spellings of a turn:

- LLaVA / ShareGPT: ``{"from": "human" | "gpt" | "system" | ..., "value": str}``;
- OpenAI / LLaMA-Factory / ms-swift: ``{"role": "user" | "assistant" | "system" | "tool", "content": ...}``,
  where ``content`` is a string or a list of parts: ``{"type": "text", "text": str}`` and
  ``{"type": "image"}`` (optionally with the image's path under ``"image"``).

Roles are mapped to ``system``, ``user``, ``assistant`` and ``tool`` (:data:`ROLE_ALIASES`; e.g. ShareGPT's
``observation`` is a tool turn, ``function_call`` an assistant turn). An image part becomes an ``<image>``
placeholder at its place in the text, so every image of a sample is a placeholder, in image order,
whatever the row's format. Normalising is idempotent: normalised messages pass through unchanged.
"""
from __future__ import annotations

from typing import Any, Sequence

from omnibal_pl.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "function_call": "assistant",
    "tool": "tool", "observation": "tool", "function": "tool", "ipython": "tool",
}


def normalize_messages(turns: Any, origin: str) -> tuple[list[dict[str, str]], list[str]]:
    """``([{role, content}], image paths named inside content parts, in order)`` of a row's turns.

    Raises :class:`DataError` naming ``origin`` and the turn on a turn that is not an object, an unknown
    role, content that is neither text nor a list of text and image parts, or an empty conversation.
    """
    if not isinstance(turns, list):
        raise DataError(f"{origin}: the conversation must be a list of turns ({{role, content}} or {{from, value}}), "
                        f"found {type(turns).__name__}")
    if not turns:
        raise DataError(f"{origin}: empty conversation; a sample needs at least one user and one assistant turn")
    messages, paths = [], []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{origin}: turn {k} must be an object, found {type(turn).__name__}")
        raw_role = turn.get("role", turn.get("from"))
        role = ROLE_ALIASES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise DataError(f"{origin}: turn {k} has role {raw_role!r}; expected one of {sorted(ROLE_ALIASES)}")
        content = turn["content"] if "content" in turn else turn.get("value")
        messages.append({"role": role, "content": _text(content, paths, f"{origin}: turn {k}")})
    return messages, paths


def check_roles(messages: Sequence[dict[str, str]], origin: str, roles: Sequence[str] = ROLES) -> None:
    """A trainable order: system turns (if any) first, then a user turn, and at least one assistant turn.

    ``roles``: the roles the chat format can write (a hand format has no ``tool`` turn).
    """
    start = next((k for k, m in enumerate(messages) if m["role"] != "system"), len(messages))
    body = messages[start:]
    if any(m["role"] == "system" for m in body):
        raise DataError(f"{origin}: a system turn after the conversation started; put system turns first")
    if not body or body[0]["role"] != "user":
        raise DataError(f"{origin}: the first turn after the system prompt must be the user's, "
                        f"found {body[0]['role'] if body else 'none'!r}")
    if not any(m["role"] == "assistant" for m in body):
        raise DataError(f"{origin}: no assistant turn, so nothing to train on; add the reply or drop the sample")
    unknown = sorted({m["role"] for m in messages} - set(roles))
    if unknown:
        raise DataError(f"{origin}: this chat format cannot write {unknown} turns; use the tokenizer's own chat "
                        "template (template.name=tokenizer) or drop them")


def _text(content: Any, paths: list[str], where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(f"{where}: content must be a string or a list of parts, found {type(content).__name__}")
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind == "image":
            out.append(IMAGE_PLACEHOLDER)
            if isinstance(part.get("image"), str):
                paths.append(part["image"])
        else:
            raise DataError(f"{where}: content part {part!r} is neither {{type: text, text}} nor {{type: image}}")
    return "".join(out)
