"""The paper's synthetic retrieval tasks (Xiong et al., ICLR 2025, §2 and App. A).

*Simple* dictionary key-value retrieval: `num_dicts` dictionaries of random integer keys/values, one a line;
the model must report the value of one key and the dictionary it is in. *Multi-subkey* retrieval: keys are
tuples of integers, some distractor keys share subkeys with the gold key, and the question lists the gold
key's subkeys in shuffled order.

Everything is drawn from `random.Random` seeded with a string (hashed with SHA-512 by Python), so a config and
a seed give byte-identical JSONL on any machine. Token counts (the `max_tokens` budget, meta `num_tokens`) are
those of the chat encoding of the tokenizer given (`data_gen.tokenizer`; Mistral 7B's by default).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pathlib
import random
import statistics
from collections.abc import Callable, Iterator
from typing import Literal

import tqdm

from data_gen.records import dumps_record, write_generation, write_split  # noqa: F401 - dumps_record: eval.demo's
from data_gen.tokenizer import Tokenizer, get_tokenizer

INTRO = "Do a task using the list of dictionaries below."
MAX_TRIES = 1000  # per sample, as in the reference generator
REFERENCE_MARGIN = 100
"""the authors' prompt-only budget: a prompt must have fewer than max_tokens - REFERENCE_MARGIN tokens"""


