"""The `paper-simple-24k` preset: the paper's simple format with prompts of ~23.4K Mistral tokens, all under
24,000 and over the documented minimum of 22,000, counted independently with mistral_common's encoder."""

import json

from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from data_gen import tasks
from data_gen.tokenizer import tokenizer_file

DOCUMENTED_MIN, LIMIT = 22_000, 24_000


def test_preset_fields():
    cfg = tasks.PRESETS["paper-simple-24k"]
    assert cfg == tasks.PRESETS["paper-simple"].replace(num_dicts=510, max_tokens=LIMIT)
    stats = tasks.check_budget(cfg)  # must return quickly (its ~2000 keys outnumber the 900 three-digit ones)
    assert stats["estimated_acceptance"] > 0.99


def test_prompts_between_minimum_and_24k(tmp_path):
    cfg = tasks.PRESETS["paper-simple-24k"].replace(num_train=4, num_eval=2, template=True)
    info = tasks.generate(cfg, 0, tmp_path, preset="paper-simple-24k", progress=False)
    tokenizer = MistralTokenizer.from_file(str(tokenizer_file()), mode=ValidationMode.finetuning)
    for split in ("train", "eval"):
        records = [json.loads(line) for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
        assert len(records) == info["splits"][split]["num_samples"]
        for r in records:
            user, answer = (m["content"] for m in r["messages"])
            n = len(tokenizer.encode_chat_completion(ChatCompletionRequest(
                messages=[UserMessage(content=user), AssistantMessage(content=answer)])).tokens)
            assert n == r["meta"]["num_tokens"] and DOCUMENTED_MIN < n < LIMIT
            assert user.count("\nDictionary [") == 510 and f"Dictionary [{r['meta']['gold_dict']}]" in answer
