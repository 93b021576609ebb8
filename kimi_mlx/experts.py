"""How the routed experts of a MoE layer run: two paths, same signature, same result.

    fn(mlp: SwitchGLU, x [N, D], ids [N, k] int, weights [N, k] fp32) -> [N, D]
        = sum_j weights[:, j] * expert_{ids[:, j]}(x)          (N = tokens, k = experts per token)

`experts_gather` (the reference): mlx-lm's SwitchGLU, MLX's gather matmuls; it sorts rows by
expert when there are many (SORT_MIN_ROWS).
`experts_direct` (what runs by default wherever gather matmuls do: decode, GPU prefill): the same
gather matmuls called directly. For few rows (decode) it passes the lhs indices as a constant
array: mx.gather_qmm without them builds an Arange per call, 3 kernels per MoE layer and token
(78 of a decode step's ~1380 at the real size; bench/count_graph.py); for many rows it is the
reference as is.
`experts_grouped` (prefill on the CPU): sort the N*k rows by expert, read each expert's row count
on the host, and run one plain matmul per expert over its contiguous slice. Why: MLX's CPU
gather_mm handles rows one by one (~30 GFLOP/s at the bench shape), while a [n, D] x [D, I]
matmul per expert reaches the BLAS rate (~120-180 GFLOP/s with OpenBLAS); Metal's gather_mm
already runs sorted rows as segmented matmuls, so there the reference path is the fast one;
MLX's CUDA gather_qmm is slow at prefill (see the note above get_expert_path's rules).
The host read of the counts ends the lazy graph at the router: fine for prefill, not for
mx.compile or training (train.py forces "gather").

Which path runs: explicit `path` argument > set_expert_path() > $KIMI_MLX_EXPERT_PATH > auto.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU

from .switch import PathSwitch

ENV_VAR = "KIMI_MLX_EXPERT_PATH"
EXPERT_PATHS = ("gather", "grouped", "direct")
_switch = PathSwitch("expert path", ENV_VAR, EXPERT_PATHS)

# Auto takes the grouped path when the default device is the CPU, for float experts, from this
# many (token, expert) rows per expert on average. Measured with bench/bench_moe.py (hidden 1024,
# 64 experts of 256, top-8, OpenBLAS): grouped/gather speed 0.9x at 12 rows, 1.14x at 16, 2x at
# 64, 2.5x at 512; below, per-expert op overhead wins. Quantized experts gain nothing (0.9-1.0x:
# the CPU's quantized matmul is the bound either way), so they keep the gather path.
CPU_GROUPED_MIN_ROWS_PER_EXPERT = 16
# On CUDA, prefill of quantized experts takes the grouped path from this many rows per expert on
# average (None: never, the gather matmuls as on Metal). Why it may win there: MLX's CUDA
# GatherQMM runs every (token, expert) row as its own matrix-vector product (gather_qmv), while
# the grouped path's per-expert quantized_matmul is a GEMM; Metal's gather_qmm already segments
# sorted rows into GEMMs, so Metal keeps the gather path. Set from bench_gpu.py's prefill variants.
CUDA_GROUPED_MIN_ROWS_PER_EXPERT: int | None = 16
# Measured on the H200 (bench_gpu.py, 4k-token prompt, full-size 4-bit model, bench/gpu/NOTES.md
# run 3): prefill 1048 tok/s on gather (512-token steps), 1486 grouped (16 rows per expert),
# 2596 grouped at 2048-token steps (64 rows per expert; generate.prefill_step_for). Decode
# (8 rows per expert at most for one token) keeps the direct path.


def set_expert_path(name: str | None) -> None:
    """Force every MoE layer to one path; None goes back to env var / auto."""
    _switch.force(name, "set_expert_path")


def get_expert_path(mlp: SwitchGLU | None = None, rows: int | None = None) -> str:
    """The path `mlp` runs `rows` = tokens * k (token, expert) pairs on.

    Without arguments: the forced path (set_expert_path, then the env var), or "auto".
    """
    if (forced := _switch.forced()) is not None:
        return forced
    if mlp is None or rows is None:
        return "auto"
    experts = mlp.gate_proj.num_experts
    if mx.default_device() == mx.cpu:
        if isinstance(mlp.gate_proj, QuantizedSwitchLinear):
            return "direct"  # the CPU's quantized matmul is the bound either way
        return "grouped" if rows >= CPU_GROUPED_MIN_ROWS_PER_EXPERT * experts else "direct"
    cuda_rows = CUDA_GROUPED_MIN_ROWS_PER_EXPERT
    if cuda_rows is not None and not mx.metal.is_available() and rows >= cuda_rows * experts:
        return "grouped"  # CUDA prefill: see CUDA_GROUPED_MIN_ROWS_PER_EXPERT
    return "direct"  # a GPU: Metal's gather_mm segments sorted rows itself; CUDA see above


def experts_gather(mlp: SwitchGLU, x: mx.array, ids: mx.array, weights: mx.array) -> mx.array:
    """Reference: SwitchGLU's gather matmuls, then the weighted sum over the k experts."""
    y = mlp(match_weight_dtype(mlp, x), ids)  # [N, k, D]
    return (y * weights[..., None]).sum(axis=-2).astype(x.dtype)


