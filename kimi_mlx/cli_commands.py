"""What the CLI commands do, as plain functions (cli.py only parses options and maps errors)."""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import KimiError


def check_text_option(value: str | None, flag: str) -> str | None:
    """`value` if it is valid text; an argument of bytes that are not UTF-8 (Python keeps them as
    lone surrogates) is refused in one line: the user can fix it, and it could not be saved."""
    try:
        value is None or value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise KimiError(f"{flag} is not valid UTF-8 text (character {e.start}); re-encode it"
                        + (" or use --prompt-file" if flag == "--prompt" else "")) from None
    return value


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """The prompt text. A file that is not UTF-8 is refused (one line naming it and the first bad
    byte), not decoded with replacements: the user can fix the file, and a silently altered prompt
    (then cached by cache-prompt) is worse than an error. An argument that is not valid UTF-8
    (Python keeps such bytes as lone surrogates) is refused the same way."""
    if (prompt is None) == (prompt_file is None):
        raise KimiError("give exactly one of --prompt or --prompt-file")
    if prompt_file is None:
        return check_text_option(prompt, "--prompt")
    from .files import read_prompt_file

    return read_prompt_file(prompt_file)


def run_generate(model_path, prompt, prompt_file, *, raw, system, max_tokens, sampling, verbose, out=None,
                 prompt_cache=None, kv_bits=None, ignore_memory_plan=False):
    from . import load, stream_generate
    from .generate import PROGRESS_MIN_TOKENS, check_sampling
    from .loading import resolve_model_path

    out = out or sys.stdout
    check_sampling(max_tokens, **sampling)  # before the model is loaded
    check_text_option(system, "--system")
    if raw and system:  # the system message is a turn of the chat form, which --raw leaves out
        raise KimiError("--system needs the chat form; drop --raw or --system")
    text = read_prompt(prompt, prompt_file)
    folder = resolve_model_path(model_path)
    model, tokenizer = load(str(folder))
    cached = None
    if prompt_cache is not None:
        from .prompt_cache import load_prompt_cache

        if system:
            raise KimiError("--system and --prompt-cache: the prompt cache has its own system message")
        cached = load_prompt_cache(prompt_cache, model, str(folder))
        if cached.raw != raw:
            raise KimiError(f"{prompt_cache}: cached {'with' if cached.raw else 'without'} --raw; "
                            f"generate {'with' if cached.raw else 'without'} it to continue")
        ids = cached.continuation(tokenizer, text)
    elif raw:  # --raw: the text as is; control-token text becomes control ids (the explicit way)
        ids = tokenizer.encode(text, allow_special=True)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    last = None
    for last in stream_generate(model, tokenizer, ids, max_tokens, prompt_cache=cached, kv_bits=kv_bits,
                                progress=len(ids) >= PROGRESS_MIN_TOKENS, ignore_memory_plan=ignore_memory_plan,
                                **sampling):
        out.write(last.text)
        out.flush()
    out.write("\n")
    if verbose and last is not None:
        print(
            f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s | "
            f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s | "
            f"peak memory {last.peak_memory_gb:.3f} GB | finish: {last.finish_reason}",
            file=sys.stderr,
        )


def run_cache_prompt(model_path, prompt, prompt_file, out_path, *, system=None, raw=False, kv_bits=None,
                     prefill_step=None, progress=True, err=None, ignore_memory_plan=False):
    """`kimi-mlx cache-prompt`: prefill the prompt once and save the caches to out_path."""
    import time

    import mlx.core as mx

    from . import load
    from .generate import DEFAULT_PREFILL_STEP, check_sampling
    from .loading import resolve_model_path
    from .prompt_cache import check_output_file, make_prompt_cache

    err = err or sys.stderr
    step = DEFAULT_PREFILL_STEP if prefill_step is None else prefill_step
    check_sampling(prefill_step=step)  # before the model is loaded
    check_text_option(system, "--system")
    check_output_file(out_path)  # a folder or an unwritable place is refused before the prefill
    text = read_prompt(prompt, prompt_file)
    folder = resolve_model_path(model_path)
    model, tokenizer = load(str(folder))
    t0 = time.perf_counter()
    cache = make_prompt_cache(model, tokenizer, text, system=system, raw=raw, kv_bits=kv_bits,
                              prefill_step=step, model_name=str(folder),
                              progress=progress, ignore_memory_plan=ignore_memory_plan)
    seconds = time.perf_counter() - t0
    cache.save(out_path, model)
    size = Path(out_path).stat().st_size
    err.write(f"{out_path}: {cache.num_tokens} tokens cached in {seconds:.1f} s "
              f"({cache.num_tokens / max(seconds, 1e-9):.0f} tokens/s), {size / 2**20:.1f} MiB, "
              f"peak memory {mx.get_peak_memory() / 2**30:.2f} GB\n")
