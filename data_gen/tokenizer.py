"""Tokenizers of data_gen: Mistral 7B's (built in) or any Hugging Face folder's, behind one interface.

Every data_gen stage (the token budget of `generate`, `shards`, the warm-up data) encodes through a `Tokenizer`,
so a dataset is counted, formatted and masked for the model that will train on it:

- `MistralTokenizer` (the default, `get_tokenizer(None)` or `"mistral"`): Mistral-7B's SentencePiece model shipped
  inside `mistral_common` (`tokenizer.model.v1`), so nothing is downloaded and the tokenizer is bit-for-bit the
  one `mistral_common` uses; our chat encoding is checked against its `encode_chat_completion`.
- `HFTokenizer` (`get_tokenizer(folder)`): a Hugging Face folder's tokenizer and chat template (Llama 3.x,
  Qwen2.5, SmolLM2, ...), loaded by `transformers.AutoTokenizer` from local files only.

The module-level functions (`encode`, `encode_batch`, `decode`, `load_tokenizer`, `write_hf_tokenizer`, ...) are
the Mistral tokenizer's, kept for the callers in jaxtrain and eval.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import importlib.resources
import json
import os
import pathlib
import re
import shutil
from collections.abc import Mapping, Sequence

import numpy as np
import sentencepiece
from etils import epath

BOS_ID = 1
EOS_ID = 2
UNK_ID = 0
SPACE = "\u2581"  # SentencePiece's visible space, "▁"
MISTRAL = "mistral"
"""name (and `--tokenizer` value) of the built-in Mistral 7B tokenizer"""
MISTRAL_VOCAB_SIZE = 32000
TOKENIZER_FILES = ("chat_template.jinja", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "tokenizer_config.json")
"""the files of a Hugging Face folder that define its tokenizer and chat template (sorted: the identity hash order)"""
_MODEL_FILES = ("tokenizer.json", "tokenizer.model")  # a folder needs one of them to be a tokenizer folder

Messages = Sequence[Mapping[str, str]]
"""a chat: [{"role": "system" | "user" | "assistant", "content": str}, ...]"""


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used; the message names the folder or file and what is wrong."""


class ChatFormatError(ValueError):
    """A conversation that the chat format cannot express; the message says which message (or template) fails."""


@dataclasses.dataclass
class EncodedChat:
    """Token ids of a whole conversation and the training loss mask (True on each assistant answer's tokens and
    its end-of-turn token, nothing else)."""

    input_ids: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # bool [n]


