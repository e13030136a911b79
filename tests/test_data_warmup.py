"""The demo's warm-up data (dictionary recall with a widening separator), read back through mistral-common's
own copy of the Mistral tokenizer: the text is what it claims, the loss covers exactly the asked values."""

import re

import numpy as np
import pytest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from data_gen.warmup import SEPARATORS, dictionary_recall

TOKENIZER = MistralTokenizer.v1().instruct_tokenizer.tokenizer


@pytest.mark.parametrize("separator", SEPARATORS)
@pytest.mark.parametrize("key_digits,value_digits", [(1, 1), (1, 2), (2, 2)])
def test_recall_sequences(separator, key_digits, value_digits):
    examples = list(dictionary_recall(3, 20, separator, key_digits=key_digits, value_digits=value_digits))
    assert len(examples) == 20 and len({ex.id for ex in examples}) == 20
    entry = re.compile(rf"(\d{{{key_digits}}}){re.escape(separator)}(\d{{{value_digits}}})")
    for ex in examples:
        assert ex.input_ids[0] == TOKENIZER.bos_id
        text = TOKENIZER.decode([int(i) for i in ex.input_ids])
        dicts, asked = text.split("\n\n")
        lines = dicts.split("\n")
        assert 1 <= len(lines) <= 3
        table = {}
        for number, line in enumerate(lines, 1):
            head, body = re.fullmatch(r"Dictionary \[(\d)\] \{(.*)\}", line).groups()
            assert int(head) == number
            parts = body.split(", ")
            assert 2 <= len(parts) <= 3
            for part in parts:
                key, value = entry.fullmatch(part).groups()
                assert key not in table and key[0] != "0" and value[0] != "0"
                table[key] = value
        questions = asked.split("\n")
        assert len(questions) == min(8, len(table)) and len(set(questions)) == len(questions)
        values = []
        for question in questions:
            key, value = entry.fullmatch(question).groups()
            assert table[key] == value
            values.append(value)
        supervised = TOKENIZER.decode([int(i) for i in np.asarray(ex.input_ids)[ex.loss_mask]])
        assert supervised.replace(" ", "") == "".join(values)
        assert ex.loss_mask.sum() == value_digits * len(questions)


def test_recall_is_reproducible_and_stages_differ():
    first = [ex.input_ids.tolist() for ex in dictionary_recall(0, 5, ": ")]
    assert first == [ex.input_ids.tolist() for ex in dictionary_recall(0, 5, ": ")]
    assert first != [ex.input_ids.tolist() for ex in dictionary_recall(1, 5, ": ")]


def test_recall_refuses_what_it_cannot_make():
    with pytest.raises(ValueError, match="not one of the warm-up stages"):
        next(dictionary_recall(0, 1, " = "))
    with pytest.raises(ValueError, match="need 12 distinct 1-digit keys; there are only 9"):
        next(dictionary_recall(0, 1, ": ", max_dicts=4, dict_sizes=(2, 3)))
