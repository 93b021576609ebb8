"""The KDA recurrence one token at a time: the truth every faster path is tested against.

Conventions (shapes, layouts, gate space) are stated once in kimi_mlx/kda/__init__.py.
"""

from __future__ import annotations

import mlx.core as mx


def kda_step(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
) -> tuple[mx.array, mx.array]:
    """One token of the recurrence, all math in float32.

    Shapes:
        q, k: [B, H, Dk]; v: [B, H, Dv]; g: [B, H, Dk] (log space); beta: [B, H]
        state: [B, H, Dv, Dk] float32
    Returns (o [B, H, Dv] float32, new state [B, H, Dv, Dk] float32).
    """
    f32 = mx.float32
    q, k, v, g, beta = (x.astype(f32) for x in (q, k, v, g, beta))
    state = state.astype(f32) * mx.exp(g)[:, :, None, :]  # decay each Dk channel, [B, H, Dv, Dk]
    kv = (state * k[:, :, None, :]).sum(-1)  # what the state predicts for k, [B, H, Dv]
    delta = beta[..., None] * (v - kv)  # [B, H, Dv]
    state = state + delta[..., :, None] * k[:, :, None, :]  # rank-1 write, [B, H, Dv, Dk]
    o = (state * q[:, :, None, :]).sum(-1)  # [B, H, Dv]
    return o, state


def kda_naive(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """The recurrence over T tokens by repeated `kda_step`.

    Shapes:
        q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g: [B, T, H, Dk]; beta: [B, T, H]
        state: [B, H, Dv, Dk] float32 or None (zeros)
    Returns (o [B, T, H, Dv] in v.dtype, state [B, H, Dv, Dk] float32).
    """
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    if state is None:
        state = mx.zeros((B, H, Dv, Dk), dtype=mx.float32)
    outs = []
    for t in range(T):
        o, state = kda_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        outs.append(o)
    if not outs:  # T == 0: nothing to emit, state unchanged
        return mx.zeros((B, 0, H, Dv), dtype=v.dtype), state.astype(mx.float32)
    return mx.stack(outs, axis=1).astype(v.dtype), state
