"""Hugging Face Kimi-Linear checkpoint -> MLX model folder (quantized, sharded, streamed, resumable).

    from kimi_mlx.convert import ConvertOptions, convert_checkpoint, compare_models
    summary = convert_checkpoint("moonshotai/Kimi-Linear-48B-A3B-Instruct", "kimi-4bit",
                                 ConvertOptions(bits=4, recipe="mixed"))
    rows = compare_models("path/to/bf16", ["kimi-4bit"])   # top-1 agreement and KL per recipe

Modules: source (read and check the checkpoint), recipe (options, per-module quantization),
plan (groups, output tensors, shards), writer (shards, resume record), pipeline (the run),
report (quality against the source). `kimi-mlx convert` calls `run_convert`.
"""

from .command import run_convert
from .pipeline import Summary, convert_checkpoint
from .recipe import ConvertOptions


def __getattr__(name: str):
    # The report is imported on first use, so `python -m kimi_mlx.convert.report` runs it as a fresh module.
    if name in ("ReportRow", "compare_models"):
        from . import report

        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["ConvertOptions", "ReportRow", "Summary", "compare_models", "convert_checkpoint", "run_convert"]
