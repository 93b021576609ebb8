"""Weights of several modules in ONE buffer, so that a decode step runs them as one kernel.

A decode step is launch-bound (bench/gpu/NOTES.md: ~10 us per kernel on the H200 whatever its
size), so matmuls that read the same input, or experts gathered from the same token, are cheaper
as one launch over concatenated weights. The buffers are made once, on first use; the modules'
own parameters then become slices of them (views: no second copy stays resident), so the eager
path, prefill and training still see the modules as loaded. If any of the modules' arrays is
replaced (new weights loaded), the buffer is made again.

    FusedLinears  linears on one input -> one matmul (q/k/v, f_a/g_a/b, MLA q/kv_a, SwiGLU gate/up)
    FusedMoE      a MoE layer's routed experts AND its shared expert as one gather matmul for
                  gate/up and one for down (the shared expert rides as expert E with weight 1)

Layouts (first axis of each buffer): FusedLinears [sum of outs, in]; FusedMoE gate/up
[2(E+1), I, in] = (gate of experts 0..E-1, shared gate, up of experts 0..E-1, shared up) and down
[E+1, D, I] = (down of experts 0..E-1, shared down). The MoE's row indices come from the router
(kimi_mlx.moe_route.route with shared=True): [ids, E, ids + E + 1, 2E + 1] per token.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from .experts import SORT_MIN_ROWS, get_expert_path, match_weight_dtype, slot_rows
from .moe_route import route


class FusedParams:
    """Parameters of several modules concatenated along their first axis, made once; the modules'
    own parameters then become slices of it (views: no extra memory), and it is made again if
    any of them is replaced (new weights loaded). A module whose arrays have one axis fewer than
    the others' (a shared expert's [I, D] beside experts' [E, I, D]) counts as one row."""

    def __init__(self, modules: list, names: list[str]):
        self.linears, self.names = modules, names
        first = [m[names[0]] for m in modules]
        rank = max(a.ndim for a in first)
        self.lifted = [a.ndim < rank for a in first]  # stored as one row: fused[start], not a slice
        self.sizes = [1 if lifted else a.shape[0] for a, lifted in zip(first, self.lifted)]
        self._slots = [(lin, n) for lin in modules for n in names]
        self._views: list[mx.array] = []  # what each slot held when the buffers were made
        self._arrays: list[mx.array] = []

    def arrays(self) -> list[mx.array]:
        """The fused arrays (weight, then scales and biases when quantized), built when needed:
        first use, or a slot whose array is not the view put there (new weights). Runs every
        decode step of every layer, so the check is one identity test per slot."""
        if not self._views or any(lin[n] is not v for (lin, n), v in zip(self._slots, self._views)):
            self._arrays = [mx.concatenate([lin[n][None] if lifted else lin[n]
                                            for lin, lifted in zip(self.linears, self.lifted)]) for n in self.names]
            mx.eval(self._arrays)
            start = 0
            for lin, size, lifted in zip(self.linears, self.sizes, self.lifted):
                for n, fused in zip(self.names, self._arrays):
                    lin[n] = fused[start] if lifted else fused[start:start + size]  # a view of the buffer
                start += size
            self._views = [lin[n] for lin, n in self._slots]
            mx.eval(self._views)
            # The modules' old arrays are freed now (unless held elsewhere): give their memory back
            # instead of leaving it in MLX's buffer cache (a MoE layer's experts: ~1 GB at 4 bits).
            mx.clear_cache()
        return self._arrays


def quantized_names(linear) -> list[str]:
    """The arrays a (Switch)Linear's product reads: weight, and scales (biases) when quantized."""
    if isinstance(linear, (nn.QuantizedLinear, QuantizedSwitchLinear)):
        return ["weight", "scales"] + (["biases"] if "biases" in linear else [])
    return ["weight"]


def _same_format(linears: list) -> bool:
    """All quantized alike (bits, group size, mode, biases) or all float of one dtype; no bias term."""
    a = linears[0]
    if isinstance(a, (nn.QuantizedLinear, QuantizedSwitchLinear)):
        key = lambda b: (isinstance(b, (nn.QuantizedLinear, QuantizedSwitchLinear)),  # noqa: E731
                         b.bits, b.group_size, b.mode, "biases" in b)
    else:
        key = lambda b: (type(b) in (nn.Linear, SwitchLinear), b.weight.dtype)  # noqa: E731
    return all(key(b) == key(a) and "bias" not in b and getattr(b, "global_scale", None) is None for b in linears)


