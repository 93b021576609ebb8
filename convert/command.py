"""What `kimi-mlx convert` does, as a plain function (cli.py only parses options and maps errors)."""

from __future__ import annotations

import sys

from .pipeline import convert_checkpoint
from .recipe import ConvertOptions


def run_convert(src: str, dst: str, *, options: ConvertOptions, force: bool = False, report: bool = False,
                out=None) -> None:
    out = out or sys.stdout  # looked up at call time (test runners swap sys.stdout)
    summary = convert_checkpoint(src, dst, options, force=force)
    print(f"converted {src} -> {summary}", file=out)
    for warning in summary.warnings:  # said at the start too; again here, after the progress bar
        print(warning, file=sys.stderr)
    if report:
        from .report import compare_models

        for row in compare_models(summary.source_folder, [summary.dst]):
            print(f"report: {row}", file=out)