# mlx-lm's SwitchGLU sorts the (token, expert) rows by expert from this many on; so does experts_direct.
SORT_MIN_ROWS = 64
def experts_direct(mlp: SwitchGLU, x: mx.array, ids: mx.array, weights: mx.array) -> mx.array:
    """The reference's math with its gather matmuls called directly (see the module docstring):
    x [N, D] -> [N, k, 1, D] expert outputs -> weighted sum [N, D]."""
    N, D = x.shape
    if ids.size >= SORT_MIN_ROWS or _global_scale(mlp) is not None or any(
            "bias" in p for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
        return experts_gather(mlp, x, ids, weights)
    lhs = slot_rows(N, 1)  # [N, 1]: row n of x for every expert slot of token n
    rhs = mx.stop_gradient(ids)  # [N, k]
    xe = match_weight_dtype(mlp, x)[:, None, None, :]  # [N, 1, 1, D]

    def linear(layer, h):  # h [N, 1|k, 1, in] -> [N, k, 1, out]
        if isinstance(layer, QuantizedSwitchLinear):
            return mx.gather_qmm(h, layer["weight"], layer["scales"], layer.get("biases"), lhs_indices=lhs,
                                 rhs_indices=rhs, transpose=True, group_size=layer.group_size, bits=layer.bits,
                                 mode=layer.mode)
        return mx.gather_mm(h, layer["weight"].swapaxes(-1, -2), lhs_indices=lhs, rhs_indices=rhs)

    h = mlp.activation(linear(mlp.up_proj, xe), linear(mlp.gate_proj, xe))  # [N, k, 1, I]
    # Each slot's weight applied before the (linear) down projection, as the grouped path does:
    # it fuses into the activation's kernel, and the products come out in the activations' dtype,
    # so the weighted sum is one reduction (no multiply and cast kernels after it; in bf16 the
    # weights round to bf16, an error of the order of the bf16 rounding of each expert's output).
    h = h * weights.astype(h.dtype)[..., None, None]
    # down: each slot's own row (lhs = n * k + j over the [N * k] rows of h)
    return _down(mlp.down_proj, h, rhs).sum(axis=-2).astype(x.dtype)  # [N, k, D] -> [N, D]


def _down(layer, h: mx.array, rhs: mx.array) -> mx.array:
    """h [N, k, 1, I] (one row per (token, slot)) -> [N, k, D] through each slot's expert."""
    if isinstance(layer, QuantizedSwitchLinear):
        y = mx.gather_qmm(h, layer["weight"], layer["scales"], layer.get("biases"), lhs_indices=slot_rows(*rhs.shape),
                          rhs_indices=rhs, transpose=True, group_size=layer.group_size, bits=layer.bits,
                          mode=layer.mode)
    else:
        y = mx.gather_mm(h, layer["weight"].swapaxes(-1, -2), lhs_indices=slot_rows(*rhs.shape), rhs_indices=rhs)
    return y.squeeze(-2)


_SLOT_ROWS: dict[tuple[int, int], mx.array] = {}


def slot_rows(n: int, k: int) -> mx.array:
    """[n, k] uint32 n * k + j: the row of an [n, k, 1, I] input that slot (n, j) reads; with k = 1
    the row of each token. A data array made once (inside mx.compile a constant, not a kernel)."""
    if (n, k) not in _SLOT_ROWS:
        _SLOT_ROWS[(n, k)] = mx.array(np.arange(n * k, dtype=np.uint32).reshape(n, k))
    return _SLOT_ROWS[(n, k)]


def experts_grouped(mlp: SwitchGLU, x: mx.array, ids: mx.array, weights: mx.array) -> mx.array:
    """One matmul per expert over its rows, gathered contiguously (see the module docstring)."""
    N, D = x.shape
    k = ids.shape[-1]
    if _global_scale(mlp) is not None:  # nvfp4's extra scale: quantized_matmul has no such argument
        return experts_gather(mlp, x, ids, weights)
    flat = mx.stop_gradient(ids).reshape(-1)  # [N * k]
    order = mx.argsort(flat)  # rows (token, slot) sorted by expert
    counts = np.bincount(np.array(flat), minlength=mlp.gate_proj.num_experts)  # host sync
    token = order // k  # [N * k] the token each sorted row belongs to
    xs = match_weight_dtype(mlp, x)[token]  # [N * k, D]
    ws = weights.reshape(-1)[order][:, None].astype(xs.dtype)  # [N * k, 1]
    outs, start = [], 0
    for e in np.flatnonzero(counts):
        rows = slice(start, start + int(counts[e]))
        xe = xs[rows]  # [n_e, D]
        h = mlp.activation(_expert_linear(mlp.up_proj, e, xe), _expert_linear(mlp.gate_proj, e, xe))
        # Weight before the down projection (linear): I columns to scale instead of D.
        outs.append(_expert_linear(mlp.down_proj, e, h * ws[rows]))  # [n_e, D]
        start = rows.stop
    y = mx.concatenate(outs)  # [N * k, D] sorted by expert, already weighted
    # Back to token order, then sum each token's k rows.
    y = y[mx.argsort(order)].reshape(N, k, D)
    return y.sum(axis=-2).astype(x.dtype)


def run_experts(mlp: SwitchGLU, x: mx.array, ids: mx.array, weights: mx.array, path: str | None = None) -> mx.array:
    """x [N, D], ids/weights [N, k] -> [N, D] on the chosen path."""
    name = _switch.check(path, "path argument") if path is not None else get_expert_path(mlp, ids.size)
    fn = {"grouped": experts_grouped, "direct": experts_direct}.get(name, experts_gather)
    return fn(mlp, x, ids, weights)


def match_weight_dtype(mlp: SwitchGLU, x: mx.array) -> mx.array:
    """Cast x to unquantized expert weights' dtype (MLX's CPU gather_mm wants them equal)."""
    w = mlp.gate_proj.weight
    return x.astype(w.dtype) if mx.issubdtype(w.dtype, mx.floating) else x


def _global_scale(mlp: SwitchGLU):
    return getattr(mlp.gate_proj, "global_scale", None) if isinstance(mlp.gate_proj, QuantizedSwitchLinear) else None


def _expert_linear(layer, e: int, x: mx.array) -> mx.array:
    """x [n, in] -> x W_e^T [n, out] for expert e of a (quantized) SwitchLinear (Kimi's have no bias)."""
    if isinstance(layer, QuantizedSwitchLinear):
        biases = layer["biases"][e] if "biases" in layer else None
        return mx.quantized_matmul(
            x, layer["weight"][e], layer["scales"][e], biases,
            transpose=True, group_size=layer.group_size, bits=layer.bits, mode=layer.mode,
        )
    return x @ layer["weight"][e].T
