"""Batched generation and log-likelihood scoring with a KV cache, in JAX: the decoder that eval, the AOT
decode step and the demo all call.

Shapes are fixed per (batch size, prompt bucket, max new tokens) so each combination compiles once:
prompts are left-padded to a length bucket (`bucket_length`; padding gets segment id 0 and never enters
the cache), the prompt is prefilled in one pass (`prefill`), then single-token steps run inside
`lax.while_loop` in chunks (`decode_chunk`). Between chunks the host checks stop strings, so rows stop on
the tokenizer's stop ids (`</s>`, `<|im_end|>`, `<|eot_id|>`: on device) or on any stop string (on the
host) without decoding text on every step. The cache is
a ring buffer of the sliding window (`jaxtrain.kv_cache`), so prompts longer than the window decode
exactly like `transformers`. The weights may be int8 (`jaxtrain.quant`) and LoRA adapters may ride along
unmerged (`adapters`), so a 7B base and its finetune both decode on one 16 GiB chip.

The forward pass of decoding (`forward_rows`) runs the model's own `DecoderLayer` layer by layer with
each layer's view of the cache (`jaxtrain.kv_cache.LayerCache`): a scan over the stacked weights, or on
XLA:CPU a Python loop over per-layer weights and buffers. Only the final layer's requested rows are
computed there (`last`: the row a prefill samples from, or a continuation's span).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from data_gen.tokenizer import Tokenizer, get_tokenizer
from jaxtrain import attention, kv_cache, model
from jaxtrain.config import ModelConfig
from jaxtrain.sharding import rules_for

MIN_BUCKET = 32
FINE_BUCKETS_FROM = 1024    # above this, four buckets per doubling instead of one
CHUNK_STEPS = 16


@dataclasses.dataclass
class Generation:
    text: str
    token_ids: list[int]


@dataclasses.dataclass
class Timings:
    """Wall seconds of one `generate` call by phase, each phase timed until its result reached the host
    (where the generator waits anyway), so decoding is measured directly, not as total minus prefill.
    The first call of a shape includes its compilation."""
    prefill_s: float = 0.0
    prompt_tokens: int = 0      # real (unpadded) prompt tokens prefilled
    decode_s: float = 0.0
    decode_steps: int = 0       # single-token steps, each for a whole batch of `batch_size` rows


def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
    """The smallest bucket >= n (at least `minimum`), so that each shape compiles once: powers of two up
    to `FINE_BUCKETS_FROM` tokens, then quarter steps of each doubling (1024, 1280, 1536, 1792, 2048,
    2560, ...). Above 1024 tokens a prompt pays at most 20% padding instead of up to 50% (a 2100-token
    prompt prefills 2560 rows, not 4096; a 24K one 24576, not 32768), for at most four compilations per
    doubling; every such bucket is a multiple of 256, which TPU kernels tile."""
    n = max(n, minimum)
    if n <= FINE_BUCKETS_FROM:
        return 1 << (n - 1).bit_length()
    step = 1 << ((n - 1).bit_length() - 3)   # a quarter of the power of two below n
    return -(-n // step) * step


def prompt_bucket(longest: int, limit: int) -> int:
    """The prompt length a batch is padded to: its bucket (`bucket_length`), capped at `limit` (the positions
    left for the prompt) rounded down to the TPU's 128-token tile, so that a long prompt near the model's
    context still prefills through the splash kernel rather than XLA's [T, T] scores (a 24K prompt of a
    32K-context model: 135 GiB of scores per chip without the kernel). Never shorter than the prompt."""
    tile = attention.SPLASH_MIN_BLOCK
    return min(bucket_length(longest), max(longest, limit - limit % tile))


def left_pad(rows: Sequence[Sequence[int]], length: int, batch: int):
    """ids, positions, segment ids [batch, length]; rows beyond len(rows) are empty padding rows."""
    ids = np.zeros((batch, length), np.int32)
    segments = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    for i, row in enumerate(rows):
        pad = length - len(row)
        ids[i, pad:] = row
        segments[i, pad:] = 1
        positions[i] = np.arange(length) - pad
    return ids, positions, segments


def _sample(logits, rng, temperature, top_p, greedy: bool):
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each candidate
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)  # the top candidate always stays
    choice = jax.random.categorical(rng, sorted_logits, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _layer_variables(tree, adapters, key):
    """The Flax variables of one layer (`key` "layers_i"), or of the stack ("layers") for a scan."""
    out = {"params": tree[key]}
    if adapters is not None:
        out["lora"] = adapters.params[key]
    return out


def forward_rows(config: ModelConfig, params, ids, positions, segments, *, cache=None, empty_cache=False,
                 last: int | None = None, adapters=None):
    """Final-norm hidden states of the last `last` rows [B, last, D] (all rows if None) and the updated
    cache (None without one).

    `cache` (`kv_cache.init_cache`) receives every row's keys and values; `empty_cache`: it holds nothing
    yet (a prefill), so there is nothing in it to attend to. `params` stacked (a scan over layers) or
    from `kv_cache.unstack_layers` (a Python loop over per-layer weights and buffers); the per-layer
    loop computes only the `last` rows in its final layer (half of a 2-layer model's 4K prefill). On TPU
    the scan does not: a `cond` doing that inside it raised a prefill's temporaries by 0.8-3 GiB to save
    1/32 of its FLOPs.
    """
    lora = None if adapters is None else adapters.config
    net, layer = model.Transformer(config, lora=lora), model.DecoderLayer(config, lora)
    top = model.variables({k: v for k, v in params.items() if not k.startswith("layers")})
    if cache is None and not kv_cache.is_per_layer(params):
        hidden = net.apply(model.variables(params, adapters), ids, positions, segments,
                           method=model.Transformer.hidden_states)
        return (hidden if last is None else hidden[:, -last:]), None
    x = net.apply(top, ids, method=model.Transformer.embed_tokens)
    held = None
    if cache is not None:
        cache = kv_cache.constrain_cache(cache)
        held = None if empty_cache else cache["positions"]
    if kv_cache.is_per_layer(params):
        ks, vs = (list(cache[name]) if cache is not None else [None] * config.num_layers for name in "kv")
        for i in range(config.num_layers):
            view = None if cache is None else kv_cache.LayerCache(ks[i], vs[i], held)
            rows = last if i == config.num_layers - 1 else None
            x, view = layer.apply(_layer_variables(params, adapters, f"layers_{i}"), x, positions, segments, view,
                                  rows)
            if view is not None:
                ks[i], vs[i] = view.k, view.v
        new_kv = {"k": tuple(ks), "v": tuple(vs)}
    elif held is not None and ids.shape[1] == 1:
        # A decode step of the scan: the stack is read as a broadcast, each layer's new key and value
        # leave the loop, and all layers' are written after it.
        def step(x, scanned):
            variables, i = scanned
            view = kv_cache.LayerCache(cache["k"], cache["v"], held, i, write=False)
            x, view = layer.apply(variables, x, positions, segments, view)
            return x, view.new

        x, new = jax.lax.scan(step, x, (_layer_variables(params, adapters, "layers"), jnp.arange(config.num_layers)))
        new_kv = dict(zip("kv", kv_cache.write_stacked(cache["k"], cache["v"], slice(None), new["k"], new["v"],
                                                        positions, segments)))
    else:
        # A prefill: the stack is carried (one buffer, donated, each layer writing its own keys in place;
        # scanned in and out layer by layer it would be a second, stacked copy).
        def prefill_layer(carry, scanned):
            x, k, v = carry
            variables, i = scanned
            x, view = layer.apply(variables, x, positions, segments, kv_cache.LayerCache(k, v, held, i))
            return (x, view.k, view.v), None

        (x, k, v), _ = jax.lax.scan(prefill_layer, (x, cache["k"], cache["v"]),
                                    (_layer_variables(params, adapters, "layers"), jnp.arange(config.num_layers)))
        new_kv = {"k": k, "v": v}
    x = net.apply(top, x if last is None else x[:, -last:], method=model.Transformer.normed)
    if cache is None:
        return x, None
    positions_after = kv_cache.write_positions(cache["positions"], positions, segments)
    return x, kv_cache.constrain_cache({**new_kv, "positions": positions_after})


def _step_logits(config, params, adapters, ids, positions, segments, cache, empty_cache=False):
    """Append tokens to the cache; return logits of each row's last token and the new cache."""
    hidden, cache = forward_rows(config, params, ids, positions, segments, cache=cache, empty_cache=empty_cache,
                                 last=1, adapters=adapters)
    return model.logits_from_hidden(config, params, hidden[:, -1]), cache


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "greedy"))
def prefill(params, adapters, ids, positions, segments, rng, temperature, top_p, stop_ids, *, config, max_new_tokens,
            greedy):
    """Prefill left-padded prompts into an empty cache and sample each row's first token: the decode state.
    A row is done once it samples one of `stop_ids` [n] (the tokenizer's end-of-turn / end-of-sequence ids)."""
    batch, length = ids.shape
    cache = kv_cache.init_cache(config, batch, length + max_new_tokens, per_layer=kv_cache.is_per_layer(params))
    logits, cache = _step_logits(config, params, adapters, ids, positions, segments, cache, empty_cache=True)
    rng, sub = jax.random.split(rng)
    first = _sample(logits, sub, temperature, top_p, greedy)
    tokens = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
    has_prompt = segments.any(axis=1)
    return {"tokens": tokens, "count": jnp.ones((batch,), jnp.int32), "step": jnp.int32(1),
            "next_position": positions[:, -1] + 1, "done": jnp.isin(first, stop_ids) | ~has_prompt,
            "cache": cache, "rng": rng, "stop_ids": stop_ids}