class BudgetError(ValueError):
    """A config whose prompts do not fit `max_tokens`; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Generator settings. Every field is a command-line flag of `python -m data_gen generate`."""

    task: Literal["simple", "multisubkey"] = "simple"
    """which task: simple (integer keys) or multisubkey (tuple-of-integer keys)"""
    num_train: int = 350
    """number of training samples (train.jsonl)"""
    num_eval: int = 150
    """number of evaluation samples (eval.jsonl)"""
    num_dicts: int = 85
    """dictionaries per prompt (the gold one included)"""
    gold_dict_size: int = 3
    """entries in the dictionary that holds the gold key"""
    dict_size_range: tuple[int, int] = (3, 4)
    """inclusive range of the number of entries of every other dictionary"""
    key_digits: tuple[int, int] = (3, 4)
    """inclusive range of digit counts of keys (of each subkey for multisubkey)"""
    value_digits: tuple[int, int] = (3, 4)
    """inclusive range of digit counts of values"""
    template: bool = False
    """append the answer template to the prompt ('with answer template' variant)"""
    max_tokens: int = 4096
    """every example (prompt, answer and </s>) has fewer tokens than this; longer draws are redrawn"""
    first_fraction: float = 0.05
    """fraction of samples (floored) whose gold dictionary is put first"""
    early_fraction: float = 0.03
    """fraction of further samples (floored) whose gold dictionary is among the first `early_positions`"""
    early_positions: int | None = None
    """positions used by early_fraction; None = floor(first_fraction * samples), as the reference does"""
    subkeys_range: tuple[int, int] = (3, 4)
    """multisubkey: inclusive range of the number of subkeys per key"""
    share_prob: float = 0.15
    """multisubkey: probability that a distractor key reuses some (never all) of the gold key's subkeys"""
    min_sharing_keys: int = 2
    """multisubkey: at least this many distractor keys share subkeys with the gold key"""
    sampler: Literal["ours", "reference"] = "ours"
    """simple task: 'ours' (keys never repeat; the whole chat < max_tokens) or 'reference', the authors' published
    sampler (keys drawn independently, so they repeat and a dictionary whose keys collide shrinks; the prompt
    alone < max_tokens - 100)"""

    def replace(self, **kw) -> TaskConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    def validate(self) -> None:
        """Reject impossible settings with a message naming the field."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        for name in ("dict_size_range", "key_digits", "value_digits", "subkeys_range"):
            lo, hi = getattr(self, name)
            need(1 <= lo <= hi, f"{name} must be (low, high) with 1 <= low <= high, got {(lo, hi)}")
        need(self.task in ("simple", "multisubkey"), f"task must be 'simple' or 'multisubkey', got {self.task!r}")
        need(self.num_train >= 0 and self.num_eval >= 0, "num_train and num_eval must be >= 0")
        need(self.num_dicts >= 1, f"num_dicts must be >= 1, got {self.num_dicts}")
        need(self.gold_dict_size >= 1, f"gold_dict_size must be >= 1, got {self.gold_dict_size}")
        need(0 <= self.first_fraction and 0 <= self.early_fraction and self.first_fraction + self.early_fraction <= 1,
             "first_fraction and early_fraction must be >= 0 and sum to at most 1")
        need(self.early_positions is None or self.early_positions >= 1, "early_positions must be >= 1 (or None)")
        need(0 <= self.share_prob <= 1, f"share_prob must lie in [0, 1], got {self.share_prob}")
        need(self.min_sharing_keys >= 0, f"min_sharing_keys must be >= 0, got {self.min_sharing_keys}")
        need(self.sampler in ("ours", "reference"), f"sampler must be 'ours' or 'reference', got {self.sampler!r}")
        entries = self.gold_dict_size + (self.num_dicts - 1) * self.dict_size_range[1]
        if self.sampler == "reference":
            need(self.task == "simple", "sampler 'reference' exists for the simple task only (the authors' published "
                 "generator runs the simple task only)")
            need(self.max_tokens > REFERENCE_MARGIN, f"max_tokens must exceed {REFERENCE_MARGIN} with sampler "
                 f"'reference' (its prompt budget is max_tokens - {REFERENCE_MARGIN}), got {self.max_tokens}")
        elif self.task == "simple":
            keys = 10 ** self.key_digits[1] - 10 ** (self.key_digits[0] - 1)
            need(keys >= 2 * entries + 2, f"key_digits {self.key_digits} give {keys} distinct keys, too few for up to "
                 f"{entries} unique keys: widen key_digits or use fewer/smaller dictionaries")
        else:
            subkeys = 10 ** self.key_digits[1] - 10 ** (self.key_digits[0] - 1)
            need(self.subkeys_range[0] >= 2, "subkeys_range must start at 2 or more for multisubkey, so that a key "
                 "can share some but not all of the gold key's subkeys")
            need(subkeys >= 2 * self.subkeys_range[1] + 4, f"key_digits {self.key_digits} give too few subkeys")
            need(self.min_sharing_keys <= entries - 1, f"min_sharing_keys {self.min_sharing_keys} exceeds the "
                 f"{entries - 1} distractor keys available")


PRESETS: dict[str, TaskConfig] = {
    # The paper's Mistral 7B setting (§2, App. A.1).
    "paper-simple": TaskConfig(),
    # Multi-subkey task (Fig. 2, used for GPT-3.5 Turbo): 49 dictionaries of 2-4 entries, keys of 3-4
    # three-digit subkeys, four-digit values, as in the paper's figure.
    "paper-multisubkey": TaskConfig(task="multisubkey", num_dicts=49, dict_size_range=(2, 4), key_digits=(3, 3),
                                    value_digits=(4, 4), subkeys_range=(3, 4), max_tokens=4096),
    # The paper's long-context setting (Mistral-7B-Instruct-v0.2 finetuned on prompts of up to 24K tokens):
    # the paper-simple format with 510 dictionaries, every example under 24,000 tokens (~23.4K).
    "paper-simple-24k": TaskConfig(num_dicts=510, max_tokens=24000),
    # Tiny prompts for the CPU demo and tests.
    "demo-simple": TaskConfig(num_train=64, num_eval=32, num_dicts=5, gold_dict_size=2, dict_size_range=(2, 3),
                              key_digits=(2, 2), value_digits=(2, 2), max_tokens=256),
}


# ---------------------------------------------------------------------------------------------- drawing


def _number(rng: random.Random, digits: tuple[int, int]) -> int:
    n = rng.randint(*digits)
    return rng.randint(10 ** (n - 1) if n > 1 else 0, 10**n - 1)


def _fresh(rng: random.Random, digits: tuple[int, int], taken: set[int]) -> int:
    while (x := _number(rng, digits)) in taken:
        pass
    return x


def _dict_sizes(cfg: TaskConfig, rng: random.Random) -> list[int]:
    """Entry counts of the gold dictionary (first) and the num_dicts - 1 others."""
    return [cfg.gold_dict_size] + [rng.randint(*cfg.dict_size_range) for _ in range(cfg.num_dicts - 1)]


def _key_str(key) -> str:
    return str(key) if isinstance(key, int) else "(" + ", ".join(map(str, key)) + ")"


def _render_dicts(dicts: list[list[tuple]]) -> str:
    return "\n".join(
        f"Dictionary [{i}] {{" + ", ".join(f"{_key_str(k)}: {v}" for k, v in d) + "}"
        for i, d in enumerate(dicts, start=1)
    )


def _fill_dicts(sizes: list[int], gold_index: int, gold_entry: tuple, distractor: Callable[[], tuple]
                ) -> list[list[tuple]]:
    """Entries of every dictionary (the gold one first, the gold entry at `gold_index`); the other entries
    come from `distractor()`, called in reading order so that the random draws keep their order."""
    return [[gold_entry if d == 0 and j == gold_index else distractor() for j in range(size)]
            for d, size in enumerate(sizes)]


@dataclasses.dataclass
class _Draw:
    """One drawn prompt before placement: dicts[0] is the gold dictionary."""

    dicts: list[list[tuple]]
    gold_key: object
    gold_value: int
    gold_key_index: int
    question: str
    template: str
    answer: str
    extra_meta: dict


def _draw_simple(cfg: TaskConfig, rng: random.Random) -> _Draw:
    gold_key = _number(rng, cfg.key_digits)
    gold_value = _fresh(rng, cfg.value_digits, {gold_key})
    keys = {gold_key, gold_value}  # a key never repeats, and never equals the gold value
    sizes = _dict_sizes(cfg, rng)
    gold_index = rng.randrange(cfg.gold_dict_size)

    def distractor() -> tuple[int, int]:
        key = _fresh(rng, cfg.key_digits, keys)
        keys.add(key)
        return key, _fresh(rng, cfg.value_digits, {gold_value, gold_key})

    dicts = _fill_dicts(sizes, gold_index, (gold_key, gold_value), distractor)
    return _Draw(dicts, gold_key, gold_value, gold_index, **_draw_simple_texts(gold_key, gold_value), extra_meta={})


def _draw_simple_texts(gold_key: int, gold_value: int) -> dict[str, str]:
    """The simple task's question, answer template and answer ({dict} left to fill)."""
    return {
        "question": ("Above is a list of dictionaries such that each key and value is an integer. "
                     f"Report the value of key {gold_key} and the dictionary it is in."),
        "template": (f"The value of key {gold_key} is <fill-in-value> and it is in Dictionary "
                     "[<fill-in-dictionary-name>]."),
        "answer": f"The value of key {gold_key} is {gold_value} and it is in Dictionary [{{dict}}].",
    }


