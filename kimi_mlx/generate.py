"""Token generation: stepped prefill, pipelined decode, sampling, stop conditions, streaming text.

Samplers and logits processors are mlx-lm's (`make_sampler`, `make_logits_processors`): same
semantics as the tool our users compare us with, no second implementation to keep right.
"""

from __future__ import annotations

import math
import numbers
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .errors import KimiError
from .parallel.world import watch_ranks

def prefill_step_for(device: mx.Device) -> int:
    """Tokens per prefill step on `device` (the one place this is decided).

    CUDA (a GPU without Metal): 2048, with the grouped expert path it enables (64 rows per expert;
    experts.CUDA_GROUPED_MIN_ROWS_PER_EXPERT): 2596 tok/s at 4k on the H200 against 1048 at 512
    (bench_gpu.py, bench/gpu/NOTES.md run 3). CPU and Metal: 512, measured on the CPU
    (bench/bench_model.py); 2048 on a Mac is not measured (plan.py assumes 512 there)."""
    if device != mx.cpu and not mx.metal.is_available():
        return 2048
    return 512


DEFAULT_PREFILL_STEP = prefill_step_for(mx.default_device())
CACHE_CLEAR_EVERY = 256  # decode steps between mx.clear_cache() calls (as mlx-lm): returns freed buffers
PROGRESS_MIN_TOKENS = 4 * DEFAULT_PREFILL_STEP  # the CLI shows a prefill bar on stderr from this many prompt ids


@dataclass
class GenerationResponse:
    text: str  # new text since the previous response (complete UTF-8 characters only)
    token: int | None
    logprob: float | None
    finish_reason: str | None  # None while running, then "stop" | "length"
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float


def prefill(model, tokens: mx.array, cache, step: int = DEFAULT_PREFILL_STEP, progress: bool = False) -> mx.array:
    """Feed tokens [T] in steps of `step`; return logits [vocab] of the last position only.
    progress: a bar on stderr (for long prompts)."""
    T = tokens.shape[0]
    if T == 0:
        raise KimiError("empty prompt: give at least one token")
    prefill_all(model, tokens[:-1], cache, step, progress=progress)
    return model(tokens[None, T - 1 :], cache=cache, last_only=True)[0, -1]


def prefill_all(model, tokens, cache, step: int = DEFAULT_PREFILL_STEP, progress: bool = False) -> None:
    """Feed every token of `tokens` [T] (array or list) to the cache, `step` at a time, without
    logits for more than the last row; memory stays that of one step plus the caches. progress: a bar on stderr."""
    tokens = mx.array(tokens) if not isinstance(tokens, mx.array) else tokens
    T = tokens.shape[0]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=T, unit="tok", desc="prefill", file=sys.stderr, dynamic_ncols=True)
    try:
        for start in range(0, T, step):
            end = min(start + step, T)
            # The layers only (no final norm, no lm_head row): evaluating the caches' states computes
            # exactly what later steps need, nothing else (not even the last layer's MLP).
            model.model(tokens[None, start:end], cache)
            mx.eval([c.state for c in cache])  # bound memory: materialise this step's states
            mx.clear_cache()  # the step's freed buffers go back (as mlx-lm): memory of one step
            if bar is not None:
                bar.update(end - start)
    finally:  # also when stopped (Ctrl-C, SIGTERM): the bar ends its line before the CLI's note
        if bar is not None:
            bar.close()


def check_sampling(max_tokens: int = 1, temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0,
                   min_p: float = 0.0, repetition_penalty: float | None = None, seed: int | None = None,
                   prefill_step: int = DEFAULT_PREFILL_STEP) -> None:
    """Refuse generation options outside their ranges: a KimiError naming the first bad one.

    The conventions are mlx-lm's make_sampler's, kept: temperature 0 = greedy, top_p 0 = off
    (else in (0, 1]; 1 keeps every token), top_k 0 = off, min_p 0 = off (else up to 1),
    repetition_penalty None = off (else > 0; 1 changes nothing). NaN and inf are refused.
    """
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    rules = [
        ("max_tokens (--max-tokens)", max_tokens, whole(max_tokens) and max_tokens >= 1, "a whole number >= 1"),
        ("temperature (--temp)", temperature, number(temperature) and temperature >= 0, "a number >= 0 (0 = greedy)"),
        ("top_p (--top-p)", top_p, number(top_p) and 0 <= top_p <= 1, "in (0, 1], or 0 = off"),
        ("top_k (--top-k)", top_k, whole(top_k) and top_k >= 0, "a whole number >= 0 (0 = off)"),
        ("min_p (--min-p)", min_p, number(min_p) and 0 <= min_p <= 1, "in [0, 1] (0 = off)"),
        ("repetition_penalty (--repetition-penalty)", repetition_penalty,
         repetition_penalty is None or (number(repetition_penalty) and repetition_penalty > 0),
         "a number > 0 (1 = no penalty)"),
        ("seed (--seed)", seed, seed is None or (whole(seed) and 0 <= seed < 2**64), "a whole number >= 0"),
        ("prefill_step (--prefill-step)", prefill_step, whole(prefill_step) and prefill_step >= 1,
         "a whole number >= 1"),
    ]
    for name, value, ok, rule in rules:
        if not ok:
            raise KimiError(f"{name} is {value!r}; it must be {rule}")


