"""Mistral-Instruct chat format: `<s>[INST] u1 [/INST] a1</s>[INST] u2 [/INST] a2</s>`.

Token ids are built exactly the way `mistral_common` (tokenizer v1) builds them: BOS, then every user turn
`"[INST] {content} [/INST]"` and every assistant turn `"{content}"` (+ EOS) encoded as *separate*
SentencePiece calls, each with its own dummy-prefix space. Concatenating strings and encoding once would
give different ids at the turn boundaries, which is why this module exists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from data_gen.tokenizer import BOS_ID, EOS_ID, encode, encode_batch


class ChatFormatError(ValueError):
    """A conversation that the Mistral-Instruct format cannot express; the message says which field."""


@dataclasses.dataclass
class EncodedChat:
    """Token ids of a whole conversation and the training loss mask (True on assistant tokens + their </s>)."""

    input_ids: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # bool [n]


def _user_text(content: str) -> str:
    return f"[INST] {content} [/INST]"


def _turns(messages: Sequence[dict], *, last_role: str | None) -> list[tuple[str, str]]:
    """Validated (role, content) pairs; a leading system message is merged into the first user turn
    (content = system + "\\n\\n" + user), as `mistral_common` does for tokenizer v1."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes) or not messages:
        raise ChatFormatError("'messages' must be a non-empty list of {'role': ..., 'content': ...} objects")
    turns = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ChatFormatError(f"messages[{i}] must be an object with 'role' and 'content', got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ("system", "user", "assistant"):
            raise ChatFormatError(f"messages[{i}].role must be 'system', 'user' or 'assistant', got {role!r}")
        if not isinstance(content, str) or not content:
            raise ChatFormatError(f"messages[{i}].content must be a non-empty string, got {content!r}")
        turns.append((role, content))
    if turns[0][0] == "system":
        if len(turns) < 2 or turns[1][0] != "user":
            raise ChatFormatError("messages[1] must be a 'user' message after the 'system' message")
        turns = [("user", turns[0][1] + "\n\n" + turns[1][1]), *turns[2:]]
        offset = 1
    else:
        offset = 0
    for i, (role, _) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ChatFormatError(
                f"messages[{i + offset}].role must be {expected!r} (turns alternate user/assistant, starting with "
                f"user; only messages[0] may be 'system'), got {role!r}"
            )
    if last_role is not None and turns[-1][0] != last_role:
        raise ChatFormatError(f"the last message must be a {last_role!r} message, got {turns[-1][0]!r}")
    return turns


def encode_chat(messages: Sequence[dict]) -> EncodedChat:
    """Ids and loss mask of a conversation that ends with an assistant answer (a training example).

    Every assistant turn is trained on (its tokens and its </s>); nothing else is.
    """
    turns = _turns(messages, last_role="assistant")
    pieces = encode_batch([_user_text(c) if role == "user" else c for role, c in turns])
    ids, mask = [BOS_ID], [False]
    for (role, _), piece in zip(turns, pieces, strict=True):
        if role == "assistant":
            piece = [*piece, EOS_ID]
        ids.extend(piece)
        mask.extend([role == "assistant"] * len(piece))
    return EncodedChat(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool))


def encode_prompt(user_text: str) -> list[int]:
    """`<s>[INST] user_text [/INST]`: what a model is given to continue with its answer."""
    return [BOS_ID, *encode(_user_text(user_text))]


def render_chat(messages: Sequence[dict]) -> str:
    """The conversation as one string in Mistral's documented format. A Hugging Face tokenizer written by
    `data_gen.tokenizer.write_hf_tokenizer` encodes it (with add_special_tokens=False) to exactly
    `encode_chat(messages).input_ids` (or `encode_prompt` for a single user message)."""
    turns = _turns(messages, last_role=None)
    out = ["<s>"]
    for role, content in turns:
        out.append(_user_text(content) if role == "user" else f" {content}</s>")
    return "".join(out)