def _draw_multisubkey(cfg: TaskConfig, rng: random.Random) -> _Draw:
    gold_len = rng.randint(*cfg.subkeys_range)
    gold_subkeys: list[int] = []
    for _ in range(gold_len):
        gold_subkeys.append(_fresh(rng, cfg.key_digits, set(gold_subkeys)))
    gold_key = tuple(gold_subkeys)
    gold_value = _fresh(rng, cfg.value_digits, set(gold_subkeys))
    reserved = set(gold_subkeys) | {gold_value}  # fresh subkeys avoid the gold subkeys and the gold value
    sizes = _dict_sizes(cfg, rng)
    gold_index = rng.randrange(cfg.gold_dict_size)
    num_distractors = sum(sizes) - 1
    forced = set(rng.sample(range(num_distractors), min(cfg.min_sharing_keys, num_distractors)))
    seen = {frozenset(gold_key)}
    sharing = 0

    def distractors() -> Iterator[tuple[tuple[int, ...], int]]:
        nonlocal sharing
        for slot in itertools.count():
            share = slot in forced or rng.random() < cfg.share_prob
            while True:
                n = rng.randint(*cfg.subkeys_range)
                shared = rng.sample(gold_subkeys, rng.randint(1, min(gold_len - 1, n))) if share else []
                key = list(shared)
                while len(key) < n:
                    key.append(_fresh(rng, cfg.key_digits, reserved | set(key)))
                rng.shuffle(key)
                if frozenset(key) not in seen:  # keys are unique even as unordered sets
                    break
            seen.add(frozenset(key))
            sharing += bool(shared)
            yield tuple(key), _fresh(rng, cfg.value_digits, {gold_value})

    dicts = _fill_dicts(sizes, gold_index, (gold_key, gold_value), distractors().__next__)
    asked = list(gold_subkeys)
    while len(asked) > 1 and tuple(asked) == gold_key:
        rng.shuffle(asked)
    asked_str = ", ".join(map(str, asked))
    lead = f"The key that contains exactly the integers {asked_str} is"
    return _Draw(
        dicts, gold_key, gold_value, gold_index,
        question=("Above is a list of dictionaries such that each key is a tuple of integers and each value is an "
                  f"integer. Report the key that contains exactly the integers {asked_str} (in any order), its value, "
                  "and the dictionary it is in."),
        template=(f"{lead} <fill-in-key>, its value is <fill-in-value> and it is in "
                  "Dictionary [<fill-in-dictionary-name>]."),
        answer=f"{lead} {_key_str(gold_key)}, its value is {gold_value} and it is in Dictionary [{{dict}}].",
        extra_meta={"asked_subkeys": asked, "num_sharing_keys": sharing},
    )


