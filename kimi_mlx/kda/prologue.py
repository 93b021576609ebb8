"""The KDA layer's per-token prologue: what turns raw projections into the recurrence's inputs.

One definition, used by the layer (kimi_mlx/kda_layer.py), the compiled decode step
(kimi_mlx/decode.py), the kernels' self-check and fallback (kimi_mlx/kda/metal.py, whose fused
kda_decode computes the same in-kernel) and the benches. Math as the reference:
    q, k  L2-normalised over Dk with eps 1e-6 added to the sum of squares; q then times Dk^-0.5
    g     = -exp(A_log) * softplus(f + dt_bias)      per channel, log space, float32
    beta  = sigmoid(b)                               float32
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

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
