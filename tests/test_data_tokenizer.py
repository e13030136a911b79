"""Tokenizer and chat format against independent references: mistral_common's own chat encoder, hand-written
token ids, and transformers' AutoTokenizer loading the files we write."""

import json
import random
import re
import time

import numpy as np
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from data_gen import tasks
from data_gen.chat import ChatFormatError, encode_chat, encode_prompt, render_chat
from data_gen.tokenizer import BOS_ID, EOS_ID, decode, encode, load_tokenizer, tokenizer_file, tokenizer_sha256
from data_gen.tokenizer import MISTRAL, HFTokenizer, get_tokenizer, write_hf_tokenizer

ROLE = {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage}


@pytest.fixture(scope="module")
def long_prompts():
    cfg = tasks.PRESETS["paper-simple"].replace(template=True)
    return [r["messages"][0]["content"] for r in tasks.generate_split(cfg, 7, "probe", 3, progress=False)]


@pytest.fixture(scope="module")
def mistral():
    serving = MistralTokenizer.v1()
    training = MistralTokenizer.from_file(str(tokenizer_file()), mode=ValidationMode.finetuning)
    return serving, training


def _mc_tokens(tok, messages):
    request = ChatCompletionRequest(messages=[ROLE[m["role"]](content=m["content"]) for m in messages])
    return tok.encode_chat_completion(request).tokens


PROMPTS = [
    "Hello",
    "What is 2+2? Answer with a number.",
    "Dictionary [1] {1234: 5678, 99: 100}\nReport the value of key 99.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\n\n  and   runs    of spaces",
    "unicode: café, 日本語, emoji 🤗, math ∑x²",
    "0123456789 00 007 " * 40,
]


def test_tokenizer_file_is_mistral_v1():
    sp = load_tokenizer()
    assert tokenizer_file().name == "tokenizer.model.v1"
    assert sp.get_piece_size() == 32000
    assert (sp.id_to_piece(BOS_ID), sp.id_to_piece(EOS_ID)) == ("<s>", "</s>")
    assert len(tokenizer_sha256()) == 64


def test_prompt_ids_match_mistral_common(mistral, long_prompts):
    serving, _ = mistral
    for text in PROMPTS + long_prompts:
        assert encode_prompt(text) == _mc_tokens(serving, [{"role": "user", "content": text}]), text[:60]
    assert len(encode_prompt(long_prompts[0])) > 3500