def _reference_number(rng: random.Random, digits: tuple[int, int]) -> int:
    """The authors' number: a digit count uniform over `digits`, then uniform over the numbers of that many
    digits (1..9 for one digit: unlike `_number`, never 0)."""
    n = rng.randint(*digits)
    return rng.randint(10 ** (n - 1), 10**n - 1)


def _draw_simple_reference(cfg: TaskConfig, rng: random.Random) -> _Draw:
    """The simple task as the authors' published generator samples it (edixiong/artificial-needles,
    data-generation/scripts/dict_builder.py, reimplemented from its behaviour).

    Every key and value is drawn independently; a distractor pair is redrawn, key and value together, only when
    its key equals the gold key or its value the gold value. Keys therefore repeat across dictionaries (~12.6 per
    paper-simple prompt), a distractor key may equal the gold value, and each dictionary is a Python dict: a key
    drawn twice for the same dictionary keeps its first place and its last value, so that dictionary shrinks
    (below dict_size_range[0], e.g. 2 entries). The gold dictionary is built the same way around the gold entry.
    """
    gold_index = rng.randrange(cfg.gold_dict_size)
    gold_key = _reference_number(rng, cfg.key_digits)
    gold_value = _reference_number(rng, cfg.value_digits)

    def fill(size: int, gold_at: int | None) -> list[tuple[int, int]]:
        entries: dict[int, int] = {}
        for j in range(size):
            if j == gold_at:
                entries[gold_key] = gold_value
                continue
            while True:
                key, value = _reference_number(rng, cfg.key_digits), _reference_number(rng, cfg.value_digits)
                if key != gold_key and value != gold_value:
                    break
            entries[key] = value
        return list(entries.items())

    dicts = [fill(cfg.gold_dict_size, gold_index)]
    dicts += [fill(rng.randint(*cfg.dict_size_range), None) for _ in range(cfg.num_dicts - 1)]
    simple = _draw_simple_texts(gold_key, gold_value)
    return _Draw(dicts, gold_key, gold_value, [k for k, _ in dicts[0]].index(gold_key), **simple, extra_meta={})


_DRAW: dict[str, Callable[[TaskConfig, random.Random], _Draw]] = {
    "simple": _draw_simple, "multisubkey": _draw_multisubkey}


def _draw_fn(cfg: TaskConfig) -> Callable[[TaskConfig, random.Random], _Draw]:
    return _draw_simple_reference if cfg.sampler == "reference" else _DRAW[cfg.task]


def _placed_dicts(draw: _Draw, position: int) -> list[list[tuple]]:
    """The dictionaries in prompt order, the gold one at 1-based `position`."""
    dicts = draw.dicts[1:]
    dicts.insert(position - 1, draw.dicts[0])
    return dicts


