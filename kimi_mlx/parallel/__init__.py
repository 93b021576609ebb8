"""Several machines as one: Kimi-Linear split across the ranks of mx.distributed (mlx.launch).

    group = join_world()                        # world.py: mx.distributed.init with a deadline
    model = load_sharded(path, group, "tensor")  # load.py: reads only this rank's share
    shard_tensor(model, group)                   # tensor.py (+ expert.py): heads, widths, experts
    shard_pipeline(model, group)                 # pipeline.py: layers, for slow links

Run: `mlx.launch --hosts ip1,ip2 -- kimi-mlx generate ...` (KIMI_MLX_PARALLEL=tensor|pipeline).
This package imports nothing heavy until a function is called.
"""

from __future__ import annotations

from .load import PARALLEL_ENV, PARALLEL_MODES, load_sharded, parallel_mode
from .world import RankError, broadcast_token, join_world, launched, peer_error

__all__ = ["PARALLEL_ENV", "PARALLEL_MODES", "RankError", "broadcast_token", "join_world", "launched",
           "load_sharded", "parallel_mode", "peer_error", "shard_pipeline", "shard_tensor"]


def __getattr__(name: str):
    if name == "shard_tensor":
        from .tensor import shard_tensor

        return shard_tensor
    if name == "shard_pipeline":
        from .pipeline import shard_pipeline

        return shard_pipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
