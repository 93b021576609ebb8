"""Load a checkpoint as one rank of several: only this rank's share of the weights is read.

The model is built and its weights attached lazily (mx.load maps tensors without reading
them), split (tensor or pipeline), and only then evaluated, one layer at a time: a rank holds its
share plus at most one layer's whole tensors while it loads (each is sliced as it is read), and
in pipeline mode it never reads the other ranks' layers at all.
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
    from .pipeline import check_pipeline_split, pipeline
    from .tensor import check_tensor_split, shard_tensor
    from .world import check_same_checkpoint, join_world

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
        (shard_tensor if mode == "tensor" else pipeline)(model, group)
        for layer in model.layers:  # one layer's tensors read (and sliced) at a time
            mx.eval(layer.parameters())

    model = load_model(folder, dtype, prepare=prepare)
    model.eval()
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # every rank loaded: start together
    return model