def _place(cfg: TaskConfig, draw: _Draw, position: int) -> tuple[str, str]:
    """(prompt, answer) with the gold dictionary at 1-based `position`."""
    prompt = f"{INTRO}\n\n{_render_dicts(_placed_dicts(draw, position))}\n\n{draw.question}"
    if cfg.template:
        prompt += f" Answer in the following template:\n{draw.template}"
    return prompt, draw.answer.format(dict=position)


def _num_tokens(tokenizer: Tokenizer, prompt: str, answer: str) -> int:
    chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return int(tokenizer.encode_chat(chat).input_ids.size)


def budget_limit(cfg: TaskConfig) -> int:
    """The exclusive token limit of the budget: `max_tokens` for the whole chat (ours), or the authors'
    `max_tokens - REFERENCE_MARGIN` for the prompt alone (sampler 'reference')."""
    return cfg.max_tokens - REFERENCE_MARGIN if cfg.sampler == "reference" else cfg.max_tokens


def _budget_tokens(cfg: TaskConfig, tokenizer: Tokenizer, prompt: str, answer: str) -> int:
    """What `budget_limit` bounds: the whole chat (ours), or the prompt as the model is given it, the chat
    prompt of `tokenizer` (sampler 'reference'; the authors counted Llama 2's BOS + prompt text, which is the
    template's few tokens shorter)."""
    if cfg.sampler == "reference":
        return len(tokenizer.encode_prompt(prompt))
    return _num_tokens(tokenizer, prompt, answer)


# ---------------------------------------------------------------------------------------------- budget


def check_budget(cfg: TaskConfig, probes: int = 48, tokenizer: Tokenizer | None = None) -> dict:
    """Refuse, before generating anything, a config whose prompts (almost) never fit the budget (`budget_limit`)
    when counted with `tokenizer` (default Mistral's).

    The token count of a prompt does not depend on where the gold dictionary is. When every digit is a token
    of its own (`Tokenizer.splits_digits`: Mistral's, Qwen2's, SmolLM2's), a number costs as many tokens as
    it has digits, so the smallest prompt a config can produce is measured exactly from one draw of the
    smallest sizes. Other tokenizers (Llama 3 groups up to three digits) make that draw only an estimate of
    the minimum, and so does the reference sampler (its dictionaries can shrink); the estimate is not used to
    refuse: conservative, a config is then refused only on the acceptance estimate, and generation still stops
    a config that never fits after MAX_TRIES draws of a sample. The typical size is estimated from `probes`
    draws (own RNG, so the dataset itself is unaffected). Returns the statistics.
    """
    cfg.validate()
    tokenizer = get_tokenizer(tokenizer)
    draw, limit = _draw_fn(cfg), budget_limit(cfg)
    # Shortest keys only where they are numerous enough to stay unique (a 24K prompt has ~2000 keys, more
    # than the 900 three-digit ones: drawing only those would never finish).
    lo = cfg.key_digits[0]
    fewest_entries = cfg.gold_dict_size + (cfg.num_dicts - 1) * cfg.dict_size_range[0]
    short_keys = (cfg.task == "multisubkey" or cfg.sampler == "reference"
                  or 10**lo - 10 ** (lo - 1) >= 2 * fewest_entries + 2)
    smallest = cfg.replace(dict_size_range=(cfg.dict_size_range[0],) * 2,
                           key_digits=(lo, lo) if short_keys else cfg.key_digits,
                           value_digits=(cfg.value_digits[0],) * 2, subkeys_range=(cfg.subkeys_range[0],) * 2)
    min_tokens = _budget_tokens(cfg, tokenizer, *_place(smallest, draw(smallest, random.Random("budget-min")), 1))
    exact = tokenizer.splits_digits and cfg.sampler == "ours"
    rng = random.Random("budget-probe")
    counts = [_budget_tokens(cfg, tokenizer, *_place(cfg, draw(cfg, rng), 1)) for _ in range(probes)]
    mean, std = statistics.fmean(counts), statistics.pstdev(counts) or 1.0
    accept = 0.5 * math.erfc((mean - (limit - 0.5)) / (std * math.sqrt(2)))
    stats = {"min_tokens": min_tokens, "min_tokens_exact": exact, "mean_tokens": round(mean, 1),
             "std_tokens": round(std, 1), "estimated_acceptance": round(accept, 4)}
    if cfg.sampler == "reference":
        stats = {"counts": "prompt", "limit": limit, **stats}
    too_long = exact and min_tokens >= limit
    if not too_long and accept >= 0.01:
        return stats
    per_dict = (mean - 60) / cfg.num_dicts  # ~60 tokens of instructions, question and answer
    fit = max(1, int((limit - 60 - 2 * std) / per_dict))
    what = "prompts" if cfg.sampler == "reference" else "examples"
    why = (f"even the smallest possible example has {min_tokens} tokens" if too_long
           else f"{what} have {mean:.0f} ± {std:.0f} tokens, so only ~{accept:.2%} would fit")
    budget = (f"the prompt budget max_tokens - {REFERENCE_MARGIN} = {limit}" if cfg.sampler == "reference"
              else f"max_tokens={cfg.max_tokens}")
    raise BudgetError(
        f"config does not fit {budget}: {why}. Lower --num-dicts to about {fit} (now "
        f"{cfg.num_dicts}), or shrink --dict-size-range / --key-digits / --value-digits, or raise --max-tokens.")


