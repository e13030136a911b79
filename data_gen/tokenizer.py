"""The real Mistral-7B (v0.1 / Instruct v0.1-v0.2) tokenizer, as shipped inside `mistral_common`.

Using the file bundled with `mistral_common` means nothing is downloaded at run time and the tokenizer is
bit-for-bit the one `mistral_common` itself uses, so our chat encoding can be checked against it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import os
import pathlib
import shutil
from collections.abc import Sequence

import sentencepiece

BOS_ID = 1
EOS_ID = 2
UNK_ID = 0
SPACE = "\u2581"  # SentencePiece's visible space, "▁"


@functools.cache
def tokenizer_file() -> pathlib.Path:
    """Path of `mistral_common/data/tokenizer.model.v1` (SentencePiece BPE, 32000 pieces)."""
    path = pathlib.Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall mistral-common (pip install 'mistral-common>=1.13')")
    return path


@functools.cache
def tokenizer_sha256() -> str:
    """Recorded in shard manifests so data tokenized with another tokenizer is never mixed in silently."""
    return hashlib.sha256(tokenizer_file().read_bytes()).hexdigest()


@functools.cache
def load_tokenizer() -> sentencepiece.SentencePieceProcessor:
    """The shared SentencePiece processor (cached: loading takes ~50 ms). Do not mutate it."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_file()))
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id()) == (BOS_ID, EOS_ID, UNK_ID), "unexpected tokenizer file"
    return sp


def encode(text: str) -> list[int]:
    """Token ids of `text` without BOS/EOS. SentencePiece prepends one "▁" (dummy prefix) to every call,
    exactly like `mistral_common` does for each chat segment."""
    return load_tokenizer().encode(text)


def encode_batch(texts: Sequence[str]) -> list[list[int]]:
    """Like `encode` for many strings at once (SentencePiece's C++ batch path)."""
    return load_tokenizer().encode(list(texts))


def decode(ids: Sequence[int]) -> str:
    """Text of `ids`; special tokens (<s>, </s>) are dropped."""
    return load_tokenizer().decode([int(i) for i in ids])


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
    """Write tokenizer.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    `transformers.AutoTokenizer.from_pretrained(out_dir)` then works offline and, for ordinary text
    (not containing the literal strings "<s>", "</s>", "<unk>"), gives `[BOS] + encode(text)`. The class is
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
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