@functools.partial(jax.jit, static_argnames=("config", "greedy"), donate_argnames=("state",))
def decode_chunk(params, adapters, state, temperature, top_p, *, config, greedy):
    """Up to CHUNK_STEPS single-token steps; stops early once every row is done."""
    max_new = state["tokens"].shape[1]
    stop_at = jnp.minimum(state["step"] + CHUNK_STEPS, max_new)

    def cond(s):
        return (s["step"] < stop_at) & ~jnp.all(s["done"])

    def body(s):
        last = jnp.take_along_axis(s["tokens"], (s["count"] - 1)[:, None], axis=1)
        live = (~s["done"]).astype(jnp.int32)[:, None]
        logits, cache = _step_logits(config, params, adapters, last, s["next_position"][:, None], live, s["cache"])
        rng, sub = jax.random.split(s["rng"])
        token = _sample(logits, sub, temperature, top_p, greedy)
        tokens = jnp.where(s["done"][:, None], s["tokens"],
                           s["tokens"].at[jnp.arange(token.shape[0]), s["count"]].set(token))
        advance = (~s["done"]).astype(jnp.int32)
        return {"tokens": tokens, "count": s["count"] + advance, "step": s["step"] + 1,
                "next_position": s["next_position"] + advance, "done": s["done"] | jnp.isin(token, s["stop_ids"]),
                "cache": cache, "rng": rng, "stop_ids": s["stop_ids"]}

    return jax.lax.while_loop(cond, body, state)


