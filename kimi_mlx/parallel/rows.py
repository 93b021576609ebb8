"""Read one rank's block of rows of a stored tensor, and nothing else, from its safetensors file.

Tensor parallelism keeps, of most weights, a block of rows along the first axis: the heads of the
q/k/v projections, the expert block of the stacked experts (their scales and biases too). In a
row-major safetensors file such a block is one contiguous byte range, so it is read directly
(numpy memmap of that range) instead of reading the whole tensor and slicing it: a rank reads
about 1/N of the checkpoint's expert bytes. Used when the checkpoint is in the MLX layout (the
stored name is the parameter's name, as `kimi-mlx convert` writes it); other tensors keep the
lazy load-then-slice path.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from ..loading import check_safetensors, safetensors_files

# safetensors dtype -> (bytes per element, the mx dtype of those bytes)
_STORED = {"F32": (4, mx.float32), "F16": (2, mx.float16), "BF16": (2, mx.bfloat16), "U32": (4, mx.uint32),
           "I32": (4, mx.int32), "U8": (1, mx.uint8), "I8": (1, mx.int8)}


def stored_tensors(folder: Path) -> dict[str, tuple[Path, int, dict]]:
    """name -> (file, offset of the data section, header entry) for every tensor in the folder."""
    out = {}
    for path in safetensors_files(folder):
        header = check_safetensors(path)
        with open(path, "rb") as f:
            base = 8 + int.from_bytes(f.read(8), "little")
        out.update({name: (path, base, meta) for name, meta in header.items() if name != "__metadata__"})
    return out


def read_rows(source: tuple[Path, int, dict], start: int, stop: int) -> mx.array | None:
    """Rows [start, stop) of the first axis of a stored tensor, as stored; None for a dtype this
    reader does not handle (the caller then slices the lazily loaded tensor)."""
    path, base, meta = source
    if meta["dtype"] not in _STORED:
        return None
    size, dtype = _STORED[meta["dtype"]]
    shape = meta["shape"]
    row = size * int(np.prod(shape[1:], dtype=np.int64))
    first = base + meta["data_offsets"][0] + start * row
    block = np.memmap(path, dtype=np.uint8, mode="r", offset=first, shape=((stop - start) * row,))
    out = mx.array(np.array(block)).view(dtype).reshape(stop - start, *shape[1:])
    del block
    return out