# Temperatures past these sample the same distribution in float32 as the bound does, and the
# sampler (mlx-lm: categorical(logprobs * (1 / temp))) breaks past them: below 1e-30, 1/temp times
# a logprob overflows to -inf for every token (all -inf: a random id is drawn); above 1e30, 1/temp
# underflows to 0 and the -inf of a top-k/top-p cut times 0 is NaN (token 0 is drawn). At the
# bounds both are fine: 1e30 x |logprob| < 3.4e38 (float32's max) for any logprob above -3e8, and
# 1e-30 is a normal float32. 1e-30 is greedy in effect (gaps of 1e-28 outweigh the Gumbel noise),
# 1e30 uniform over the tokens kept (logprob x 1e-30 rounds to 0 beside it).
TEMPERATURE_BOUNDS = (1e-30, 1e30)


def sampling_repetition_penalty(penalty: float | None) -> float | None:
    """The repetition penalty to hand mlx-lm's processor (which divides positive logits by it and
    multiplies negative ones), kept within TEMPERATURE_BOUNDS for the same float32 reasons: below
    ~1e-45 the penalty rounds to 0 and the division gives inf, then NaN logprobs; within the bounds
    the repeated tokens' order and their lead over the others come out the same."""
    if penalty is None:
        return None
    low, high = TEMPERATURE_BOUNDS
    return min(max(penalty, low), high)


def sampling_temperature(temperature: float) -> float:
    """The temperature to hand the sampler for a checked `temperature` (check_sampling): 0 (greedy)
    below TEMPERATURE_BOUNDS[0], at most TEMPERATURE_BOUNDS[1], else itself. See TEMPERATURE_BOUNDS."""
    low, high = TEMPERATURE_BOUNDS
    return 0.0 if temperature < low else min(temperature, high)


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    """Refuse token ids outside [0, vocab_size) before they reach the embedding (an id past the
    table reads outside it: a crash or garbage, never an error)."""
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise KimiError(f"token id {bad[0]} is outside the vocabulary 0..{vocab_size - 1}"
                        + (f" ({len(bad)} such ids)" if len(bad) > 1 else ""))


def check_cache(model, cache) -> None:
    """Refuse a cache that is not this model's: a list with one cache per layer, of the layer's
    kind (model.make_cache's), all at the same offset. Another model's cache, or anything else,
    would fail deep inside a layer with an AttributeError or a shape error."""
    expected = [type(c).__name__ for c in model.make_cache()]
    kinds = [type(c).__name__ for c in cache] if isinstance(cache, (list, tuple)) else None
    if kinds != expected:
        raise KimiError(f"cache does not match this model: expected {len(expected)} layer caches from "
                        f"model.make_cache(), got {type(cache).__name__}"
                        + (f" of {len(kinds)}" if kinds is not None else ""))
    offsets = {c.offset for c in cache}
    if len(offsets) != 1:
        raise KimiError(f"cache layers disagree on the tokens consumed ({sorted(offsets)}); use a fresh cache")


def check_kv_bits_of(cache, kv_bits: int | None, what: str) -> None:
    """kv_bits asks for a fresh cache's latent precision; a cache that exists keeps its own. Refuse
    a kv_bits that disagrees with it (it was ignored, silently) rather than pretend to honour it."""
    held = next((c.kv_bits or 16 for c in cache if hasattr(c, "kv_bits")), None)
    if kv_bits is not None and held is not None and kv_bits != held:
        raise KimiError(f"kv_bits {kv_bits}: {what} holds {held}-bit latents and continues at {held} bits; "
                        "leave --kv-bits out to continue it (or make it again with that --kv-bits)")


