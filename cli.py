"""kimi-mlx command line: one function per command, each calls the library.

User errors (KimiError) become one line on stderr and a non-zero exit code here, in one place.
"""

from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager
from typing import Optional

import typer

KV_BITS_HELP = "Latent (MLA) cache precision: 16 (default), 8 or 4 bits"
IGNORE_PLAN_HELP = "Run even when the memory plan says the context does not fit (the plan is an estimate)"

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Run Kimi-Linear-48B-A3B with MLX.")


def _standard_streams() -> None:
    """Give a standard stream the shell closed (`<&-`, `>&-`, `2>&-`) /dev/null, so a closed stream
    never changes what a command does.

    Three ways a closed stream shows up: the descriptor is free (the next file opened takes it:
    MLX then read the weights' descriptor 0 as a failed open), Python's sys.stdout/err are None
    (writes fail with AttributeError), or a launcher left a file of its own at the number, open
    the wrong way: pyenv's shim script sits read-only at descriptor 2 after `2>&-`, so sys.stderr
    wraps it and the first progress bar failed with EBADF (cache-prompt exited 1, no file). A
    descriptor Python did not wrap at start belongs to a file opened since: left alone, and the
    stream writes to /dev/null on a descriptor of its own."""
    for fd, name, mode in ((0, "stdin", os.O_RDONLY), (1, "stdout", os.O_WRONLY), (2, "stderr", os.O_WRONLY)):
        stream = getattr(sys, name)
        if stream is not None:
            if _wraps(stream, fd) and not _opened_for(fd, mode):
                _devnull_at(fd, mode)  # inherited (Python wrapped it at start): no one else reads it
            continue
        try:
            os.fstat(fd)
        except OSError:
            pass
        else:
            setattr(sys, name, open(os.devnull, "r" if fd == 0 else "w"))  # the number is another file's now
            continue
        _devnull_at(fd, mode)
        setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))


def _wraps(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (OSError, ValueError, AttributeError):  # a test's capture object, a closed stream
        return False


def _opened_for(fd: int, mode: int) -> bool:
    """Whether descriptor `fd` is open and can be used for `mode` (os.O_RDONLY or os.O_WRONLY)."""
    import fcntl

    try:
        access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError:
        return False
    return access in (mode, os.O_RDWR)


def _devnull_at(fd: int, mode: int) -> None:
    new = os.open(os.devnull, mode)
    if new != fd:
        os.dup2(new, fd)
        os.close(new)


def _run(fn, *args, **kwargs):
    """Run a command's library call: SIGTERM and SIGHUP stop it as Ctrl-C does (see _stop_signals)."""
    with _stop_signals():
        return _run_plain(fn, *args, **kwargs)


def _run_plain(fn, *args, **kwargs):
    """The one place library exceptions become one line and an exit code. Signals keep their
    handlers: serve's (uvicorn drains its connections on SIGTERM) calls this directly."""
    from kimi_mlx.errors import KimiError, Terminated

    _standard_streams()
    try:
        return fn(*args, **kwargs)
    except KimiError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt as e:
        try:  # SIGHUP: the terminal may be gone
            typer.echo(f"terminated ({e})" if isinstance(e, Terminated) else "interrupted", err=True)
        except OSError:
            pass
        raise typer.Exit(e.exit_code if isinstance(e, Terminated) else 130) from None
    except RuntimeError as e:  # under mlx.launch: a rank that died is one line here, not a traceback
        from kimi_mlx.parallel import peer_error

        if (lost := peer_error(e)) is None:
            raise
        typer.echo(f"error: {lost}", err=True)
        raise typer.Exit(lost.exit_code) from None
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        raise typer.Exit(141) from None
    except OSError as e:  # the machine's, not the input's: stdout on a full disk (> /dev/full), an I/O error
        where = f"{e.filename}: " if e.filename else "cannot write the output: " if e.errno in _WRITE_ERRNOS else ""
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush would fail again
        try:
            typer.echo(f"error: {where}{e.strerror or e}", err=True)
        except OSError:
            pass  # stderr itself is what failed (closed, or a file some other open took): the exit code says it
        raise typer.Exit(1) from None


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


STOP_SIGNALS = ("SIGTERM", "SIGHUP")


@contextmanager
def _stop_signals():
    """SIGTERM (kill, a service manager) and SIGHUP (the terminal closed) raise errors.Terminated,
    a KeyboardInterrupt, so they stop a command as Ctrl-C does: convert keeps its complete shards
    and says to run again, a file being written is removed, one line and exit 128 + signal instead
    of a silent death. A second signal ends the process at once (default action restored).

    Not under mlx.launch: a rank blocked in a collective never returns to Python to run a handler,
    and the rank watchdogs end a hung rank with SIGTERM (kimi_mlx/parallel/world.py). Only the main
    thread can set handlers (a library caller on another thread keeps its own)."""
    import signal
    import threading

    from kimi_mlx.parallel.world import launched

    if threading.current_thread() is not threading.main_thread() or launched():
        yield
        return
    # A signal the parent set to be ignored stays ignored: `nohup kimi-mlx convert ...` must outlive its terminal.
    numbers = [n for n in (getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name))
               if signal.getsignal(n) is not signal.SIG_IGN]

    def stop(signum, frame):
        from kimi_mlx.errors import Terminated

        for n in numbers:
            signal.signal(n, signal.SIG_DFL)
        raise Terminated(signum)

    previous = {n: signal.signal(n, stop) for n in numbers}
    try:
        yield
    finally:
        for n, handler in previous.items():
            signal.signal(n, handler)


