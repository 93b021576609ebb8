"""Which KDA path runs: explicit `path` argument > set_kda_path() > $KIMI_MLX_KDA_PATH > auto."""

from __future__ import annotations

import mlx.core as mx

from ..switch import PathSwitch, UnknownChoiceError

from .chunked import kda_chunked
from .metal import ENV_VAR as KERNEL_ENV_VAR
from .metal import get_kernel_mode, gpu_backend, kda_metal, layer_ready, metal_ready
from .mx_fast import kda_mx_fast
from .naive import kda_naive

ENV_VAR = "KIMI_MLX_KDA_PATH"

# Every path has the signature fn(q, k, v, g, beta, state=None) -> (o, state).
_PATHS = {
    "naive": kda_naive,
    "chunked": kda_chunked,
    "mx_fast": kda_mx_fast,
    "metal": kda_metal,  # our kernels (metal/*.metal) on either GPU; the ops path on the CPU or if unverified
}
KDA_PATHS = tuple(_PATHS)

# CPU crossover, measured with bench/bench_kda.py (B=1, H=32, D=128): with OpenBLAS (the
# project's Linux bench setup) chunked passes mx.fast at ~16 tokens, is 2.2x faster at 32 and
# ~4.5x from 64; with mlx's built-in BLAS it is 0.5x at 32 and ~0.85x from 64 on. We take
# chunked from 32 on either way: a 15% loss on the slow BLAS against a 2-4.5x gain.
# Below that, mx.fast's per-token loop beats padding to a whole chunk.
CPU_CHUNKED_MIN_T = 32
GPU_CHUNKED_MIN_T = 32  # off Metal; not measured finely: one chunk is 64 tokens, padded
# Longest T for which auto takes our kernels (kda_metal), per GPU backend (None: every T). Metal:
# every T, as since the kernels were written (no Mac measurement says otherwise). CUDA: every T:
# on the H200 (bench/gpu/check_kernels_mlx.py, bench/gpu/NOTES.md run 3; one layer, B=1, bf16)
# kda_decode over T took 0.6 / 2.7 / 4.9 ms at T = 512 / 2048 / 4096 against 5.3 / 11.6 / 35.1 ms
# for chunked ops (and 3.2 / 8.4 / 15.5 ms for chunk kernels we had then, since removed).
KERNEL_MAX_T = {"metal": None, "cuda": None}

_switch = PathSwitch("KDA path", ENV_VAR, KDA_PATHS)


def set_kda_path(name: str | None) -> None:
    """Force every kda_update call to one path; None goes back to env var / auto."""
    _switch.force(name, "set_kda_path")


def _auto_path(seq_len: int, shape: tuple | None = None) -> str:
    """Fastest measured path for the DEFAULT device (not for what is installed) and T."""
    if mx.default_device() == mx.cpu:
        return "chunked" if seq_len >= CPU_CHUNKED_MIN_T else "mx_fast"
    # A GPU. Our kernels once their one-time self-check against kda_naive passed for this shape
    # (metal_ready is False in KIMI_MLX_KERNELS=ops mode, and after one warning when the kernels
    # cannot be used), up to the backend's KERNEL_MAX_T.
    backend = gpu_backend()
    limit = KERNEL_MAX_T.get(backend, 1)
    if shape is not None and (limit is None or seq_len <= limit) and metal_ready(*shape):
        return "metal"
    if backend == "metal":
        return "mx_fast"  # MLX's fused Metal kernel for every T (what the kernels fall back to)
    # CUDA where our kernels cannot run: prefill in chunks, measured on the H200 (bench/bench_gpu.py:
    # 1.2k tok/s, 2.6-3.5x mlx-lm's per-token loop). One token (decode): the naive step, which the
    # compiled decode step (kimi_mlx/decode.py) fuses with the layer: 38.3 vs 34.8 tok/s for
    # mx.fast at 1k context, 36.2 vs 31.5 at 64k (H200, bench/gpu/NOTES.md run 2). Between: mx.fast.
    if seq_len >= GPU_CHUNKED_MIN_T:
        return "chunked"
    return "naive" if seq_len == 1 else "mx_fast"


def get_kda_path(seq_len: int | None = None, shape: tuple | None = None) -> str:
    """The path kda_update uses for `seq_len` tokens when no `path` argument is given.

    With seq_len None: the forced path (set_kda_path, then the env var), or "auto".
    shape = (H, Dk, Dv, q dtype, v dtype) lets auto choose our kernels (on a GPU).
    """
    if (forced := _switch.forced()) is not None:
        if forced == "metal" and get_kernel_mode() == "ops":
            raise UnknownChoiceError("KDA path 'metal' asks for the kernels but kernel mode 'ops' "
                                     f"(${KERNEL_ENV_VAR} or set_kernel_mode) forbids them: change one of the two")
        return forced
    return "auto" if seq_len is None else _auto_path(seq_len, shape)


def kda_update(q, k, v, g, beta, state=None, path: str | None = None):
    """Run the KDA recurrence on the chosen path; see kimi_mlx/kda for shapes.

    Returns (o [B, T, H, Dv] in v.dtype, state [B, H, Dv, Dk] float32).
    """
    _, T, H, Dk = k.shape
    shape = (H, Dk, v.shape[-1], q.dtype, v.dtype)
    name = _switch.check(path, "path argument") if path is not None else get_kda_path(T, shape)
    return _PATHS[name](q, k, v, g, beta, state)


def layer_kernel_ready(H: int, Dk: int, Dv: int, K: int, dtype) -> bool:
    """True when a KDA layer's one-token step runs as ONE kernel (kda_decode_layer): the KDA
    path for one token is our kernels ("metal", forced or chosen by auto) and the Layer kernel
    passed its self-check for these sizes and activation dtype. The checks evaluate arrays once
    per configuration: call this outside mx.compile traces first (decode.decode_layer does)."""
    return get_kda_path(1, (H, Dk, Dv, mx.float32, dtype)) == "metal" and layer_ready(H, Dk, Dv, K, dtype)