def check_context(model, prompt_tokens: int, max_tokens: int, kv_bits: int | None = None, used: int = 0,
                  ignore_memory_plan: bool = False) -> None:
    """Refuse a request past the model's context, or one whose memory plan does not fit this
    machine (with the plan in the message), before any work is done. The plan counts the loaded
    model's own bytes; the rest is an estimate, so ignore_memory_plan=True skips it."""
    max_context = getattr(model.args, "model_max_length", None)
    total = used + prompt_tokens + max_tokens
    if max_context and total > max_context:
        raise KimiError(
            f"prompt of {prompt_tokens} tokens + {max_tokens} new tokens"
            + (f" after {used} cached" if used else "")
            + f" exceeds the model's context of {max_context}"
        )
    if ignore_memory_plan:
        return
    from .plan import check_model_context_fits  # here: plan is not needed to import generate

    check_model_context_fits(model, total, kv_bits)


def generate_tokens(
    model,
    prompt: mx.array,
    cache=None,
    max_tokens: int = 256,
    sampler: Callable | None = None,
    logits_processors: list | None = None,
    prefill_step: int = DEFAULT_PREFILL_STEP,
    progress: bool = False,
) -> Iterator[tuple[int, float]]:
    """Yield (token, logprob) pairs. The next step is queued (async_eval) before the current token
    is read, so the host sync per step is just reading one token. Logits that turned NaN (or
    inf) give a NaN logprob, read with the token: a KimiError instead of a token sampled from
    garbage (argmax of NaN is id 0). progress: a prefill bar on stderr."""
    sampler = sampler or make_sampler(0.0)
    processors = logits_processors or []
    cache = cache if cache is not None else model.make_cache()
    history = prompt
    group = getattr(model, "group", None)  # set when kimi_mlx.parallel split the model across ranks

    def sample(logits: mx.array):
        nonlocal history
        logits = logits[None]
        for proc in processors:
            logits = proc(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logprobs)  # [1]
        if group is not None:  # every rank continues with rank 0's token
            from .parallel import broadcast_token

            token = broadcast_token(token, group)
        if processors:
            history = mx.concatenate([history, token])
        return token, logprobs[0, token[0]]

    with generation_context(), watch_ranks():  # watch_ranks: split models only (kimi_mlx.parallel)
        token, logprob = sample(prefill(model, prompt, cache, prefill_step, progress))
        mx.async_eval(token, logprob)
        for n in range(max_tokens):
            if n + 1 < max_tokens:
                next_token, next_logprob = sample(model(token[None], cache=cache)[0, -1])
                mx.async_eval(next_token, next_logprob)
            value = logprob.item()
            if math.isnan(value):
                raise KimiError(f"the model's logits became NaN at generated token {n + 1}; the weights or a kernel "
                                "are broken here (kimi-mlx doctor checks the kernels; try KIMI_MLX_KDA_PATH=naive)")
            yield token.item(), value
            if n % CACHE_CLEAR_EVERY == CACHE_CLEAR_EVERY - 1:
                mx.clear_cache()
            if n + 1 < max_tokens:
                token, logprob = next_token, next_logprob


_streams: dict[str, mx.Stream] = {}


@contextmanager
def generation_context():
    """Around a generation, what mlx-lm's generate does, on every backend: the work runs on a
    stream of its own (one per device, made on first use), and on Metal the wired-memory limit is
    raised to the GPU's recommended working set for the duration (so macOS keeps the weights
    resident), then restored once the stream's work is done. Other backends have no wired limit."""
    device = mx.default_device()
    if str(device) not in _streams:
        _streams[str(device)] = mx.new_thread_local_stream(device)
    stream = _streams[str(device)]
    old_limit = None
    if mx.metal.is_available():
        old_limit = mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])
    try:
        with mx.stream(stream):
            yield
    finally:
        if old_limit is not None:
            mx.synchronize(stream)
            mx.set_wired_limit(old_limit)


def _find_stop(text: str, stop: list[str], start: int) -> int | None:
    """Index of the earliest stop string in text[start:], or None."""
    hits = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return min(hits) if hits else None


class ReplyText:
    """A reply's text as its tokens arrive: streamed detokenization (control tokens are not reply
    text), end of sequence, max_tokens and stop strings (cut before the stop string; a tail that
    may still become one is held back). Shared by stream_generate and the server's rows."""

    def __init__(self, tokenizer, max_tokens: int, stop: list[str] | None = None):
        self.detok = tokenizer.detokenizer(skip_special_tokens=True)
        self.eos = set(tokenizer.eos_token_ids)
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) - 1 for s in self.stop), default=0)  # a tail that may still become a stop string
        self.max_tokens = max_tokens
        self.text, self.emitted, self.n = "", 0, 0  # all reply text so far; how much was yielded; tokens

    def add(self, token: int) -> tuple[str, str | None]:
        """Take the next token -> (new text, finish reason None | "stop" | "length")."""
        self.n += 1
        finish = "stop" if token in self.eos else None
        if finish is None:
            self.text += self.detok.add_token(token)
        if finish is not None or self.n >= self.max_tokens:
            finish, self.text = finish or "length", self.text + self.detok.finalize()
        cut = _find_stop(self.text, self.stop, max(0, self.emitted - self.hold))
        if cut is not None:
            finish, self.text = "stop", self.text[:cut]
        end = len(self.text) if finish else max(self.emitted, len(self.text) - self.hold)
        new_text, self.emitted = self.text[self.emitted:end], end
        return new_text, finish