# ---------------------------------------------------------------------------------------------- datasets


def gold_positions(cfg: TaskConfig, n: int, rng: random.Random) -> list[int]:
    """1-based gold dictionary positions for n samples: uniform over 1..num_dicts, except that
    floor(first_fraction * n) random samples get position 1 and floor(early_fraction * n) others get a
    uniform position among the first `early_positions` (reference default: floor(first_fraction * n))."""
    positions = [rng.randint(1, cfg.num_dicts) for _ in range(n)]
    first = rng.sample(range(n), int(n * cfg.first_fraction))
    early = rng.sample(sorted(set(range(n)) - set(first)), int(n * cfg.early_fraction))
    top = cfg.early_positions if cfg.early_positions is not None else max(1, int(n * cfg.first_fraction))
    for i in first:
        positions[i] = 1
    for i in early:
        positions[i] = rng.randint(1, min(top, cfg.num_dicts))
    return positions


def generate_split(cfg: TaskConfig, seed: int, split: str, n: int, *, progress: bool = True,
                   tokenizer: Tokenizer | None = None) -> Iterator[dict]:
    """Yield n JSONL records {"messages": [...], "meta": {...}} for one split, deterministically; token counts
    (the budget, meta `num_tokens`) with `tokenizer` (default Mistral's). Sampler 'reference' adds meta
    `sampler` and `prompt_tokens` (what its budget counts); its ids read `<task>-reference...`, and a seed gives
    the same gold positions as ours (the positions are drawn first, from the same stream)."""
    tokenizer = get_tokenizer(tokenizer)
    rng = random.Random(f"needles/{cfg.task}/seed={seed}/{split}")
    positions = gold_positions(cfg, n, rng)
    draw_fn, limit, reference = _draw_fn(cfg), budget_limit(cfg), cfg.sampler == "reference"
    prefix = f"{cfg.task}{'-reference' if reference else ''}{'-template' if cfg.template else ''}-seed{seed}-{split}"
    for i in tqdm.trange(n, desc=f"generating {split}", unit="sample", disable=not progress):
        for _ in range(MAX_TRIES):
            draw = draw_fn(cfg, rng)
            prompt, answer = _place(cfg, draw, positions[i])
            counted = _budget_tokens(cfg, tokenizer, prompt, answer)
            if counted < limit:
                break
        else:
            what = f"the prompt budget {limit}" if reference else f"max_tokens={cfg.max_tokens}"
            raise BudgetError(f"{split} sample {i}: no draw fitted {what} in {MAX_TRIES} tries; "
                              "lower --num-dicts or raise --max-tokens")
        tokens = _num_tokens(tokenizer, prompt, answer) if reference else counted
        meta = {
            "id": f"{prefix}-{i:05d}", "task": cfg.task, "split": split, "index": i, "seed": seed,
            "template": cfg.template, "gold_key": list(draw.gold_key) if isinstance(draw.gold_key, tuple) else draw.gold_key,
            "gold_value": draw.gold_value, "gold_dict": positions[i], "gold_position": positions[i],
            "gold_key_index": draw.gold_key_index, "num_dicts": cfg.num_dicts, "num_tokens": tokens,
            **draw.extra_meta,
        }
        if reference:
            meta.update(sampler="reference", prompt_tokens=counted)
        yield {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
               "meta": meta}