@app.command()
def info(model: str = typer.Option("demo", "--model", "-m", help="Model folder, hub repo id, or 'demo'")):
    """Describe a checkpoint: layer pattern, sizes, quantization, parameter count."""
    from kimi_mlx.summary import describe_model

    _run(typer.echo, _run(describe_model, model))


@app.command()
def generate(
    model: str = typer.Option("demo", "--model", "-m", help="Model folder, hub repo id, or 'demo'"),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text (sent as a user turn)"),
    prompt_file: Optional[str] = typer.Option(None, "--prompt-file", help="Read the prompt from a file"),
    raw: bool = typer.Option(False, "--raw", help="Use the prompt as is, without the chat template"),
    system: Optional[str] = typer.Option(None, "--system", help="System message"),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temp", help="0 = greedy"),
    top_p: float = typer.Option(0.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    min_p: float = typer.Option(0.0, "--min-p"),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print speed and memory after the text"),
    prompt_cache: Optional[str] = typer.Option(
        None, "--prompt-cache", help="Continue a file from cache-prompt: the prompt follows its text"),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help=KV_BITS_HELP),
    ignore_memory_plan: bool = typer.Option(False, "--ignore-memory-plan", help=IGNORE_PLAN_HELP),
):
    """Generate a reply to one prompt, streamed to stdout."""
    from kimi_mlx.cli_commands import run_generate

    _run(
        run_generate, model, prompt, prompt_file, raw=raw, system=system, max_tokens=max_tokens,
        sampling=dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                      repetition_penalty=repetition_penalty, seed=seed),
        verbose=verbose, prompt_cache=prompt_cache, kv_bits=kv_bits, ignore_memory_plan=ignore_memory_plan,
    )


@app.command()
def chat(
    model: str = typer.Option("demo", "--model", "-m", help="Model folder, hub repo id, or 'demo'"),
    system: Optional[str] = typer.Option(None, "--system", help="System message"),
    max_tokens: int = typer.Option(2048, "--max-tokens", "-n", help="Longest reply, in tokens"),
    temperature: float = typer.Option(0.0, "--temp", help="0 = greedy"),
    top_p: float = typer.Option(0.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    min_p: float = typer.Option(0.0, "--min-p"),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    prompt_cache: Optional[str] = typer.Option(
        None, "--prompt-cache", help="Start from a file from cache-prompt: your first message follows its text"),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help=KV_BITS_HELP),
    ignore_memory_plan: bool = typer.Option(False, "--ignore-memory-plan", help=IGNORE_PLAN_HELP),
):
    """Chat in the terminal (/undo /retry /reset /system /save /load /quit); Ctrl-C stops a reply."""
    from kimi_mlx.chat import run_chat

    code = _run(
        run_chat, model, system=system, max_tokens=max_tokens,
        sampling=dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                      repetition_penalty=repetition_penalty, seed=seed),
        prompt_cache=prompt_cache, kv_bits=kv_bits, ignore_memory_plan=ignore_memory_plan,
    )
    raise typer.Exit(code)


@app.command("cache-prompt")
def cache_prompt(
    out: str = typer.Argument(..., help="The prompt cache file to write (safetensors)"),
    model: str = typer.Option("demo", "--model", "-m", help="Model folder, hub repo id, or 'demo'"),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text to cache"),
    prompt_file: Optional[str] = typer.Option(None, "--prompt-file", help="Read the text to cache from a file"),
    system: Optional[str] = typer.Option(None, "--system", help="System message before the cached text"),
    raw: bool = typer.Option(False, "--raw", help="Cache the text as is, without the chat template"),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help=KV_BITS_HELP),
    prefill_step: Optional[int] = typer.Option(None, "--prefill-step", help="Tokens per prefill step (default 512)"),
    ignore_memory_plan: bool = typer.Option(False, "--ignore-memory-plan", help=IGNORE_PLAN_HELP),
):
    """Prefill a long prompt once and save the model state; generate/chat --prompt-cache continue it."""
    from kimi_mlx.cli_commands import run_cache_prompt

    _run(run_cache_prompt, model, prompt, prompt_file, out, system=system, raw=raw, kv_bits=kv_bits,
         prefill_step=prefill_step, ignore_memory_plan=ignore_memory_plan)