@functools.partial(jax.jit, static_argnames=("config", "span"))
def continuation_scores(params, adapters, ids, positions, segments, targets, *, config, span):
    """Log-probabilities and greedy flags of `targets` [B, span], the tokens that follow the last `span`
    positions of the left-padded input rows."""
    hidden, _ = forward_rows(config, params, ids, positions, segments, last=span, adapters=adapters)
    logits = model.logits_from_hidden(config, params, hidden)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return chosen, jnp.argmax(logits, axis=-1) == targets


def _cut_at_stop(text: str, stop_strings: Sequence[str], start: int = 0) -> tuple[str, bool]:
    """`text` up to the first stop string found at or after `start`, and whether one was found."""
    cut = min((i for i in (text.find(s, start) for s in stop_strings if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _answer_start(text: str, skip_leading_whitespace: bool) -> int:
    return len(text) - len(text.lstrip()) if skip_leading_whitespace else 0


class Generator:
    """Greedy / sampled generation and continuation scoring for one model, batch by batch."""

    def __init__(self, config: ModelConfig, params, *, tokenizer: Tokenizer | str | None = None, batch_size: int = 8,
                 mesh=None, rules: str = "fsdp", max_length: int | None = None, adapters=None,
                 per_layer: bool | None = None):
        """`tokenizer` (a `data_gen.tokenizer.Tokenizer` or what `get_tokenizer` takes; default Mistral 7B's)
        decodes text and gives the stop ids. `params` may hold int8 weights (`jaxtrain.quant`); `adapters`
        (`jaxtrain.lora.Adapters`) are applied unmerged. With `mesh` (params sharded on it), decoding runs
        under the mesh and the named logical-axis `rules`, as training does, so the model's sharding
        constraints (the KV cache's included) apply. `per_layer` (default: on XLA:CPU without a mesh) holds a copy of the weights and
        the KV cache one buffer per layer (`jaxtrain.kv_cache`): decode steps 1.4-1.8x faster there."""
        if per_layer is None:
            per_layer = model.on_xla_cpu(config) and mesh is None
        if per_layer:
            params = kv_cache.unstack_layers(params)
            adapters = None if adapters is None else adapters.replace(params=kv_cache.unstack_layers(adapters.params))
        self.config, self.params, self.batch_size, self.mesh, self.rules = config, params, batch_size, mesh, rules
        self.adapters = adapters
        self.tokenizer = get_tokenizer(tokenizer)
        self.stop_ids = np.asarray(self.tokenizer.stop_ids, np.int32)
        self.max_length = max_length or config.max_position_embeddings
        self.timings = Timings()   # of the last `generate` call

    def _sharding(self) -> contextlib.AbstractContextManager:
        if self.mesh is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(rules_for(self.rules)))
        return stack

    def _batches(self, lengths: Sequence[int], desc: str, progress: bool):
        """Indices grouped into batches of similar length (longest first), with a progress bar."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        bar = tqdm(total=len(order), desc=desc, unit="ex", disable=not progress)
        start = time.perf_counter()
        for i in range(0, len(order), self.batch_size):
            chunk = order[i:i + self.batch_size]
            yield chunk
            bar.update(len(chunk))
            bar.set_postfix(ex_per_s=f"{bar.n / (time.perf_counter() - start):.2f}")
        bar.close()

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 stop_strings: Sequence[str] = (), temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, progress: bool = True, skip_leading_whitespace: bool = False) -> list[Generation]:
        """Decode each prompt until EOS, a stop string or `max_new_tokens`; the text is cut before the first
        stop string. `skip_leading_whitespace`: look for stop strings only after the output's leading
        whitespace (an answer that opens with a newline is not cut to nothing, for tasks that strip first)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) + max_new_tokens > self.max_length:
                raise ValueError(f"prompt {i} has {len(p)} tokens; with {max_new_tokens} new tokens it exceeds "
                                 f"the model's {self.max_length} positions")
        greedy = temperature == 0.0
        results: list[Generation | None] = [None] * len(prompts)
        rng = jax.random.key(seed)
        self.timings = Timings()
        with self._sharding():
            self._generate(prompts, max_new_tokens, stop_strings, temperature, top_p, rng, greedy, results,
                           progress, skip_leading_whitespace)
        return results  # type: ignore[return-value]

    def _generate(self, prompts, max_new_tokens, stop_strings, temperature, top_p, rng, greedy, results, progress,
                  skip_leading_whitespace):
        timings = self.timings
        for chunk in self._batches([len(p) for p in prompts], "generate", progress):
            rows = [prompts[i] for i in chunk]
            length = prompt_bucket(max(map(len, rows)), self.max_length - max_new_tokens)
            ids, positions, segments = left_pad(rows, length, self.batch_size)
            rng, sub = jax.random.split(rng)
            kwargs = dict(config=self.config, greedy=greedy)
            start = time.perf_counter()
            state = prefill(self.params, self.adapters, ids, positions, segments, sub, temperature, top_p,
                            self.stop_ids, max_new_tokens=max_new_tokens, **kwargs)
            in_prefill, steps_before = True, 1
            stopped = [False] * len(rows)
            while True:
                done = np.asarray(state["done"])
                if in_prefill:
                    timings.prefill_s += time.perf_counter() - start
                    timings.prompt_tokens += sum(map(len, rows))
                else:
                    step = int(state["step"])
                    timings.decode_s += time.perf_counter() - start
                    timings.decode_steps += step - steps_before
                    steps_before = step
                if stop_strings:
                    tokens, counts = np.asarray(state["tokens"]), np.asarray(state["count"])
                    for r in range(len(rows)):
                        if done[r]:
                            continue
                        text = self.tokenizer.decode(tokens[r, :counts[r]].tolist())
                        if _cut_at_stop(text, stop_strings, _answer_start(text, skip_leading_whitespace))[1]:
                            stopped[r] = True
                    if any(stopped):
                        state["done"] = jnp.asarray(done | np.pad(stopped, (0, len(done) - len(rows))))
                if bool(np.asarray(state["done"]).all()) or int(state["step"]) >= max_new_tokens:
                    break
                start, in_prefill = time.perf_counter(), False
                state = decode_chunk(self.params, self.adapters, state, temperature, top_p, **kwargs)
            tokens, counts = np.asarray(state["tokens"]), np.asarray(state["count"])
            for r, i in enumerate(chunk):
                ids_out = tokens[r, :counts[r]].tolist()
                stop = next((k for k, t in enumerate(ids_out) if t in self.tokenizer.stop_ids), len(ids_out))
                ids_out = ids_out[:stop]
                text = self.tokenizer.decode(ids_out)
                text, _ = _cut_at_stop(text, stop_strings, _answer_start(text, skip_leading_whitespace))
                results[i] = Generation(text=text, token_ids=ids_out)

    def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                      progress: bool = True) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding would produce it) per request.

        A request longer than the model is cut from the left as lm-evaluation-harness's `hf` backend cuts it:
        the last `max_length + 1` tokens are kept and all but the last are the model's input, so a rolling
        window of exactly `max_length + 1` tokens is scored whole. The context must not be empty (the harness
        gives BOS or EOS as the context of a bare continuation).
        """
        rows, spans = [], []
        for i, (context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError(f"request {i} has an empty continuation")
            if not context:
                raise ValueError(f"request {i} has an empty context (give e.g. BOS as the context)")
            full = list(context) + list(continuation)
            rows.append(full[-(self.max_length + 1):])
            spans.append(min(len(continuation), len(rows[-1]) - 1))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        with self._sharding():
            self._loglikelihood(rows, spans, results, progress)
        return results  # type: ignore[return-value]

    def _loglikelihood(self, rows, spans, results, progress):
        for chunk in self._batches([len(r) for r in rows], "loglikelihood", progress):
            inputs = [rows[i][:-1] for i in chunk]     # the last token is only a target
            length = min(bucket_length(max(map(len, inputs))), self.max_length)
            span = min(bucket_length(max(spans[i] for i in chunk), minimum=1), length)
            ids, positions, segments = left_pad(inputs, length, self.batch_size)
            targets = left_pad([rows[i][1:] for i in chunk], length, self.batch_size)[0][:, -span:]
            logprobs, greedy = continuation_scores(self.params, self.adapters, ids, positions, segments, targets,
                                                    config=self.config, span=span)
            logprobs, greedy = np.asarray(logprobs), np.asarray(greedy)
            for r, i in enumerate(chunk):
                n = spans[i]
                results[i] = (float(logprobs[r, -n:].sum()), bool(greedy[r, -n:].all()))


# --- Prompts: text to token ids, the way the reference evaluations do --------------------------------
# Two conventions, with the model's own tokenizer:
# - lm-evaluation-harness (the general benchmarks, plain or with `--chat-template`): a `FewShotPrompt` rendered
#   as the harness renders it, then read into ids as its `hf` backend reads text (`harness_ids`); a (context,
#   continuation) pair is encoded whole and split after the context's tokens, with the context's trailing
#   whitespace moved to the continuation (the harness's `_encode_pair`), so the continuation gets the tokens it
#   has inside the full text;
# - the paper's chat prompts (MDQA, synthetic: `encode_generation_prompt`, `Tokenizer.encode_prompt`): the prompt
#   is one user turn of the model's chat template (Mistral-Instruct for Mistral 7B, as mistral_common encodes it).


@dataclasses.dataclass(frozen=True)
class FewShotPrompt:
    """A benchmark prompt in lm-evaluation-harness 0.4.13's parts (`Task.fewshot_context`): the task description,
    answered examples (question, answer) and the question, so that plain text and chat are built from the same
    pieces as the harness builds them."""

    question: str
    shots: tuple[tuple[str, str], ...] = ()
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"

    def text(self) -> str:
        """Plain text: description, each example as question + target delimiter + answer + few-shot delimiter,
        then the question."""
        shots = "".join(f"{q}{self.target_delimiter}{a}{self.fewshot_delimiter}" for q, a in self.shots)
        return self.description + shots + self.question

    def messages(self) -> list[dict[str, str]]:
        """As `--apply_chat_template --fewshot_as_multiturn` (the harness's default once a chat template is
        applied): the description as the system message (none when empty: the template's default applies),
        each example as a user and an assistant turn, the question as the last user turn; no delimiters."""
        system = [{"role": "system", "content": self.description}] if self.description else []
        turns = [{"role": role, "content": c} for q, a in self.shots for role, c in (("user", q), ("assistant", a))]
        return [*system, *turns, {"role": "user", "content": self.question}]

    def render(self, tokenizer: Tokenizer, *, chat: bool) -> str:
        """The context string the harness hands its model: the plain text, or the conversation rendered by the
        model's chat template with its generation prompt."""
        return tokenizer.render_chat(self.messages(), add_generation_prompt=True) if chat else self.text()

    def continuation(self, choice: str, *, chat: bool) -> str:
        """A choice as the harness scores it: behind the target delimiter in plain text, bare after a chat
        template's generation prompt (the harness drops the delimiter there)."""
        return choice if chat else f"{self.target_delimiter}{choice}"


def harness_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """`text` as the harness's `hf` backend encodes it (`tok_encode`): special-token strings (a rendered chat
    template's `<s>`, `<|im_start|>`) become their ids, and what the tokenizer adds by default (BOS) is added
    unless the text already starts with the prefix token (BOS, else EOS) as a rendered template does."""
    prefix = tokenizer.token_string(harness_prefix_id(tokenizer))
    return tokenizer.encode_marked(text, add_special_tokens=not text.startswith(prefix))


def harness_prefix_id(tokenizer: Tokenizer) -> int:
    """The harness's `prefix_token_id`: the tokenizer's BOS, else its EOS (else the first stop id)."""
    for token in (tokenizer.bos_id, tokenizer.eos_id):
        if token is not None:
            return token
    return tokenizer.stop_ids[0]


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) for log-likelihood scoring, as the harness's `_encode_pair`."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = harness_ids(tokenizer, stripped + continuation)
    context_ids = harness_ids(tokenizer, stripped)
    return context_ids, whole[len(context_ids):]


def encode_generation_prompt(tokenizer: Tokenizer, text: str, *, chat: bool) -> list[int]:
    """A generation prompt of the paper's tasks: one user turn of the chat template (the text stripped: it
    is a user message), or plain text with what the tokenizer adds (BOS)."""
    return tokenizer.encode_prompt(text.strip()) if chat else tokenizer.encode_text(text)
