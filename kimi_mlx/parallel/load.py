"""Load a checkpoint as one rank of several: only this rank's share of the weights is read.

The model is built and its weights attached lazily (mx.load maps tensors without reading
them), split (tensor or pipeline), and only then evaluated:
  * pipeline: a rank reads its own layers only (the others' tensors are dropped unread);
  * tensor: each weight split along its first axis (heads, expert blocks, their scales) is read
    as this rank's block of rows alone (rows.py; checkpoints in the MLX layout); the rest (the
    row-wise o_proj/down_proj, replicated tensors, renamed ones) is read lazily and sliced, one
    layer at a time, so a rank holds its share plus at most one layer's such tensors.
Measured (CPU, a 373 MiB fp32 checkpoint, 2 ranks): one process peaks at 373 MiB; a tensor rank
holds 190 MiB and peaks at 190 MiB (236 MiB with load-then-slice alone); a pipeline rank 167/167.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import KimiError

PARALLEL_ENV = "KIMI_MLX_PARALLEL"
PARALLEL_MODES = ("tensor", "pipeline")


def parallel_mode(mode: str | None = None) -> str:
    """`mode`, else $KIMI_MLX_PARALLEL, else "tensor"; KimiError for anything else."""
    value = mode if mode is not None else os.environ.get(PARALLEL_ENV, "tensor")
    if value not in PARALLEL_MODES:
        raise KimiError(f"parallel mode {value!r} ({PARALLEL_ENV} or --parallel): choose tensor (fast links: heads "
                        "and experts split) or pipeline (slow links: layers split)")
    return value


def load_sharded(path: str | Path, group=None, mode: str | None = None, dtype=None):
    """This rank's share of the model at `path` (a folder, hub id or 'demo') across `group`
    (default: every rank started by mlx.launch). Raises KimiError (one line, on every rank) for
    a world size that does not split the model, and RankError when the ranks' checkpoints differ."""
    import mlx.core as mx

    from ..config import ModelArgs
    from ..loading import load_model, resolve_model_path
    from .pipeline import check_pipeline_split, shard_pipeline
    from .tensor import check_tensor_split, shard_tensor
    from .world import check_same_checkpoint, join_world, progress

    mode = parallel_mode(mode)
    group = group if group is not None else join_world()
    folder = resolve_model_path(path)
    check_same_checkpoint(group, folder)  # first: the checks below must agree on every rank
    args = ModelArgs.from_file(folder / "config.json")
    N = group.size()
    if mode == "tensor":
        check_tensor_split(args, N)
    else:
        check_pipeline_split(args.num_hidden_layers, N)

    def prepare(model):
        (shard_tensor if mode == "tensor" else shard_pipeline)(model, group)
        if mode == "tensor":
            read_row_blocks(model, folder, group)
        for layer in model.layers:  # the rest: one layer's tensors read (and sliced) at a time
            mx.eval(layer.parameters())
            progress()  # (the watchdog is armed only while generating: ranks load at their own pace)

    READS["row blocks"] = 0
    model = load_model(folder, dtype, prepare=prepare)
    model.eval()
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # every rank loaded: start together
    return model


READS = {"row blocks": 0}  # tensors read as this rank's row block alone, by the last load (tests read it)


def read_row_blocks(model, folder: Path, group) -> None:
    """Replace each parameter that is this rank's block of rows of a stored tensor by a direct
    read of those rows (parallel/rows.py) instead of a read of the whole tensor then a slice."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    from .rows import read_rows, stored_tensors

    N, r = group.size(), group.rank()
    stored = stored_tensors(folder)
    new = []
    for name, p in tree_flatten(model.parameters()):
        meta = stored.get(name, (None, None, {}))[2]
        shape = meta.get("shape")
        if not shape or len(shape) != p.ndim or shape[0] != p.shape[0] * N or list(p.shape[1:]) != shape[1:] or N == 1:
            continue  # not a block of first-axis rows of a stored tensor (whole, column-split, renamed)
        n = p.shape[0]
        rows = read_rows(stored[name], r * n, (r + 1) * n)
        if rows is not None:
            new.append((name, rows.astype(p.dtype) if rows.dtype != p.dtype else rows))
    model.update(tree_unflatten(new))
    READS["row blocks"] = len(new)
    mx.eval([a for _, a in new])
