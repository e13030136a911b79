"""Hugging Face tokenizers in data_gen (`data_gen.tokenizer.HFTokenizer`), checked against transformers itself.

Small tokenizers are trained here with the `tokenizers` library and saved as Hugging Face folders with real chat
templates (SmolLM2's ChatML with its default system prompt, Llama 3's headers, Qwen2's ChatML), then read back
with `AutoTokenizer`: our ids must equal `apply_chat_template`'s, and our loss mask must select exactly each
answer's own tokens (`AutoTokenizer.encode(content)`) and its end-of-turn token. Then the same through the
command line (`generate --tokenizer`, `shards --tokenizer`), shard manifests, the token budget and the warm-up.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from data_gen import tasks
from data_gen.__main__ import main
from data_gen.shards import ShardError, TokenizedExample, open_shards, write_shards
from data_gen.tokenizer import (
    ChatFormatError,
    HFTokenizer,
    TokenizerError,
    TokenizerIdentity,
    get_tokenizer,
    mistral_tokenizer,
)

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_TEMPLATE = (  # Qwen2.5-Instruct's, without its tool-calling branches
    "{%- if messages[0]['role'] == 'system' %}\n    {{- '<|im_start|>system\n' + messages[0]['content'] + "
    "'<|im_end|>\n' }}\n{%- else %}\n    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
    "helpful assistant.<|im_end|>\n' }}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == "
    "\"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\") %}\n        "
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}\n    {%- endif %}\n"
    "{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\n' }}\n{%- endif %}\n"
)
# Llama 3's and Qwen2's pre-tokenizer patterns: digits in groups of up to three, or one by one.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclasses.dataclass(frozen=True)
class Style:
    """A model family's tokenizer: its pre-tokenizer, special tokens, chat template and end-of-turn token."""

    name: str
    template: str
    specials: tuple[str, ...]
    eos: str
    end_of_turn: str
    bos: str | None = None
    prepend_bos: bool = False  # the tokenizer adds `bos` to plain text (Llama 3)
    generation_eos: tuple[str, ...] | None = None  # generation_config.json's eos_token_id list
    split: str | None = None  # pre-tokenizer regex before byte-level; None: SmolLM2's digits + GPT-2 regex


SMOLLM2 = Style("smollm2", SMOLLM2_TEMPLATE, tuple(CHATML), eos="<|im_end|>", end_of_turn="<|im_end|>",
                bos="<|im_start|>")
# Llama-3-8B-Instruct: the tokenizer's eos is <|end_of_text|>; <|eot_id|> (which ends each turn) is only in
# generation_config.json's list.
LLAMA3 = Style("llama3", LLAMA3_TEMPLATE, ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                           "<|end_header_id|>", "<|eot_id|>"),
               eos="<|end_of_text|>", end_of_turn="<|eot_id|>", bos="<|begin_of_text|>", prepend_bos=True,
               generation_eos=("<|end_of_text|>", "<|eot_id|>"), split=LLAMA3_SPLIT)
QWEN2 = Style("qwen2", QWEN2_TEMPLATE, tuple(CHATML), eos="<|im_end|>", end_of_turn="<|im_end|>",
              generation_eos=("<|im_end|>", "<|endoftext|>"), split=QWEN2_SPLIT)
STYLES = (SMOLLM2, LLAMA3, QWEN2)


def _corpus() -> list[str]:
    cfg = tasks.PRESETS["demo-simple"]
    records = list(tasks.generate_split(cfg, 5, "corpus", 8, progress=False))
    words = ["You are a helpful AI assistant named SmolLM, trained by Hugging Face", "system user assistant",
             "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "Be brief. What is it?"]
    numbers = [" ".join(str(n) for n in range(k, 1000, 7)) for k in range(7)]  # every number up to 999
    return [m["content"] for r in records for m in r["messages"]] + words + numbers * 3


def make_folder(folder: Path, style: Style, *, template: str | None = None) -> Path:
    """A Hugging Face tokenizer folder: byte-level BPE trained on data_gen text, the style's special tokens and
    chat template (`template` overrides it), generation_config.json when the style has an eos list."""
    backend = Backend(models.BPE())
    if style.split is None:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(style.split), "isolated"),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1600, special_tokens=list(style.specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_corpus(), trainer)
    if style.prepend_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{style.bos} $A", special_tokens=[(style.bos, backend.token_to_id(style.bos))])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=style.bos, eos_token=style.eos,
                                  chat_template=template or style.template)
    tok.save_pretrained(folder)
    if style.generation_eos:
        ids = [backend.token_to_id(t) for t in style.generation_eos]
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[Style, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {style: make_folder(root / style.name, style) for style in STYLES}


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of every run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _conversations() -> list[list[dict]]:
    cfg = tasks.PRESETS["demo-simple"].replace(template=True)
    single = next(tasks.generate_split(cfg, 0, "train", 1, progress=False))["messages"]
    multi = next(tasks.multi_question_split(cfg, 0, "train", 1, questions=4))["messages"]
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 30?"},
              {"role": "assistant", "content": "42"}, {"role": "user", "content": "And 7?"},
              {"role": "assistant", "content": "It is 7."}]
    return [single, multi, system]


