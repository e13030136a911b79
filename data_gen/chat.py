"""Mistral-Instruct chat format: `<s>[INST] u1 [/INST] a1</s>[INST] u2 [/INST] a2</s>`.

The module-level API that jaxtrain and eval use, thin wrappers over `data_gen.tokenizer.MistralTokenizer`
(where the format is built, exactly as `mistral_common` builds it). Another model's chat format:
`data_gen.tokenizer.get_tokenizer(folder).encode_chat(messages)`.
"""

from __future__ import annotations

from collections.abc import Sequence

from data_gen.tokenizer import ChatFormatError, EncodedChat, mistral_tokenizer

__all__ = ["ChatFormatError", "EncodedChat", "encode_chat", "encode_prompt", "render_chat"]


def encode_chat(messages: Sequence[dict]) -> EncodedChat:
    """Ids and loss mask of a conversation that ends with an assistant answer (a training example).

    Every assistant turn is trained on (its tokens and its </s>); nothing else is.
    """
    return mistral_tokenizer().encode_chat(messages)


def encode_prompt(user_text: str) -> list[int]:
    """`<s>[INST] user_text [/INST]`: what a model is given to continue with its answer."""
    return mistral_tokenizer().encode_prompt(user_text)


def render_chat(messages: Sequence[dict]) -> str:
    """The conversation as one string in Mistral's documented format. A Hugging Face tokenizer written by
    `data_gen.tokenizer.write_hf_tokenizer` encodes it (with add_special_tokens=False) to exactly
    `encode_chat(messages).input_ids` (or `encode_prompt` for a single user message)."""
    return mistral_tokenizer().render_chat(messages)
