"""How the routed experts of a MoE layer run: two paths, same signature, same result.

    fn(mlp: SwitchGLU, x [N, D], ids [N, k] int, weights [N, k] fp32) -> [N, D]
        = sum_j weights[:, j] * expert_{ids[:, j]}(x)          (N = tokens, k = experts per token)

`experts_gather` (the reference, and what runs on Metal and for decode): mlx-lm's SwitchGLU,
MLX's gather matmuls; it sorts rows by expert when there are many.
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
EXPERT_PATHS = ("gather", "grouped")
_switch = PathSwitch("expert path", ENV_VAR, EXPERT_PATHS)

# Auto takes the grouped path when the default device is the CPU, for float experts, from this
# many (token, expert) rows per expert on average. Measured with bench/bench_moe.py (hidden 1024,
# 64 experts of 256, top-8, OpenBLAS): grouped/gather speed 0.9x at 12 rows, 1.14x at 16, 2x at
# 64, 2.5x at 512; below, per-expert op overhead wins. Quantized experts gain nothing (0.9-1.0x:
# the CPU's quantized matmul is the bound either way), so they keep the gather path.
CPU_GROUPED_MIN_ROWS_PER_EXPERT = 16
# GPUs keep gather for now. On the H200 one gather_qmm over a 512-token prefill step's 4096 sorted
# (token, expert) rows took ~4.3 ms (bench/gpu/NOTES.md, run 1), ~1 us per row, and ~1 GiB of
# scratch: the grouped path (KIMI_MLX_EXPERT_PATH=grouped, a quantized_matmul per expert) may beat
# it there, but that is not measured yet (bench_gpu.py --prefill-experts times it).


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
            return "gather"  # the CPU's quantized matmul is the bound either way
        return "grouped" if rows >= CPU_GROUPED_MIN_ROWS_PER_EXPERT * experts else "gather"
    return "gather"  # a GPU: Metal's gather_mm segments sorted rows itself; CUDA see above


def experts_gather(mlp: SwitchGLU, x: mx.array, ids: mx.array, weights: mx.array) -> mx.array:
    """Reference: SwitchGLU's gather matmuls, then the weighted sum over the k experts."""
    y = mlp(_match_weight_dtype(mlp, x), ids)  # [N, k, D]
    return (y * weights[..., None]).sum(axis=-2).astype(x.dtype)


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
    xs = _match_weight_dtype(mlp, x)[token]  # [N * k, D]
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
    return (experts_grouped if name == "grouped" else experts_gather)(mlp, x, ids, weights)


def _match_weight_dtype(mlp: SwitchGLU, x: mx.array) -> mx.array:
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
