"""The KDA layer's math around the recurrence: the short conv, the prologue that turns raw
projections into the recurrence's inputs, and the output norm and gate.

One definition, used by the layer (kimi_mlx/kda_layer.py), the compiled decode step
(kimi_mlx/decode.py), the kernels' self-check and fallback (kimi_mlx/kda/metal.py, whose Layer
kda_decode computes the same in-kernel) and the benches. Math as the reference:
    q, k  L2-normalised over Dk with eps 1e-6 added to the sum of squares; q then times Dk^-0.5
    g     = -exp(A_log) * softplus(f + dt_bias)      per channel, log space, float32
    beta  = sigmoid(b)                               float32
The conv (`conv_silu`), the output (`output_gate`) and the whole decode step in ops
(`decode_layer_ops`, the reference of the Layer kernel: kimi_mlx/kda/metal.py) are here too.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from .naive import kda_naive

L2_EPS = 1e-6


def l2_normalize(x: mx.array, eps: float = L2_EPS) -> mx.array:
    """x / sqrt(sum(x^2) + eps) over the last axis, in fp32 (eps inside the root, as the reference).

    One mx.fast.rms_norm kernel instead of a reduction and two elementwise passes: rms_norm gives
    x / sqrt(mean(x^2) + e) = sqrt(D) x / sqrt(sum(x^2) + D e), so e = eps / D and a 1/sqrt(D)."""
    D = x.shape[-1]
    return mx.fast.rms_norm(x.astype(mx.float32), None, eps / D) * (D**-0.5)


@partial(mx.compile, shapeless=True)
def forget_gate(f: mx.array, dt_bias: mx.array, A_log: mx.array) -> mx.array:
    """-exp(A_log) * softplus(f + dt_bias) in fp32: one fused kernel instead of ~8 elementwise ones.
    f: [B, T, H, D]; dt_bias: [H, D]; A_log: [H, 1] (both broadcast)."""
    f32 = mx.float32
    return -mx.exp(A_log.astype(f32)) * nn.softplus(f.astype(f32) + dt_bias.astype(f32))


def prologue(q, k, f, b, A_log, dt_bias):
    """Raw q, k [B, T, H, Dk] (after conv + SiLU), f [B, T, H, Dk] gate pre-activation (without
    dt_bias), b [B, T, H] beta logits, A_log (H values), dt_bias [H * Dk] -> (q normalised and
    scaled, k normalised, g, beta), all float32."""
    H, Dk = k.shape[-2:]
    q = l2_normalize(q) * (Dk**-0.5)
    k = l2_normalize(k)
    g = forget_gate(f, dt_bias.reshape(H, Dk), A_log.reshape(H, 1))
    return q, k, g, mx.sigmoid(b.astype(mx.float32))


def conv_silu(xs: mx.array, w: mx.array, T: int) -> mx.array:
    """The depthwise causal short conv + SiLU. xs: [B, K-1+T, C] the window then the T inputs;
    w: [C, K] -> [B, T, C]. K is 4: a few shifted multiply-adds beat a grouped conv everywhere."""
    out = xs[:, 0:T] * w[:, 0]
    for j in range(1, w.shape[1]):
        out = out + xs[:, j : j + T] * w[:, j]
    return nn.silu(out)


@partial(mx.compile, shapeless=True)
def _gated(o: mx.array, gate: mx.array) -> mx.array:
    """o * sigmoid(gate) in fp32, cast back to gate's dtype: one fused kernel."""
    return (o * mx.sigmoid(gate.astype(mx.float32))).astype(gate.dtype)


def output_gate(o: mx.array, gate: mx.array, norm_w: mx.array, eps: float) -> mx.array:
    """RMSNorm(o) * norm_w * sigmoid(gate), in fp32, returned in gate's dtype.
    o: [B, T, H, Dv]; gate: [B, T, H, Dv] activation dtype; norm_w: [Dv]."""
    o = mx.fast.rms_norm(o.astype(mx.float32), norm_w.astype(mx.float32), eps)
    return _gated(o, gate)


def decode_layer_ops(qkv, windows, conv_w, f, b, A_log, dt_bias, gate, norm_w, eps, state):
    """A KDA layer's step from its projections to what o_proj reads, in MLX ops: the reference of
    the Layer kernel (kimi_mlx.kda.metal.kda_decode_layer documents the shapes). The recurrence
    is kda_naive's. Returns (y [B, T, H, Dv] in qkv.dtype, new windows (3), state float32)."""
    B, T, _ = qkv.shape
    H, Dk = f.shape[-2:]
    Dv, C = gate.shape[-1], H * f.shape[-1]
    parts = mx.split(qkv, [C, 2 * C], axis=-1)
    weights = mx.split(conv_w.reshape(conv_w.shape[0], -1), [C, 2 * C], axis=0)
    outs, new = [], []
    for x, window, w in zip(parts, windows, weights):
        xs = mx.concatenate([window, x], axis=1)  # [B, K-1+T, C]
        outs.append(conv_silu(xs, w, T))
        new.append(xs[:, T:])
    q, k, g, beta = prologue(outs[0].reshape(B, T, H, Dk), outs[1].reshape(B, T, H, Dk), f, b, A_log, dt_bias)
    o, state = kda_naive(q, k, outs[2].reshape(B, T, H, Dv), g, beta, state)
    return output_gate(o, gate.astype(qkv.dtype), norm_w, eps), new, state