CONVERSATIONS = _conversations()


def _check_chat(tok, ref, end_of_turn: str, messages: list[dict]) -> None:
    """Our ids, mask and prompts against transformers' apply_chat_template and encode."""
    eot = ref.convert_tokens_to_ids(end_of_turn)
    enc = tok.encode_chat(messages)
    assert enc.input_ids.dtype == np.int32 and enc.loss_mask.dtype == bool
    assert enc.input_ids.tolist() == ref.apply_chat_template(messages, return_dict=False)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [enc.input_ids[a:b].tolist() for a, b in _runs(enc.loss_mask)] == \
        [ref.encode(c, add_special_tokens=False) + [eot] for c in answers]
    for k, m in enumerate(messages):
        if m["role"] == "user":
            assert tok.encode_prompt(messages[:k + 1]) == \
                ref.apply_chat_template(messages[:k + 1], add_generation_prompt=True, return_dict=False)


@pytest.mark.parametrize("style", STYLES, ids=lambda style: style.name)
def test_chat_ids_mask_and_prompts_match_transformers(folders, style):
    tok = get_tokenizer(folders[style])
    ref = AutoTokenizer.from_pretrained(folders[style])
    assert isinstance(tok, HFTokenizer)
    for messages in CONVERSATIONS:
        _check_chat(tok, ref, style.end_of_turn, messages)
    text = CONVERSATIONS[0][0]["content"]
    assert tok.encode_prompt(text) == ref.apply_chat_template([{"role": "user", "content": text}],
                                                              add_generation_prompt=True, return_dict=False)


@pytest.mark.parametrize("style", STYLES, ids=lambda style: style.name)
def test_plain_text_decode_vocab_and_stop_ids(folders, style):
    tok, ref = get_tokenizer(folders[style]), AutoTokenizer.from_pretrained(folders[style])
    text = "Dictionary [3] {12: 345, 6789: 10}\n\nReport  the value."
    assert tok.encode(text) == ref(text, add_special_tokens=False).input_ids
    assert tok.encode_text(text) == ref(text).input_ids
    bos = [ref.convert_tokens_to_ids(style.bos)] if style.prepend_bos else []
    assert tok.encode_text(text) == bos + tok.encode(text)
    ids = tok.encode_chat(CONVERSATIONS[2]).input_ids
    assert tok.decode(ids) == ref.decode(ids.tolist(), skip_special_tokens=True)
    assert tok.vocab_size == len(ref) and tok.name == style.name
    stops = {ref.convert_tokens_to_ids(t) for t in (style.generation_eos or ()) + (style.eos,)}
    assert set(tok.stop_ids) == stops and len(tok.stop_ids) == len(stops)


