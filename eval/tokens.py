"""Turning prompt text into token ids, the way the reference evaluations do.

Two conventions:
- plain text (lm-evaluation-harness with a Hugging Face Mistral tokenizer, which adds BOS): `[BOS] + encode`;
  a (context, continuation) pair is encoded whole and split after the context's tokens, with the context's
  trailing whitespace moved to the continuation (the harness's `_encode_pair`), so the continuation gets
  the tokens it has inside the full text;
- chat (Mistral-Instruct, `data_gen.chat.encode_prompt`): the prompt is one user turn and the answer is
  encoded on its own, exactly as an assistant turn is in training data.
"""

from __future__ import annotations

from data_gen.chat import encode_prompt
from data_gen.tokenizer import BOS_ID, encode


def encode_text(text: str) -> list[int]:
    """`[BOS] + ids(text)`: a plain-text prompt."""
    return [BOS_ID, *encode(text)]


def encode_pair(context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with BOS, continuation ids) for log-likelihood scoring of plain-text prompts."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = encode_text(stripped + continuation)
    context_ids = encode_text(stripped)
    return context_ids, whole[len(context_ids):]


def encode_chat_pair(context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(`<s>[INST] context [/INST]`, ids of the stripped continuation) for chat-formatted scoring."""
    return encode_prompt(context.strip()), encode(continuation.strip())


def encode_generation_prompt(text: str, *, chat: bool) -> list[int]:
    """A generation prompt in either convention (the chat form strips the text: it is a user message)."""
    return encode_prompt(text.strip()) if chat else encode_text(text)