@dataclasses.dataclass(frozen=True)
class TokenizerIdentity:
    """What generation.json and shard manifests record, so data tokenized with one tokenizer is never read as
    another's: `sha256` decides, `name` and `vocab_size` are for people reading the error."""

    name: str
    sha256: str
    vocab_size: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, entry: object) -> TokenizerIdentity:
        """Read `to_json`'s output, or the entry of manifests written before other tokenizers existed
        ({"file": "tokenizer.model.v1", "sha256": ...}: always Mistral's). ValueError if it is neither."""
        if not isinstance(entry, Mapping):
            raise ValueError(f"tokenizer entry must be an object, got {entry!r}")
        try:
            if "name" not in entry and entry.get("file") == tokenizer_file().name:
                return cls(MISTRAL, str(entry["sha256"]), MISTRAL_VOCAB_SIZE)
            return cls(str(entry["name"]), str(entry["sha256"]), int(entry["vocab_size"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tokenizer entry must have name, sha256 and vocab_size, got {dict(entry)!r}") from None

    def __str__(self) -> str:
        return f"{self.name!r} (sha256 {self.sha256}, vocab {self.vocab_size})"


# ---------------------------------------------------------------------------------------------- Mistral's file


@functools.cache
def tokenizer_file() -> pathlib.Path:
    """Path of `mistral_common/data/tokenizer.model.v1` (SentencePiece BPE, 32000 pieces)."""
    path = pathlib.Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall mistral-common (pip install 'mistral-common>=1.13')")
    return path


def _file_sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.cache
def tokenizer_sha256() -> str:
    """The Mistral tokenizer's identity hash: recorded in shard manifests so data tokenized with another
    tokenizer is never mixed in silently."""
    return _file_sha256(tokenizer_file())


@functools.cache
def load_tokenizer() -> sentencepiece.SentencePieceProcessor:
    """The shared Mistral SentencePiece processor (cached: loading takes ~50 ms). Do not mutate it."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_file()))
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id()) == (BOS_ID, EOS_ID, UNK_ID), "unexpected tokenizer file"
    return sp


def encode(text: str) -> list[int]:
    """Mistral token ids of `text` without BOS/EOS. SentencePiece prepends one "▁" (dummy prefix) to every call,
    exactly like `mistral_common` does for each chat segment."""
    return load_tokenizer().encode(text)


def encode_batch(texts: Sequence[str]) -> list[list[int]]:
    """Like `encode` for many strings at once (SentencePiece's C++ batch path)."""
    return load_tokenizer().encode(list(texts))


def decode(ids: Sequence[int]) -> str:
    """Text of Mistral token ids; special tokens (<s>, </s>) are dropped."""
    return load_tokenizer().decode([int(i) for i in ids])


# ---------------------------------------------------------------------------------------------- messages


def _as_messages(messages_or_user_text: str | Messages) -> Messages:
    if isinstance(messages_or_user_text, str):
        return [{"role": "user", "content": messages_or_user_text}]
    return messages_or_user_text


def _checked_turns(messages: Messages, *, last_role: str | None) -> list[tuple[str, str]]:
    """(role, content) pairs of a chat every tokenizer here accepts: an optional system message first, then
    user and assistant turns alternating, starting with user; string contents with some non-whitespace text (a
    blank answer would teach the model to answer nothing)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes) or not messages:
        raise ChatFormatError("'messages' must be a non-empty list of {'role': ..., 'content': ...} objects")
    turns = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ChatFormatError(f"messages[{i}] must be an object with 'role' and 'content', got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ("system", "user", "assistant"):
            raise ChatFormatError(f"messages[{i}].role must be 'system', 'user' or 'assistant', got {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise ChatFormatError(f"messages[{i}].content must be a non-empty string (not only whitespace), got "
                                  f"{content!r}")
        turns.append((role, content))
    offset = int(turns[0][0] == "system")
    if offset and (len(turns) < 2 or turns[1][0] != "user"):
        raise ChatFormatError("messages[1] must be a 'user' message after the 'system' message")
    for i, (role, _) in enumerate(turns[offset:]):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ChatFormatError(
                f"messages[{i + offset}].role must be {expected!r} (turns alternate user/assistant, starting with "
                f"user; only messages[0] may be 'system'), got {role!r}"
            )
    if last_role is not None and turns[-1][0] != last_role:
        raise ChatFormatError(f"the last message must be a {last_role!r} message, got {turns[-1][0]!r}")
    return turns


# ---------------------------------------------------------------------------------------------- the interface

# Numbers in the contexts of data_gen's prompts, to find out whether every digit is a token of its own.
_DIGIT_PROBE = ("Dictionary [12] {4654: 823, 90: 7}\n(141, 986, 163): 2528\n"
                "The value of key 1029384756 is 55 and it is in Dictionary [28].")


class Tokenizer(abc.ABC):
    """One model's tokenizer and chat format: what data_gen needs to count, encode and mask its chats.

    `name`, `vocab_size` (token ids lie in [0, vocab_size)) and `stop_ids` (the end-of-turn / end-of-sequence
    ids that end generation; the loss mask ends each answer at the first of them) are plain attributes, and so
    are `bos_id` and `eos_id`: the tokenizer's own BOS and EOS tokens (None if it has none), which it need not
    add to a text (SmolLM2's BOS is `<|im_start|>`, never added); lm-evaluation-harness's `hf` backend takes
    its prefix and end-of-text tokens from them.
    """

    name: str
    vocab_size: int
    stop_ids: tuple[int, ...]
    bos_id: int | None
    eos_id: int | None

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens dropped."""

    @abc.abstractmethod
    def encode_text(self, text: str) -> list[int]:
        """A plain-text (not chat) prompt with the special tokens the tokenizer adds by default (e.g. BOS)."""

    @abc.abstractmethod
    def encode_chat(self, messages: Messages) -> EncodedChat:
        """Ids and answer-only loss mask of a conversation that ends with an assistant answer (a training example)."""

    @abc.abstractmethod
    def encode_prompt(self, messages: str | Messages) -> list[int]:
        """The conversation so far (or one user message's text) plus the generation prompt: what a model
        continues with its answer."""

    @abc.abstractmethod
    def encode_marked(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Ids of a text in which special-token strings (`<s>`, `<|im_start|>`, as a rendered chat template
        writes them) stand for their tokens, as its Hugging Face tokenizer encodes such text; with
        `add_special_tokens`, what the tokenizer adds by default (BOS). What lm-evaluation-harness encodes."""

    @abc.abstractmethod
    def token_string(self, token_id: int) -> str:
        """One token as written in text and templates (a special token's own string, e.g. `</s>`)."""

    @property
    @abc.abstractmethod
    def chat_template(self) -> str:
        """The chat template, as Jinja source."""

    @abc.abstractmethod
    def render_chat(self, messages: Messages, *, add_generation_prompt: bool = False,
                    continue_final_message: bool = False) -> str:
        """The conversation rendered by the chat template as text (`encode_marked` reads it back into ids); the
        flags as transformers' `apply_chat_template` has them (`continue_final_message`: the last message
        left open, without its end-of-turn token)."""

    @abc.abstractmethod
    def identity(self) -> TokenizerIdentity:
        """Name, sha256 of the files that define the tokenizer and its chat format, vocabulary size."""

    @abc.abstractmethod
    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write the files `transformers.AutoTokenizer.from_pretrained(out_dir)` needs, chat template included."""

    @functools.cached_property
    def splits_digits(self) -> bool:
        """Whether every decimal digit is a token of its own (Mistral's, Qwen2's and SmolLM2's tokenizers; not
        Llama 3's, which groups up to three). Then a number costs as many tokens as it has digits, whatever the
        digits are, which the token budget of `data_gen.tasks.check_budget` relies on to be exact."""
        pieces = [self.decode([i]) for i in self.encode(_DIGIT_PROBE)]
        return all(len(piece) == 1 for piece in pieces if any(c.isdigit() for c in piece))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.identity()})"


# ---------------------------------------------------------------------------------------------- Mistral

MISTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' and loop.index0 % 2 == 0 -%}"
    "{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' -}}"
    "{%- elif message['role'] == 'assistant' and loop.index0 % 2 == 1 -%}"
    "{{- ' ' + message['content'] + eos_token -}}"
    "{%- else -%}"
    "{{- raise_exception('after an optional system message, roles must alternate user/assistant/user/...') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
"""The Mistral-Instruct format as a Hugging Face chat template: `<s>[INST] u1 [/INST] a1</s>[INST] u2 [/INST]`
(a system message joins the first user turn after a blank line; the generation prompt is empty: a prompt
already ends with `[/INST]`). The tokenizer.json of `write_hf_tokenizer` encodes each text segment between
special tokens with its own dummy-prefix "▁", so this string encodes to the ids mistral_common builds."""


class MistralTokenizer(Tokenizer):
    """Mistral 7B v0.1 / Instruct v0.1-v0.2: SentencePiece over mistral_common's `tokenizer.model.v1`, chats in
    the Instruct format with ids built exactly as mistral_common (tokenizer v1) builds them.

    mistral_common encodes BOS, then every user turn `"[INST] {content} [/INST]"` and every assistant turn
    `"{content}"` (+ EOS) as *separate* SentencePiece calls, each with its own dummy-prefix space; concatenating
    the strings and encoding once would give different ids at the turn boundaries. A leading system message
    is merged into the first user turn (system + "\\n\\n" + user).
    """

    name = MISTRAL
    vocab_size = MISTRAL_VOCAB_SIZE
    stop_ids = (EOS_ID,)
    bos_id = BOS_ID
    eos_id = EOS_ID

    def encode(self, text: str) -> list[int]:
        return encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return decode(ids)

    def encode_text(self, text: str) -> list[int]:
        return [BOS_ID, *encode(text)]

    @staticmethod
    def _turns(messages: Messages, *, last_role: str | None) -> list[tuple[str, str]]:
        turns = _checked_turns(messages, last_role=last_role)
        if turns[0][0] == "system":
            turns = [("user", turns[0][1] + "\n\n" + turns[1][1]), *turns[2:]]
        return turns

    def _encode_turns(self, turns: list[tuple[str, str]]) -> EncodedChat:
        pieces = encode_batch([f"[INST] {c} [/INST]" if role == "user" else c for role, c in turns])
        ids, mask = [BOS_ID], [False]
        for (role, _), piece in zip(turns, pieces, strict=True):
            if role == "assistant":
                piece = [*piece, EOS_ID]
            ids.extend(piece)
            mask.extend([role == "assistant"] * len(piece))
        return EncodedChat(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool))

    def encode_chat(self, messages: Messages) -> EncodedChat:
        return self._encode_turns(self._turns(messages, last_role="assistant"))

    def encode_prompt(self, messages: str | Messages) -> list[int]:
        return self._encode_turns(self._turns(_as_messages(messages), last_role="user")).input_ids.tolist()

    def render_chat(self, messages: Messages, *, add_generation_prompt: bool = False,
                    continue_final_message: bool = False) -> str:
        """The conversation as one string in Mistral's documented format, rendered by `MISTRAL_CHAT_TEMPLATE`
        (its generation prompt is empty: a prompt already ends with `[/INST]`)."""
        self._turns(messages, last_role=None)  # the template's own errors are not this clear
        text = _mistral_template().render(messages=[dict(m) for m in messages], bos_token="<s>", eos_token="</s>",
                                          add_generation_prompt=add_generation_prompt)
        return text.removesuffix("</s>") if continue_final_message else text

    @property
    def chat_template(self) -> str:
        return MISTRAL_CHAT_TEMPLATE

    def encode_marked(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """As a Hugging Face Mistral tokenizer (our export's) encodes it: `<s>`, `</s>` and `<unk>` become their
        ids and the text between them is encoded piece by piece, each with its dummy-prefix space."""
        sp = load_tokenizer()
        special = {sp.id_to_piece(i): i for i in (UNK_ID, BOS_ID, EOS_ID)}
        ids = [BOS_ID] if add_special_tokens else []
        for part in re.split("(" + "|".join(map(re.escape, special)) + ")", text):
            if part in special:
                ids.append(special[part])
            elif part:
                ids += encode(part)
        return ids

    def token_string(self, token_id: int) -> str:
        return load_tokenizer().id_to_piece(int(token_id))

    def identity(self) -> TokenizerIdentity:
        return TokenizerIdentity(self.name, tokenizer_sha256(), self.vocab_size)

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        write_hf_tokenizer(out_dir)


@functools.cache
def _mistral_template():
    """`MISTRAL_CHAT_TEMPLATE` compiled the way transformers compiles chat templates."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ChatFormatError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(MISTRAL_CHAT_TEMPLATE)


@functools.cache
def mistral_tokenizer() -> MistralTokenizer:
    """The shared Mistral tokenizer (the default of every data_gen stage)."""
    return MistralTokenizer()


# ---------------------------------------------------------------------------------------------- Hugging Face


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _folder_sha256(folder: pathlib.Path) -> str:
    """sha256 over the `TOKENIZER_FILES` that exist, in that order, each as name, length and bytes."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            data = path.read_bytes()
            h.update(f"{name}\0{len(data)}\0".encode())
            h.update(data)
    return h.hexdigest()


class HFTokenizer(Tokenizer):
    """A Hugging Face folder's tokenizer (`transformers.AutoTokenizer`, local files only) and its own chat template.

    Answer-only loss mask for any template: for each assistant message i, `messages[:i]` rendered with the
    generation prompt must be a token prefix of `messages[:i+1]`, and that a token prefix of the whole
    conversation (else `ChatFormatError` naming the folder and message). The tokens in between are the answer
    as the template writes it; the mask covers them up to and including the first stop id (the end-of-turn
    token), not what the template adds after it (ChatML's newline). System prompts, user turns and role
    headers are never in the mask.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = pathlib.Path(folder)
        try:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers reports a bad folder in many ways
            raise TokenizerError(f"{self.folder}: transformers cannot load its tokenizer "
                                 f"({type(e).__name__}: {_first_line(e)})") from None
        self.name = self.folder.resolve().name
        self.vocab_size = len(self._tok)
        self.stop_ids = self._read_stop_ids()
        self.bos_id, self.eos_id = self._tok.bos_token_id, self._tok.eos_token_id
        self._sha256 = _folder_sha256(self.folder)

    def _read_stop_ids(self) -> tuple[int, ...]:
        """generation_config.json's `eos_token_id` (an int or a list), then the tokenizer's eos token."""
        ids: list = []
        path = self.folder / "generation_config.json"
        if path.is_file():
            try:
                eos = json.loads(path.read_text()).get("eos_token_id")
            except (json.JSONDecodeError, AttributeError) as e:
                raise TokenizerError(f"{path}: not a JSON object ({_first_line(e)})") from None
            ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
        if self._tok.eos_token_id is not None:
            ids.append(self._tok.eos_token_id)
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.vocab_size:
                raise TokenizerError(f"{self.folder}: eos token id {i!r} (generation_config.json or the tokenizer's "
                                     f"eos_token) is not a token id in [0, {self.vocab_size})")
        return tuple(dict.fromkeys(ids))

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False).input_ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def encode_text(self, text: str) -> list[int]:
        return list(self._tok(text).input_ids)

    def _render_ids(self, messages: list[dict], *, generation_prompt: bool) -> list[int]:
        """`apply_chat_template` ids, its failures as one-line ChatFormatErrors."""
        if not self._tok.chat_template:
            raise ChatFormatError(f"{self.folder}: the tokenizer has no chat template (chat_template.jinja, or "
                                  "'chat_template' in tokenizer_config.json)")
        try:
            return list(self._tok.apply_chat_template(messages, tokenize=True, return_dict=False,
                                                      add_generation_prompt=generation_prompt))
        except Exception as e:  # noqa: BLE001 - a template raises whatever its author wrote (or jinja2's errors)
            raise ChatFormatError(f"{self.folder}: its chat template fails on messages[:{len(messages)}] "
                                  f"({type(e).__name__}: {_first_line(e)})") from None

    def encode_chat(self, messages: Messages) -> EncodedChat:
        turns = [{"role": role, "content": c} for role, c in _checked_turns(messages, last_role="assistant")]
        ids = self._render_ids(turns, generation_prompt=False)
        mask = np.zeros(len(ids), bool)
        for i in (i for i, turn in enumerate(turns) if turn["role"] == "assistant"):
            prompt = self._render_ids(turns[:i], generation_prompt=True)
            upto = ids if i + 1 == len(turns) else self._render_ids(turns[:i + 1], generation_prompt=False)
            if upto[:len(prompt)] != prompt:
                raise ChatFormatError(
                    f"{self.folder}: chat template is not prefix-stable at messages[{i}]: messages[:{i}] with the "
                    f"generation prompt is not a token prefix of messages[:{i + 1}], so the answer cannot be located (an "
                    f"answer starting with whitespace can merge with the template's last token)")
            if ids[:len(upto)] != upto:
                raise ChatFormatError(
                    f"{self.folder}: chat template is not prefix-stable at messages[{i}]: messages[:{i + 1}] is not a "
                    f"token prefix of the whole conversation (the template renders an earlier turn differently)")
            end = next((j for j in range(len(prompt), len(upto)) if upto[j] in self.stop_ids), None)
            if end is None:
                raise ChatFormatError(
                    f"{self.folder}: the chat template ends messages[{i}] (assistant) without an end-of-turn token "
                    f"(none of the stop ids {list(self.stop_ids)}: generation_config.json eos_token_id, eos_token)")
            mask[len(prompt):end + 1] = True
        return EncodedChat(np.asarray(ids, dtype=np.int32), mask)

    def encode_prompt(self, messages: str | Messages) -> list[int]:
        turns = _checked_turns(_as_messages(messages), last_role="user")
        return self._render_ids([{"role": role, "content": c} for role, c in turns], generation_prompt=True)

    @property
    def chat_template(self) -> str:
        if not self._tok.chat_template:
            raise ChatFormatError(f"{self.folder}: the tokenizer has no chat template (chat_template.jinja, or "
                                  "'chat_template' in tokenizer_config.json)")
        return self._tok.chat_template

    def render_chat(self, messages: Messages, *, add_generation_prompt: bool = False,
                    continue_final_message: bool = False) -> str:
        self.chat_template  # noqa: B018 - a one-line error when there is none
        return self._tok.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message)

    def encode_marked(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def token_string(self, token_id: int) -> str:
        return self._tok.convert_ids_to_tokens(int(token_id))

    def identity(self) -> TokenizerIdentity:
        return TokenizerIdentity(self.name, self._sha256, self.vocab_size)

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """The folder's tokenizer files copied byte for byte, so the copy has the same identity (an export's
        tokenizer is then the one its training data was made with, for a later finetune of the export)."""
        out = epath.Path(out_dir)   # a local folder or gs://... (a training run's folder on a pod)
        out.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (self.folder / name).is_file():
                (out / name).write_bytes((self.folder / name).read_bytes())


def get_tokenizer(spec: Tokenizer | str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer `spec` names: None or "mistral" -> the built-in Mistral tokenizer; a folder -> its
    Hugging Face tokenizer (`HFTokenizer`), except a folder whose tokenizer.model is Mistral's own file (a
    Mistral-7B(-Instruct-v0.1/v0.2) download or our export), which gets the built-in one so its ids stay
    mistral_common's. A `Tokenizer` is returned as is. `TokenizerError` (one line) for anything else."""
    if isinstance(spec, Tokenizer):
        return spec
    if spec is None or spec == MISTRAL:
        return mistral_tokenizer()
    folder = pathlib.Path(spec)
    if not folder.is_dir():
        raise TokenizerError(f"{os.fspath(spec)}: no such folder; --tokenizer takes {MISTRAL!r} (Mistral 7B's, built "
                             "in) or a Hugging Face model or tokenizer folder")
    if (folder / "tokenizer.model").is_file() and _file_sha256(folder / "tokenizer.model") == tokenizer_sha256():
        return mistral_tokenizer()
    if not any((folder / name).is_file() for name in _MODEL_FILES):
        raise TokenizerError(f"{folder}: not a tokenizer folder: it has neither {' nor '.join(_MODEL_FILES)}")
    return HFTokenizer(folder)


# ---------------------------------------------------------------------------------------------- Mistral export

def _bpe_merges(sp: sentencepiece.SentencePieceProcessor) -> list[tuple[str, str]]:
    """BPE merges for `tokenizers` that reproduce SentencePiece's encoding.

    SentencePiece merges the adjacent pair whose *result* has the highest score, leftmost first on ties.
    `tokenizers` merges the pair with the lowest rank, so pairs are ranked by the score of their result.
    The only tied scores are the whitespace-only pieces (all -1e9); SentencePiece then grows the leftmost
    run first, which ranking longer left parts earlier reproduces.
    """
    normal = {
        sp.id_to_piece(i): sp.get_score(i)
        for i in range(sp.get_piece_size())
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))
    }
    ranked = []
    for piece, score in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, -len(left), left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]


def _build_hf_backend():
    """A `tokenizers.Tokenizer` that encodes like SentencePiece with this model, token for token.

    - normalizer: prepend "▁" to every text segment and turn spaces into "▁" (SentencePiece's dummy
      prefix and whitespace escaping; applied per segment between special tokens, which is exactly how
      `mistral_common` encodes each chat segment separately);
    - pre-tokenizer: split into SentencePiece's "words" (a run of "▁" plus the following non-"▁" text), as
      SentencePiece does with split_by_whitespace and allow_whitespace_only_pieces;
    - model: BPE with byte fallback and score-ranked merges.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    sp = load_tokenizer()
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=_bpe_merges(sp), unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(f"{SPACE}*[^{SPACE}]+|{SPACE}+"), behavior="isolated")
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens(
        [AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in (UNK_ID, BOS_ID, EOS_ID)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return backend


def write_hf_tokenizer(out_dir: str | os.PathLike) -> None:
    """Write tokenizer.model, tokenizer.json, tokenizer_config.json (with `MISTRAL_CHAT_TEMPLATE`) and
    special_tokens_map.json: the Mistral tokenizer as a Hugging Face folder.

    `transformers.AutoTokenizer.from_pretrained(out_dir)` then works offline and, for ordinary text
    (not containing the literal strings "<s>", "</s>", "<unk>"), gives `[BOS] + encode(text)`; its
    `apply_chat_template` gives `MistralTokenizer`'s `encode_chat` / `encode_prompt` ids. The class is
    `PreTrainedTokenizerFast` (a plain `tokenizers` backend, also in transformers 4.x) rather than the Hub's
    `LlamaTokenizer`, because transformers 5 rebuilds LlamaTokenizer's pre-tokenizer and then differs
    from SentencePiece on leading and repeated spaces; tokenizer.json here matches it exactly.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_file(), out / "tokenizer.model")
    _build_hf_backend().save(str(out / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "padding_side": "left",
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": MISTRAL_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