def test_chat_ids_match_mistral_common(mistral, long_prompts):
    _, training = mistral
    conversations = [
        [{"role": "user", "content": long_prompts[1]}, {"role": "assistant", "content": "The value of key 12 is 345."}],
        [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
         {"role": "user", "content": " 42 "}, {"role": "assistant", "content": "  43\n"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"},
         {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}],
    ]
    for messages in conversations:
        enc = encode_chat(messages)
        assert enc.input_ids.dtype == np.int32 and enc.loss_mask.dtype == bool
        assert enc.input_ids.tolist() == _mc_tokens(training, messages)


def test_loss_mask_by_hand():
    # <s> ▁[ INST ] ▁u 1 ▁[ / INST ] | ▁a 1 </s> | ▁[ INST ] ▁u 2 ▁[ / INST ] | ▁a 2 </s>
    enc = encode_chat([{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
                       {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}])
    assert enc.input_ids.tolist() == [1, 733, 16289, 28793, 332, 28740, 733, 28748, 16289, 28793, 264, 28740, 2,
                                      733, 16289, 28793, 332, 28750, 733, 28748, 16289, 28793, 264, 28750, 2]
    assert np.flatnonzero(enc.loss_mask).tolist() == [10, 11, 12, 22, 23, 24]
    assert decode(enc.input_ids[enc.loss_mask]) == "a1 a2"

    answer = "The value of key 4654 is 823 and it is in Dictionary [28]."
    enc = encode_chat([{"role": "user", "content": "question"}, {"role": "assistant", "content": answer}])
    n_answer = len(encode(answer)) + 1  # + </s>
    assert enc.loss_mask.sum() == n_answer and enc.loss_mask[-n_answer:].all() and not enc.loss_mask[:-n_answer].any()
    assert enc.input_ids[-1] == EOS_ID and decode(enc.input_ids[-n_answer:]) == answer


@pytest.mark.parametrize("messages, fragment", [
    ([], "non-empty list"),
    ([{"role": "user", "content": "q"}], "last message must be a 'assistant'"),
    ([{"role": "assistant", "content": "a"}], "messages[0].role must be 'user'"),
    ([{"role": "user", "content": "q"}, {"role": "user", "content": "q"}], "messages[1].role must be 'assistant'"),
    ([{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}], "messages[0].content"),
    ([{"role": "bot", "content": "q"}], "messages[0].role"),
])
def test_chat_errors_name_the_message(messages, fragment):
    with pytest.raises(ChatFormatError, match=re.escape(fragment)):
        encode_chat(messages)


def test_tokenizing_350_long_prompts_is_fast(long_prompts):
    messages = [[{"role": "user", "content": p}, {"role": "assistant", "content": "The value is 1."}]
                for p in long_prompts] * 117
    start = time.perf_counter()
    total = sum(encode_chat(m).input_ids.size for m in messages)
    assert total > 350 * 3500
    assert time.perf_counter() - start < 10


def test_hf_tokenizer_encodes_identically(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from data_gen.tokenizer import write_hf_tokenizer

    plain, with_config = tmp_path / "tok", tmp_path / "model"
    write_hf_tokenizer(plain)
    write_hf_tokenizer(with_config)  # as in an exported model directory, next to a Mistral config.json
    (with_config / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    assert {p.name for p in plain.iterdir()} == {"tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                                                 "special_tokens_map.json"}
    rng = random.Random(0)
    alphabet = "abc xyz  019,.:;[]{}()\n\t-é日🤗"
    runs = [" " * k for k in range(40)] + ["x" + " " * k + "y" for k in (14, 15, 16, 17, 31, 33)]  # whitespace pieces
    texts = PROMPTS + runs + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
                                                         for _ in range(200)]
    conversation = [{"role": "user", "content": "Report key 123."}, {"role": "assistant", "content": "It is 4567."},
                    {"role": "user", "content": "And 89?"}, {"role": "assistant", "content": "It is 10."}]
    for directory in (plain, with_config):
        tok = AutoTokenizer.from_pretrained(directory)
        assert (tok.bos_token_id, tok.eos_token_id) == (BOS_ID, EOS_ID)
        for text in texts:
            ids = tok(text).input_ids
            assert ids == [BOS_ID, *encode(text)], repr(text)
            assert tok.decode(ids, skip_special_tokens=True) == decode(ids), repr(text)
        assert tok(render_chat(conversation), add_special_tokens=False).input_ids == \
            encode_chat(conversation).input_ids.tolist()
        prompt = conversation[:1]
        assert render_chat(prompt) == "<s>[INST] Report key 123. [/INST]"
        assert tok(render_chat(prompt), add_special_tokens=False).input_ids == encode_prompt("Report key 123.")


CONVERSATIONS = [
    [{"role": "user", "content": "Report key 123."}, {"role": "assistant", "content": "It is 4567."}],
    [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
     {"role": "user", "content": " 42 "}, {"role": "assistant", "content": "  43\n"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"},
     {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}],
]


def test_exported_chat_template_gives_mistral_common_ids(tmp_path, mistral, long_prompts):
    """The Mistral folder we export (jaxtrain's model export writes the same files) carries a chat template:
    transformers' apply_chat_template on it gives mistral_common's ids, for training chats and for prompts."""
    from transformers import AutoTokenizer

    serving, training = mistral
    get_tokenizer(MISTRAL).save_pretrained(tmp_path / "tok")
    write_hf_tokenizer(tmp_path / "model")  # as in an exported model directory, next to a Mistral config.json
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "mistral",
                                                                "architectures": ["MistralForCausalLM"]}))
    for directory in (tmp_path / "tok", tmp_path / "model"):
        tok = AutoTokenizer.from_pretrained(directory)
        for messages in CONVERSATIONS + [[{"role": "user", "content": long_prompts[0]},
                                          {"role": "assistant", "content": "The value of key 12 is 345."}]]:
            assert tok.apply_chat_template(messages, return_dict=False) == _mc_tokens(training, messages)
            assert tok.apply_chat_template(messages, return_dict=False) == encode_chat(messages).input_ids.tolist()
            prompt = messages[:-1]
            assert tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False) == \
                _mc_tokens(serving, prompt) == get_tokenizer(MISTRAL).encode_prompt(prompt)
        for text in PROMPTS:
            user = [{"role": "user", "content": text}]
            assert tok.apply_chat_template(user, add_generation_prompt=True, return_dict=False) == encode_prompt(text)


def test_any_template_mask_on_the_mistral_export(tmp_path, mistral):
    """HFTokenizer's template-generic answer mask, run on the exported Mistral folder: the ids are
    mistral_common's, and the mask is exactly each answer's SentencePiece tokens plus </s>."""
    _, training = mistral
    raw = training.instruct_tokenizer.tokenizer
    write_hf_tokenizer(tmp_path)
    tok = HFTokenizer(tmp_path)
    assert tok.stop_ids == (EOS_ID,) and tok.vocab_size == 32000
    for messages in CONVERSATIONS:
        enc = tok.encode_chat(messages)
        assert enc.input_ids.tolist() == _mc_tokens(training, messages)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], enc.loss_mask.astype(int), [0]])))
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert [enc.input_ids[a:b].tolist() for a, b in zip(edges[::2], edges[1::2])] == \
            [raw.encode(c, bos=False, eos=False) + [EOS_ID] for c in answers]
        np.testing.assert_array_equal(enc.loss_mask, encode_chat(messages).loss_mask)


def test_mistral_folders_get_the_builtin_tokenizer(tmp_path):
    """A folder holding Mistral's own tokenizer.model (a Mistral-7B-Instruct-v0.1 download, or our export) gets
    the built-in tokenizer, whose identity is that file's sha256."""
    import hashlib
    import importlib.resources
    import shutil

    from data_gen.tokenizer import MistralTokenizer, TokenizerIdentity

    v1 = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    download = tmp_path / "Mistral-7B-Instruct-v0.1"
    download.mkdir()
    shutil.copyfile(str(v1), download / "tokenizer.model")
    write_hf_tokenizer(tmp_path / "export")
    builtin = get_tokenizer(None)
    assert isinstance(builtin, MistralTokenizer)
    assert get_tokenizer(MISTRAL) is builtin and get_tokenizer(download) is builtin
    assert get_tokenizer(tmp_path / "export") is builtin and get_tokenizer(builtin) is builtin
    assert builtin.identity() == TokenizerIdentity("mistral", hashlib.sha256(v1.read_bytes()).hexdigest(), 32000)
    assert builtin.stop_ids == (EOS_ID,) and builtin.splits_digits
    assert builtin.encode_text("Hello") == [BOS_ID, *encode("Hello")] and builtin.decode(encode("a b")) == "a b"
