"""The `needles` model backend of lm-evaluation-harness: any harness task (RULER's needle-in-a-haystack,
LongBench, ...) on the model a training run just produced, decoded by our JAX `Generator` where it was
trained (one device, or sharded over a TPU slice with `shard=True`; int8 bases and unmerged LoRA included).

    python -m eval.lmeval --model needles --model_args pretrained=RUN_DIR --tasks hellaswag
    python -m eval.lmeval --model needles --model_args pretrained=PEFT_DIR,base=HF_DIR,base_dtype=int8 ...

`python -m eval.lmeval` is the harness's own command line (`lm_eval ...`, every flag as documented there);
it only imports this module first, because lm-evaluation-harness 0.4.13 finds backends in its registry and
has no plugin discovery: a backend exists once the module that registers it is imported. From Python,
`import eval.lmeval_backend` and call `lm_eval.simple_evaluate(model="needles", ...)`.

model_args (as `python -m eval`'s options): `pretrained` (a Hugging Face folder, a training run or a PEFT
folder), `base`, `base_dtype` (int8 / bfloat16 / float32), `dtype`, `compute_dtype`, `merge_adapters`,
`batch_size`, `max_length` (default: the config's max_position_embeddings, as the `hf` backend),
`max_gen_toks` (default 256, as `hf`), `shard` with `data`/`fsdp`/`tensor`/`rules` (the mesh), `seed`
(sampling).

The requests are served as the harness's `hf` backend serves them, so that a task scores the same through
either (tests/test_eval_lmeval_backend.py): log-likelihoods through the harness's own `_encode_pair`
(`TemplateLM`), a request longer than the model cut to its last `max_length + 1` tokens; rolling
log-likelihoods over the harness's disjoint windows of `max_length` tokens behind a BOS prefix;
generation greedy (or sampled with `do_sample`, `temperature`, `top_p`) from the prompt's last
`max_length - max_gen_toks` tokens, until a stop string of `until`, EOS or `max_gen_toks`, the text cut
before the first stop string.

Text is encoded with the model's own tokenizer (`eval.model_io.load_model`: the folder's, a PEFT base's or
the one a run trained with), as the `hf` backend encodes it with the same tokenizer, special-token strings
included (`Tokenizer.encode_marked`); `--apply_chat_template` renders the model's own chat template.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict

import lm_eval.models  # noqa: F401  the built-in backends: the registry imports them only while it is empty
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm.auto import tqdm

from eval.datafiles import DataError
from eval.model_io import load_model
from jaxtrain.generate import Generator, harness_ids, harness_prefix_id
from jaxtrain.sharding import MeshConfig, make_mesh, maybe_initialize_distributed

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
SAMPLING_KWARGS = ("do_sample", "temperature", "top_p")


def _int_or_default(value, default: int, name: str) -> int:
    """The harness passes `--batch_size` through as given ("auto", "auto:4", "8" or 8)."""
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        log.warning("needles: %s=%r is not a number; using %d", name, value, default)
        return default


@register_model("needles")
class NeedlesLM(TemplateLM):
    """lm-evaluation-harness requests served by `jaxtrain.generate.Generator`."""

    def __init__(self, pretrained: str, base: str | None = None, base_dtype: str | None = None,
                 dtype: str | None = None, compute_dtype: str | None = None, merge_adapters: bool = False,
                 batch_size: int | str | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 shard: bool = False, data: int = 1, fsdp: int = -1, tensor: int = 1, rules: str = "fsdp",
                 seed: int = 0, **unused):
        super().__init__()
        for name in ("device", "max_batch_size"):   # the harness passes them to every backend
            unused.pop(name, None)
        if unused:
            raise ValueError(f"needles: unknown model_args {sorted(unused)}")
        maybe_initialize_distributed()
        mesh = None
        if shard:
            mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor, rules=rules))
        try:
            loaded = load_model(str(pretrained), dtype=dtype, mesh=mesh, rules=rules, base=base,
                                base_dtype=base_dtype, merge_adapters=merge_adapters, compute_dtype=compute_dtype)
        except DataError as e:
            raise ValueError(f"needles: {e}") from None
        self.tokenizer = loaded.tokenizer
        self.loaded = loaded
        self.pretrained = str(pretrained)
        self._max_length = int(max_length or loaded.config.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.generator = Generator(loaded.config, loaded.params, tokenizer=self.tokenizer, batch_size=_int_or_default(
            batch_size, DEFAULT_BATCH_SIZE, "batch_size"), mesh=mesh, rules=rules, max_length=self._max_length,
            adapters=loaded.adapters)

    # --- what the harness asks of a TemplateLM ---------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        """The tokenizer's EOS, as the `hf` backend's (else the first stop id)."""
        return self.tokenizer.stop_ids[0] if self.tokenizer.eos_id is None else self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """The tokenizer's BOS, else EOS, as the `hf` backend chooses, whether or not the tokenizer adds it to
        a text (SmolLM2's `<|im_start|>` it does not): the context of an empty-context request and of the first
        rolling window."""
        return harness_prefix_id(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.identity().name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As the `hf` backend's `tok_encode`: special-token strings (as a chat template writes them) become their
        ids; what the tokenizer adds by default (BOS) is added unless `add_special_tokens` is False or (None)
        the text already starts with the prefix token."""
        if add_special_tokens is None:
            return harness_ids(self.tokenizer, string)
        return self.tokenizer.encode_marked(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scores = self.generator.loglikelihood([(ctx, cont) for _, ctx, cont in requests], progress=not disable_tqdm)
        for (request, _, _), answer in zip(requests, scores, strict=True):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over the `hf` backend's windows: disjoint spans of at most `max_length`
        tokens, each predicted from the `max_length` tokens before it (the first from BOS)."""
        windows, owners = [], []
        for i, (string,) in enumerate(tqdm([r.args for r in requests], disable=disable_tqdm)):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm), strict=True):
            totals[i] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests grouped by their generation kwargs (one decoding setting per `Generator.generate` call)."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        out: list[str | None] = [None] * len(requests)
        eos = self.tokenizer.token_string(self.eot_token_id)  # as `hf`: "</s>", "<|im_end|>"
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = kwargs.pop("max_gen_toks")
            sample = kwargs.pop("do_sample", False)
            temperature, top_p = float(kwargs.pop("temperature", 0.0)), float(kwargs.pop("top_p", 1.0))
            if kwargs:
                log.warning("needles: generation kwargs %s are not supported and ignored", sorted(kwargs))
            keep = self.max_length - max_gen
            if keep < 1:
                raise ValueError(f"needles: max_gen_toks {max_gen} leaves no room for a prompt in max_length "
                                 f"{self.max_length}")
            contexts = [requests[i].args[0] for i in indices]
            prompts = [self.tok_encode(c)[-keep:] for c in contexts]
            generations = self.generator.generate(prompts, max_new_tokens=max_gen, stop_strings=until,
                                                  temperature=temperature if sample else 0.0, top_p=top_p,
                                                  seed=self.seed, progress=not disable_tqdm)
            for i, context, generation in zip(indices, contexts, generations, strict=True):
                text = postprocess_generated_text(generation.text, until, None)
                out[i] = text
                self.cache_hook.add_partial("generate_until", (context, requests[i].args[1]), text)
        return out  # type: ignore[return-value]

    # --- chat templates (`--apply_chat_template`) --------------------------------------------------------
    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The model's chat template rendered as text (which `tok_encode` reads back into its ids), with the
        harness's flags: the final message continued when there is no generation prompt."""
        return self.tokenizer.render_chat(chat_history, add_generation_prompt=add_generation_prompt,
                                          continue_final_message=not add_generation_prompt)

    def get_model_info(self) -> dict:
        return {"model_kind": self.loaded.info.get("kind"), "model_base": self.loaded.info.get("base"),
                "model_adapters": self.loaded.info.get("adapters"), "tokenizer": self.tokenizer.identity().to_json()}
