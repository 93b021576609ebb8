"""kimi-mlx command line: one function per command, each calls the library.

User errors (KimiError) become one line on stderr and a non-zero exit code here, in one place.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Run Kimi-Linear-48B-A3B with MLX.")


def _run(fn, *args, **kwargs):
    from kimi_mlx.errors import KimiError

    try:
        return fn(*args, **kwargs)
    except KimiError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


@app.command()
def info(model: str = typer.Option("demo", "--model", "-m", help="Model folder, hub repo id, or 'demo'")):
    """Describe a checkpoint: layer pattern, sizes, quantization, parameter count."""
    from kimi_mlx.summary import describe_model

    typer.echo(_run(describe_model, model))


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
):
    """Generate a reply to one prompt, streamed to stdout."""
    from kimi_mlx.cli_commands import run_generate

    _run(
        run_generate, model, prompt, prompt_file, raw=raw, system=system, max_tokens=max_tokens,
        sampling=dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                      repetition_penalty=repetition_penalty, seed=seed),
        verbose=verbose,
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
):
    """Chat in the terminal (/undo /retry /reset /system /save /load /quit); Ctrl-C stops a reply."""
    from kimi_mlx.chat import run_chat

    code = _run(
        run_chat, model, system=system, max_tokens=max_tokens,
        sampling=dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                      repetition_penalty=repetition_penalty, seed=seed),
    )
    raise typer.Exit(code)


def main(argv: Optional[list[str]] = None) -> None:
    app(args=argv)


if __name__ == "__main__":
    main(sys.argv[1:])