def test_stop_ids_from_generation_config(tmp_path, folders):
    folder = tmp_path / "llama"
    shutil.copytree(folders[LLAMA3], folder)
    ref = AutoTokenizer.from_pretrained(folder)
    eot, end = ref.convert_tokens_to_ids("<|eot_id|>"), ref.convert_tokens_to_ids("<|end_of_text|>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eot}))  # an int, not a list
    assert get_tokenizer(folder).stop_ids == (eot, end)
    (folder / "generation_config.json").unlink()  # without it <|eot_id|> ends no turn: no answer can be masked
    with pytest.raises(ChatFormatError, match=rf"{folder}: the chat template ends messages\[1\] \(assistant\) without "
                                              rf"an end-of-turn token \(none of the stop ids \[{end}\]"):
        get_tokenizer(folder).encode_chat(CONVERSATIONS[0])
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [eot, 10**6]}))
    with pytest.raises(TokenizerError, match=rf"{folder}: eos token id 1000000 .* is not a token id in \[0, "):
        get_tokenizer(folder)
    (folder / "generation_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=rf"{folder / 'generation_config.json'}: not a JSON object"):
        get_tokenizer(folder)


def _one_line_error(error_type, call) -> str:
    with pytest.raises(error_type) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# A template that renders earlier answers differently from the last one (as templates that drop reasoning do),
# and one whose generation prompt differs from how it writes an answer's header.
UNSTABLE_HISTORY = SMOLLM2_TEMPLATE.replace(
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
    "{% if message['role'] == 'assistant' and not loop.last %}{{ '<|im_start|>assistant\n(earlier)<|im_end|>\n' }}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}")
UNSTABLE_PROMPT = SMOLLM2_TEMPLATE.replace("{{ '<|im_start|>assistant\n' }}", "{{ '<|im_start|>bot\n' }}")
NO_END_OF_TURN = SMOLLM2_TEMPLATE.replace("message['content'] + '<|im_end|>'", "message['content'] + '<|endoftext|>'")
REFUSES_SYSTEM = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system messages here') }}{% endif %}" \
    + SMOLLM2_TEMPLATE


def test_templates_that_cannot_be_masked_are_one_line_errors(tmp_path):
    style = SMOLLM2
    history = get_tokenizer(make_folder(tmp_path / "history", style, template=UNSTABLE_HISTORY))
    history.encode_chat(CONVERSATIONS[0])  # one answer: nothing renders differently
    message = _one_line_error(ChatFormatError, lambda: history.encode_chat(CONVERSATIONS[1]))
    assert message.startswith(f"{tmp_path / 'history'}: chat template is not prefix-stable at messages[1]: "
                              "messages[:2] is not a token prefix of the whole conversation")
    prompt = get_tokenizer(make_folder(tmp_path / "prompt", style, template=UNSTABLE_PROMPT))
    message = _one_line_error(ChatFormatError, lambda: prompt.encode_chat(CONVERSATIONS[0]))
    assert message.startswith(f"{tmp_path / 'prompt'}: chat template is not prefix-stable at messages[1]: "
                              "messages[:1] with the generation prompt is not a token prefix of messages[:2]")
    no_end = get_tokenizer(make_folder(tmp_path / "no_end", style, template=NO_END_OF_TURN))
    message = _one_line_error(ChatFormatError, lambda: no_end.encode_chat(CONVERSATIONS[0]))
    assert "ends messages[1] (assistant) without an end-of-turn token" in message
    refuses = get_tokenizer(make_folder(tmp_path / "refuses", style, template=REFUSES_SYSTEM))
    refuses.encode_chat(CONVERSATIONS[0])
    message = _one_line_error(ChatFormatError, lambda: refuses.encode_chat(CONVERSATIONS[2]))
    assert message == f"{tmp_path / 'refuses'}: its chat template fails on messages[:5] (TemplateError: no system " \
                      "messages here)"


def test_chats_are_validated_like_mistral_ones(folders):
    tok = get_tokenizer(folders[QWEN2])
    with pytest.raises(ChatFormatError, match=r"messages\[1\]\.role must be 'assistant'"):
        tok.encode_chat([{"role": "user", "content": "q"}, {"role": "user", "content": "q"}])
    with pytest.raises(ChatFormatError, match="the last message must be a 'user' message"):
        tok.encode_prompt(CONVERSATIONS[0])
    with pytest.raises(ChatFormatError, match=r"messages\[0\]\.content must be a non-empty string"):
        tok.encode_prompt("")


def test_bad_tokenizer_folders_are_one_line_errors(tmp_path, folders):
    missing = tmp_path / "missing"
    assert _one_line_error(TokenizerError, lambda: get_tokenizer(missing)).startswith(f"{missing}: no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert _one_line_error(TokenizerError, lambda: get_tokenizer(empty)) == \
        f"{empty}: not a tokenizer folder: it has neither tokenizer.json nor tokenizer.model"
    broken = tmp_path / "broken"
    shutil.copytree(folders[SMOLLM2], broken)
    (broken / "tokenizer.json").write_text('{"model": ')
    assert _one_line_error(TokenizerError, lambda: get_tokenizer(broken)).startswith(
        f"{broken}: transformers cannot load its tokenizer (")
    bare = tmp_path / "bare"
    shutil.copytree(folders[SMOLLM2], bare)
    (bare / "chat_template.jinja").unlink()
    tok = get_tokenizer(bare)
    assert _one_line_error(ChatFormatError, lambda: tok.encode_chat(CONVERSATIONS[0])).startswith(
        f"{bare}: the tokenizer has no chat template")


def test_identity_follows_the_files(tmp_path, folders):
    tok = get_tokenizer(folders[QWEN2])
    identity = tok.identity()
    assert identity == TokenizerIdentity("qwen2", identity.sha256, len(AutoTokenizer.from_pretrained(folders[QWEN2])))
    assert TokenizerIdentity.from_json(json.loads(json.dumps(identity.to_json()))) == identity
    copy = tmp_path / "qwen2"
    shutil.copytree(folders[QWEN2], copy)
    (copy / "generation_config.json").unlink()  # not a tokenizer file
    assert get_tokenizer(copy).identity() == identity
    (copy / "chat_template.jinja").write_text(SMOLLM2_TEMPLATE)
    assert get_tokenizer(copy).identity().sha256 != identity.sha256
    assert len({identity.sha256, get_tokenizer(folders[SMOLLM2]).identity().sha256,
                mistral_tokenizer().identity().sha256}) == 3


@pytest.mark.parametrize("style", [LLAMA3, QWEN2], ids=lambda style: style.name)
def test_save_pretrained_keeps_the_chat_format(tmp_path, folders, style):
    get_tokenizer(folders[style]).save_pretrained(tmp_path / "out")
    assert get_tokenizer(tmp_path / "out").identity().sha256 == get_tokenizer(folders[style]).identity().sha256
    ref = AutoTokenizer.from_pretrained(tmp_path / "out")
    for messages in CONVERSATIONS:
        assert ref.apply_chat_template(messages, return_dict=False) == \
            get_tokenizer(folders[style]).encode_chat(messages).input_ids.tolist()


# ---------------------------------------------------------------- the stages: budget, generate, shards, warm-up


def test_budget_is_exact_only_when_every_digit_is_a_token(folders):
    smol, llama = get_tokenizer(folders[SMOLLM2]), get_tokenizer(folders[LLAMA3])
    ref = AutoTokenizer.from_pretrained(folders[LLAMA3])
    assert len(ref.tokenize("823")) == 1  # the reference: Llama 3 style makes three digits one token
    assert [len(AutoTokenizer.from_pretrained(folders[SMOLLM2]).tokenize(n)) for n in ("823", "4654")] == [3, 4]
    assert (smol.splits_digits, llama.splits_digits) == (True, False)
    cfg = tasks.PRESETS["demo-simple"].replace(max_tokens=4000, num_train=20, num_eval=0)
    for tok, exact in ((smol, True), (llama, False)):
        stats = tasks.check_budget(cfg, tokenizer=tok)
        assert stats["min_tokens_exact"] is exact
        counts = [r["meta"]["num_tokens"] for r in tasks.generate_split(cfg, 0, "train", 20, progress=False,
                                                                          tokenizer=tok)]
        assert stats["min_tokens"] <= min(counts)  # a lower bound of what is generated
        with pytest.raises(tasks.BudgetError, match="--num-dicts to about"):
            tasks.check_budget(cfg.replace(max_tokens=stats["min_tokens"] - 50), tokenizer=tok)


def test_commands_report_bad_tokenizers_in_one_line(tmp_path, folders):
    empty = tmp_path / "empty"
    empty.mkdir()
    bare = tmp_path / "bare"
    shutil.copytree(folders[SMOLLM2], bare)
    (bare / "chat_template.jinja").unlink()
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n")
    for folder, what in ((empty, f"{empty}: not a tokenizer folder"),
                         (bare, f"{data}:1: {bare}: the tokenizer has no chat template")):
        with pytest.raises(SystemExit, match=rf"^error: {what}"):
            main(["shards", "--input", str(data), "--out", str(tmp_path / "s"), "--tokenizer", str(folder),
                  "--no-progress"])
    with pytest.raises(SystemExit, match=rf"^error: {tmp_path / 'missing'}: no such folder"):
        main(["generate", "--preset", "demo-simple", "--tokenizer", str(tmp_path / "missing"), "--out",
              str(tmp_path / "g"), "--no-progress"])
    assert not (tmp_path / "g").exists()


def test_generate_command_counts_with_the_tokenizer(tmp_path, folders):
    folder = folders[LLAMA3]
    ref = AutoTokenizer.from_pretrained(folder)
    main(["generate", "--preset", "demo-simple", "--num-train", "6", "--num-eval", "2", "--max-tokens", "4000",
          "--tokenizer", str(folder), "--out", str(tmp_path), "--no-progress"])
    info = json.loads((tmp_path / "generation.json").read_text())
    assert info["tokenizer"] == {"name": "llama3", "sha256": get_tokenizer(folder).identity().sha256,
                                 "vocab_size": len(ref)}
    counts, mistral_counts = [], []
    for split in ("train", "eval"):
        for line in (tmp_path / f"{split}.jsonl").read_text().splitlines():
            record = json.loads(line)
            counts.append(record["meta"]["num_tokens"])
            assert counts[-1] == len(ref.apply_chat_template(record["messages"], return_dict=False)) < 4000
            mistral_counts.append(mistral_tokenizer().encode_chat(record["messages"]).input_ids.size)
    assert len(counts) == 8 and all(n != m for n, m in zip(counts, mistral_counts))


def test_shards_command_with_the_tokenizer(tmp_path, folders, capsys):
    folder = folders[QWEN2]
    ref = AutoTokenizer.from_pretrained(folder)
    eot = ref.convert_tokens_to_ids("<|im_end|>")
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    records = [{"messages": m, "meta": {"id": f"c{i}"}} for i, m in enumerate(CONVERSATIONS)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    (data.parent / "generation.json").write_text(json.dumps({"tokenizer": mistral_tokenizer().identity().to_json()}))
    main(["shards", "--input", str(data), "--out", str(tmp_path / "s"), "--tokenizer", str(folder), "--no-progress"])
    assert f"note: the token budget of {data} was counted with tokenizer 'mistral', not with 'qwen2'" in \
        capsys.readouterr().out
    identity = get_tokenizer(folder).identity()
    shards = open_shards(tmp_path / "s", tokenizer=get_tokenizer(folder))
    assert shards.manifest["tokenizer"] == {"name": "qwen2", "sha256": identity.sha256, "vocab_size": len(ref)}
    got = {b.source[i]["id"]: b.source[i] for b in shards.buckets for i in range(len(b.source))}
    for r in records:
        rec = got[r["meta"]["id"]]
        assert rec["input_ids"].tolist() == ref.apply_chat_template(r["messages"], return_dict=False)
        answers = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        assert [rec["input_ids"][a:b].tolist() for a, b in _runs(rec["loss_mask"])] == \
            [ref.encode(c, add_special_tokens=False) + [eot] for c in answers]
    open_shards(tmp_path / "s")  # no tokenizer given: not compared
    mistral = mistral_tokenizer().identity()
    message = _one_line_error(ShardError, lambda: open_shards(tmp_path / "s", tokenizer=mistral_tokenizer()))
    assert all(part in message for part in ("'qwen2'", identity.sha256, "'mistral'", mistral.sha256))


def test_write_shards_checks_ids_and_keeps_start_tokens_with_the_tokenizer(tmp_path, folders):
    llama = get_tokenizer(folders[LLAMA3])
    ref = AutoTokenizer.from_pretrained(folders[LLAMA3])
    bos = ref.convert_tokens_to_ids("<|begin_of_text|>")
    with pytest.raises(ShardError, match=rf"'y': token ids must lie in \[0, {len(ref)}\)"):
        write_shards([TokenizedExample("y", np.array([bos, len(ref)]), np.ones(2, bool))], tmp_path / "a",
                     progress=False, tokenizer=llama)
    enc = llama.encode_chat(CONVERSATIONS[0])
    write_shards([TokenizedExample("x", enc.input_ids, enc.loss_mask)], tmp_path / "b", buckets=(64,),
                 overflow="truncate", progress=False, tokenizer=llama)
    rec = open_shards(tmp_path / "b").buckets[0].source[0]
    assert ref("").input_ids == [bos]  # what Llama 3 starts every text with
    assert rec["input_ids"].tolist() == [bos, *enc.input_ids[-63:].tolist()]
    assert rec["loss_mask"].tolist() == [False, *enc.loss_mask[-63:].tolist()]


@pytest.mark.slow
def test_real_smollm2_tokenizer(smollm2_dir):
    tok, ref = get_tokenizer(smollm2_dir), AutoTokenizer.from_pretrained(smollm2_dir)
    assert isinstance(tok, HFTokenizer) and 2 in tok.stop_ids and ref.convert_ids_to_tokens(2) == "<|im_end|>"
    paper = tasks.PRESETS["paper-simple"].replace(template=True)
    chats = [r["messages"] for r in tasks.generate_split(paper, 0, "train", 3, progress=False)]
    chats += [r["messages"] for r in tasks.multi_question_split(paper, 0, "train", 2, questions=5)]
    for messages in chats + CONVERSATIONS:
        _check_chat(tok, ref, "<|im_end|>", messages)
    assert tok.splits_digits
    cfg = tasks.PRESETS["demo-simple"].replace(num_train=5, num_eval=0)
    for record in tasks.generate_split(cfg, 0, "train", 5, progress=False, tokenizer=tok):
        assert record["meta"]["num_tokens"] == len(ref.apply_chat_template(record["messages"], return_dict=False))