@app.command()
def convert(
    src: str = typer.Argument(..., help="Hugging Face checkpoint: a local folder or a hub repo id (org/name)"),
    dst: str = typer.Argument(..., help="Output folder (built as DST.partial, renamed when complete)"),
    bits: Optional[int] = typer.Option(None, "--bits", help="Bits per weight (default 4; mxfp8: 8)"),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Quantization group (default 64; mxfp4/mxfp8: 32)"),
    q_mode: str = typer.Option("affine", "--q-mode", help="affine, mxfp4, mxfp8 or nvfp4"),
    recipe: str = typer.Option("uniform", "--recipe",
                               help="uniform: all layers at --bits; mixed: routed experts at --bits, the rest 8-bit"),
    quantize: bool = typer.Option(True, "--quantize/--no-quantize", help="--no-quantize keeps bf16 (or --dtype)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float16, bfloat16 or float32 for unquantized tensors"),
    max_shard_gb: float = typer.Option(5.0, "--max-shard-gb", help="Largest output shard, in GB"),
    force: bool = typer.Option(False, "--force", help="Overwrite DST if it exists"),
    report: bool = typer.Option(False, "--report", help="Then compare with the source: top-1 agreement and KL"),
):
    """Convert a Kimi-Linear checkpoint to MLX: quantized, sharded; resumes an interrupted run."""
    from kimi_mlx.convert import ConvertOptions, run_convert

    options = ConvertOptions(quantize=quantize, bits=bits, group_size=group_size, mode=q_mode, recipe=recipe,
                             dtype=dtype, max_shard_gb=max_shard_gb)
    _run(run_convert, src, dst, options=options, force=force, report=report)


@app.command()
def doctor():
    """Device, versions, memory, and the self-check and speed of each KDA kernel (paste it in bug reports)."""
    from kimi_mlx.doctor import report

    _run(typer.echo, _run(report))


@app.command()
def plan(
    model: str = typer.Option("demo", "--model", "-m", help="Model folder (config.json is enough), hub repo id, or 'demo'"),
    context: int = typer.Option(..., "--context", "-c", help="Tokens to hold: prompt + reply"),
    memory_gb: Optional[float] = typer.Option(None, "--memory-gb", help="Memory to plan for, in GiB (default: this machine's)"),
    kv_bits: int = typer.Option(16, "--kv-bits", help="Latent cache precision: 16, 8 or 4"),
    prefill_step: Optional[int] = typer.Option(None, "--prefill-step", help="Tokens per prefill step (default 512)"),
    batch: int = typer.Option(1, "--batch", help="Sequences at once"),
    backend: Optional[str] = typer.Option(None, "--backend",
                                          help="cpu or gpu: the backend to plan for (default: this machine's)"),
    ranks: int = typer.Option(1, "--ranks", help="Plan one rank of the model split over this many (mlx.launch)"),
    parallel: str = typer.Option("tensor", "--parallel", help="With --ranks: tensor (heads, experts) or pipeline (layers)"),
):
    """Memory plan: weights, KDA states, latent cache and prefill activations against the memory; exit 1 if it does not fit."""
    from kimi_mlx.plan import gib_to_bytes, plan_for_path

    memory = None if memory_gb is None else _run(gib_to_bytes, memory_gb)
    result = _run(plan_for_path, model, context, kv_bits=kv_bits, prefill_step=prefill_step, batch=batch,
                  memory_bytes=memory, backend=backend, ranks=ranks, parallel=parallel)
    _run(typer.echo, result.format())
    if not result.fits:
        raise typer.Exit(1)


@app.command()
def serve(
    model: str = typer.Option("demo", "--model", "-m", help="Model folder, hub repo id, or 'demo'"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8080, "--port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY'"),
    max_batch: int = typer.Option(16, "--max-batch", help="Requests decoding (or prefilling) at once"),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests waiting beyond the batch; more get HTTP 429"),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Default max_tokens of a request"),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help=KV_BITS_HELP),
    state_cache_mb: int = typer.Option(2048, "--state-cache-mb", help="Memory for multi-turn state snapshots (0: off)"),
    spill_dir: Optional[str] = typer.Option(None, "--spill-dir", help="Write evicted snapshots here (prompt-cache files)"),
    spill_mb: int = typer.Option(8192, "--spill-mb", help="Disk budget of --spill-dir"),
):
    """Serve the model over an OpenAI-compatible HTTP API (chat, completions, models, health, metrics)."""
    from kimi_mlx.server.serve import serve as run_server

    _run_plain(run_server, model, host, port, api_key, max_batch=max_batch, max_queue=max_queue,
               max_tokens=max_tokens, kv_bits=kv_bits, state_cache_mb=state_cache_mb, spill_dir=spill_dir,
               spill_mb=spill_mb)


def main(argv: Optional[list[str]] = None) -> None:
    app(args=argv)


if __name__ == "__main__":
    main(sys.argv[1:])
