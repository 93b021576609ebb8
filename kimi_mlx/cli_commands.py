"""What the CLI commands do, as plain functions (cli.py only parses options and maps errors)."""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import KimiError


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    if (prompt is None) == (prompt_file is None):
        raise KimiError("give exactly one of --prompt or --prompt-file")
    if prompt_file is None:
        return prompt
    try:
        return Path(prompt_file).read_text()
    except OSError as e:
        raise KimiError(f"{prompt_file}: cannot read the prompt ({e.strerror})") from None


def run_generate(model_path, prompt, prompt_file, *, raw, system, max_tokens, sampling, verbose, out=sys.stdout):
    from . import load, stream_generate

    text = read_prompt(prompt, prompt_file)
    model, tokenizer = load(model_path)
    if not raw:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        text = messages
    last = None
    for last in stream_generate(model, tokenizer, text, max_tokens, **sampling):
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