def follow_up_text(cfg: TaskConfig, key: int) -> str:
    """A follow-up question of a multi-question chat: the paper's question without its first sentence
    (shorter chats, same answer format), with the answer template when `cfg.template`."""
    text = f"Report the value of key {key} and the dictionary it is in."
    if cfg.template:
        text += (f" Answer in the following template:\nThe value of key {key} is <fill-in-value> and it is in "
                 "Dictionary [<fill-in-dictionary-name>].")
    return text


def multi_question_split(cfg: TaskConfig, seed: int, split: str, n: int, questions: int) -> Iterator[dict]:
    """Yield n multi-question chat records of the simple task, deterministically: a paper-format prompt and
    its answer, then `questions - 1` follow-up turns (`follow_up_text`) asking about other keys of the same
    dictionaries, each a different key, every answer in the paper's format.

    Why: a model trained from scratch only forms the key -> value lookup circuit when it gets many
    supervised lookups per sequence (docs/demo.md). The gold dictionary's position is uniform over
    1..num_dicts; `max_tokens` is not enforced (the caller's shards bound the length).
    Records: {"messages": [...], "meta": {"id", "num_questions"}}.
    """
    if cfg.task != "simple" or cfg.sampler != "ours":
        raise ValueError(f"multi-question chats use the simple task and sampler 'ours' (got task={cfg.task!r}, "
                         f"sampler={cfg.sampler!r}): a follow-up about a repeated key would be ambiguous")
    if questions < 1:
        raise ValueError(f"questions must be >= 1 (got {questions})")
    rng = random.Random(f"needles/demo-multi/seed={seed}/{split}")
    for i in range(n):
        draw = _draw_simple(cfg, rng)
        position = rng.randint(1, cfg.num_dicts)
        prompt, answer = _place(cfg, draw, position)
        others = [(k, v, d) for d, entries in enumerate(_placed_dicts(draw, position), 1) for k, v in entries
                  if k != draw.gold_key]
        rng.shuffle(others)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        for key, value, d in others[:questions - 1]:
            messages += [{"role": "user", "content": follow_up_text(cfg, key)},
                         {"role": "assistant", "content": f"The value of key {key} is {value} and it is in "
                                                          f"Dictionary [{d}]."}]
        yield {"messages": messages,
               "meta": {"id": f"demo-multi-seed{seed}-{split}-{i:05d}", "num_questions": len(messages) // 2}}


def generate(cfg: TaskConfig, seed: int, out_dir: str | pathlib.Path, *, preset: str | None = None,
             progress: bool = True, tokenizer: Tokenizer | None = None) -> dict:
    """Write out_dir/train.jsonl, out_dir/eval.jsonl and out_dir/generation.json; returns the latter.

    Tokens are counted with `tokenizer` (default Mistral's), whose identity generation.json records with the
    config, seed, counts and token statistics; `python -m data_gen shards` stores it in the shard manifest.
    """
    tokenizer = get_tokenizer(tokenizer)
    budget = check_budget(cfg, tokenizer=tokenizer)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {split: write_split(out, split, generate_split(cfg, seed, split, n, progress=progress, tokenizer=tokenizer))
             for split, n in (("train", cfg.num_train), ("eval", cfg.num_eval))}
    return write_generation(out, {"generator": "data_gen", "preset": preset, "seed": seed, "config": cfg.to_dict(),
                                  "tokenizer": tokenizer.identity().to_json(), "budget_check": budget, "splits": files})
