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
def info(model: str = typer.Option(..., "--model", "-m", help="Model folder or hub repo id")):
    """Describe a checkpoint: layer pattern, sizes, quantization, parameter count."""
    from kimi_mlx.summary import describe_model

    typer.echo(_run(describe_model, model))


def main(argv: Optional[list[str]] = None) -> None:
    app(args=argv)


if __name__ == "__main__":
    main(sys.argv[1:])