class FusedLinears(FusedParams):
    """Linears that read the same input, run as ONE matmul over their concatenated weights (a
    decode step's GEMVs are launch-bound: 6 -> 2 per KDA layer). Quantized linears must share
    bits, group size and mode; none may have a bias."""

    def __init__(self, linears: list):
        super().__init__(linears, quantized_names(linears[0]))

    @staticmethod
    def supported(linears: list) -> bool:
        return type(linears[0]) in (nn.Linear, nn.QuantizedLinear) and _same_format(linears) and all(
            type(b) is type(linears[0]) for b in linears)

    def matmul(self, x: mx.array, arrays: list[mx.array]) -> mx.array:
        """x [..., in] -> all outputs side by side [..., sum of outs] (`arrays` from .arrays(),
        passed into the trace)."""
        a = self.linears[0]
        if isinstance(a, nn.QuantizedLinear):
            return mx.quantized_matmul(x, *arrays, transpose=True, group_size=a.group_size, bits=a.bits, mode=a.mode)
        return x @ arrays[0].T

    def __call__(self, x: mx.array, arrays: list[mx.array]) -> list[mx.array]:
        """x [..., in] -> one output per linear."""
        cuts = [sum(self.sizes[: i + 1]) for i in range(len(self.sizes) - 1)]
        return mx.split(self.matmul(x, arrays), cuts, axis=-1)

    def run(self, mlp, z: mx.array, arrays: list[mx.array]) -> mx.array:
        """The feed-forward block `mlp` (a SwiGLU, or a MoE whose shared expert this fuses) on z."""
        return mlp(z, self(z, arrays))


class FusedMoE:
    """A SparseMoE (kimi_mlx.moe) whose shared expert joins the routed ones: per token ONE gather
    matmul for the gate and up rows of its k experts and the shared one, one activation (weights
    applied, the shared expert's 1), one gather matmul for down, one sum: 4 kernels where the
    layer's own code takes 9 (2-3 gathers, shared gate/up, its activation, its down, the adds).
    Same math as SparseMoE.__call__, the reference (tests/test_decode.py compares the two), which
    also runs instead from SORT_MIN_ROWS (token, expert) rows on: there gather matmuls want their
    rows sorted by expert (Metal segments them into GEMMs), as SparseMoE's path does; and when an
    expert path is forced ("gather", "grouped": kimi_mlx.experts), FusedMoE being the "direct" one."""

    def __init__(self, mlp):
        s, e = mlp.shared_experts, mlp.switch_mlp
        self.gate_up = FusedParams([e.gate_proj, s.gate_proj, e.up_proj, s.up_proj], quantized_names(e.gate_proj))
        self.down = FusedParams([e.down_proj, s.down_proj], quantized_names(e.down_proj))

    @staticmethod
    def supported(mlp) -> bool:
        """A SparseMoE running its own __call__ (not a parallel one: kimi_mlx.parallel) with one
        shared expert shaped and stored like one routed expert."""
        from .moe import SparseMoE

        if not isinstance(mlp, SparseMoE) or type(mlp).__call__ is not SparseMoE.__call__:
            return False
        s, e = mlp.shared_experts, mlp.switch_mlp
        if s is None or not hasattr(s, "gate_proj"):
            return False
        pairs = [(e.gate_proj, s.gate_proj), (e.up_proj, s.up_proj), (e.down_proj, s.down_proj)]
        return all(_same_format([a, b]) and isinstance(a, (SwitchLinear, QuantizedSwitchLinear))
                   and a.weight.shape[1:] == b.weight.shape for a, b in pairs)

    def arrays(self) -> list[mx.array]:
        return self.gate_up.arrays() + self.down.arrays()

    def run(self, mlp, z: mx.array, arrays: list[mx.array]) -> mx.array:
        """z [B, T, D] -> the MoE's output [B, T, D] (routed experts plus the shared one)."""
        B, T, D = z.shape
        N, k1 = B * T, mlp.top_k + 1
        if N * k1 >= SORT_MIN_ROWS or get_expert_path() in ("gather", "grouped"):
            # Many rows (a large batch): the layer's own path sorts them by expert. A forced expert
            # path keeps its meaning: the layer's own code runs it.
            return mlp(z)
        n = len(self.gate_up.names)
        ids, w = route(mlp.router_logits(z), mlp.e_score_correction_bias, mlp.top_k, mlp.renormalize, mlp.scale,
                       shared=True)  # [B, T, 2 k1] rows of the gate/up buffer, [B, T, k1]
        ids, w = ids.reshape(N, 2 * k1), w.reshape(N, k1)
        xe = match_weight_dtype(mlp.switch_mlp, z).reshape(N, 1, 1, D)
        h = self._gather(self.gate_up.linears[0], xe, arrays[:n], slot_rows(N, 1), ids)  # [N, 2 k1, 1, I]
        # SwiGLU(up, gate) of each slot, times its weight (before the linear down projection).
        h = mlp.switch_mlp.activation(h[:, k1:], h[:, :k1])
        h = h * w.astype(h.dtype)[..., None, None]  # [N, k1, 1, I]
        y = self._gather(self.down.linears[0], h, arrays[n:], slot_rows(N, k1), ids[:, :k1])  # [N, k1, 1, D]
        return y.squeeze(-2).sum(axis=-2).astype(z.dtype).reshape(B, T, D)

    @staticmethod
    def _gather(layer, x: mx.array, arrays: list[mx.array], lhs: mx.array, rhs: mx.array) -> mx.array:
        if isinstance(layer, QuantizedSwitchLinear):
            return mx.gather_qmm(x, *arrays, lhs_indices=lhs, rhs_indices=rhs, transpose=True,
                                 group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
        return mx.gather_mm(x, arrays[0].swapaxes(-1, -2), lhs_indices=lhs, rhs_indices=rhs)
