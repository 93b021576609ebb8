"""KDA through MLX's built-in `mx.fast.gated_delta_update`.

Conventions are stated once in kimi_mlx/kda/__init__.py. Checked against kda_naive
(tests/test_kda.py): mx.fast takes the state as [B, H, Dv, Dk] like ours, accepts a per-channel
gamma [B, T, H, Dk], decays before the delta read (S <- S * gamma; kv = S k), and writes
o = S q after the update, so the only translation is gamma = exp(g).
"""

from __future__ import annotations

import mlx.core as mx


def kda_mx_fast(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """KDA over T tokens with mx.fast.gated_delta_update.

    Shapes:
        q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g: [B, T, H, Dk]; beta: [B, T, H]
        state: [B, H, Dv, Dk] float32 or None (zeros)
    Returns (o [B, T, H, Dv] in v.dtype, state [B, H, Dv, Dk] float32).
    """
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    f32 = mx.float32
    if state is None:
        state = mx.zeros((B, H, Dv, Dk), dtype=f32)
    if T == 0:
        return mx.zeros((B, 0, H, Dv), dtype=v.dtype), state.astype(f32)
    # Inputs go in as float32: on CPU mx.fast does its math in the input dtype (bf16 inputs
    # put ~2e-3 relative error into the fp32 state), and our contract is fp32 math.
    o, state = mx.fast.gated_delta_update(
        q.astype(f32),
        k.astype(f32),
        v.astype(f32),
        mx.exp(g.astype(f32)),
        beta.astype(f32),
        state.astype(f32),
    )
    return o.astype(v.dtype), state.astype(f32)