def _prompt_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], Mapping):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    if isinstance(prompt, (list, tuple)) or hasattr(prompt, "tolist"):
        values = prompt.tolist() if hasattr(prompt, "tolist") else prompt
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in values):
            raise KimiError("token ids must be whole numbers (a flat list of ints)")
        return [int(t) for t in values]
    raise KimiError(f"prompt must be text, token ids or a list of chat messages, not {type(prompt).__name__}")


def stream_generate(
    model,
    tokenizer,
    prompt,
    max_tokens: int = 256,
    *,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
    cache=None,
    prefill_step: int = DEFAULT_PREFILL_STEP,
    prompt_cache=None,
    kv_bits: int | None = None,
    progress: bool = False,
    ignore_memory_plan: bool = False,
) -> Iterator[GenerationResponse]:
    """Generate from text, token ids or chat messages; yield a response per token.

    cache: layer caches to continue (they are advanced in place). prompt_cache: a PromptCache
    (kimi_mlx.prompt_cache) to continue from a copy of; a text prompt then continues its open
    user turn. kv_bits: latent cache precision of a fresh cache (16, 8 or 4). progress: a
    prefill bar on stderr. Raises KimiError (at the first next()) for options outside their
    ranges (check_sampling), token ids outside the vocabulary, a prompt past the context, a
    memory plan that does not fit (unless ignore_memory_plan: the plan is an estimate), and
    logits that turn NaN. Text is encoded as text (control-token text stays text); pass ids
    from tokenizer.encode(text, allow_special=True) to send control tokens.
    """
    check_sampling(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, prefill_step)
    if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) for s in stop)):
        raise KimiError(f"stop must be a list of strings, not {stop!r}")
    if prompt_cache is not None:
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], Mapping):
            raise KimiError("a prompt cache continues with text or token ids, not chat messages")
        ids = prompt_cache.continuation(tokenizer, prompt) if isinstance(prompt, str) else _prompt_ids(tokenizer, prompt)
        cache = cache if cache is not None else prompt_cache.fresh_cache()
    else:
        ids = _prompt_ids(tokenizer, prompt)
        cache = cache if cache is not None else model.make_cache(kv_bits)
    check_token_ids(ids, model.args.vocab_size)
    check_cache(model, cache)
    used = cache[0].offset if cache else 0
    bits = next((c.kv_bits for c in cache if hasattr(c, "kv_bits")), kv_bits)
    check_kv_bits_of(cache, kv_bits, "the prompt cache" if prompt_cache is not None else "cache=")
    check_context(model, len(ids), max_tokens, bits, used=used, ignore_memory_plan=ignore_memory_plan)
    if seed is not None:
        mx.random.seed(seed)
    top_k = 0 if top_k >= model.args.vocab_size else top_k  # keeps every token: off (mlx-lm refuses it)
    sampler = make_sampler(temp=sampling_temperature(temperature), top_p=top_p, min_p=min_p, top_k=top_k)
    processors = make_logits_processors(repetition_penalty=sampling_repetition_penalty(repetition_penalty))
    reply = ReplyText(tokenizer, max_tokens, stop)
    mx.reset_peak_memory()

    t0 = time.perf_counter()
    prompt_tps, t_first, n = 0.0, t0, 0
    tokens = generate_tokens(model, mx.array(ids), cache, max_tokens, sampler, processors, prefill_step, progress)
    for n, (token, logprob) in enumerate(tokens, start=1):
        if n == 1:
            t_first = time.perf_counter()
            prompt_tps = len(ids) / (t_first - t0)
        new_text, finish = reply.add(token)
        elapsed = max(time.perf_counter() - t_first, 1e-9)
        yield GenerationResponse(
            text=new_text, token=token, logprob=logprob, finish_reason=finish,
            prompt_tokens=len(ids), prompt_tps=prompt_tps, generation_tokens=n,
            generation_tps=(n - 1) / elapsed if n > 1 else 0.0,
            peak_memory_gb=mx.get_peak_memory() / 2**30,
        )
        if finish is not None:
            return


def generate(model, tokenizer, prompt, max_tokens: int = 256, **kwargs) -> str:
    """The whole reply as one string (see stream_generate for the options)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs))
