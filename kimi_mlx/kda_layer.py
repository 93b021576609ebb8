"""The Kimi Delta Attention layer (20 of the 27 layers of Kimi-Linear-48B-A3B).

x -> q, k, v projections -> short causal depthwise conv + SiLU (window carried in the cache)
  -> q, k L2-normalised (eps 1e-6 added to the sum of squares), q scaled by Dk^-0.5
  -> per-channel forget gate g = -exp(A_log) * softplus(f_b(f_a(x)) + dt_bias)   (log space, fp32)
  -> beta = sigmoid(b_proj(x))
  -> delta-rule recurrence (kimi_mlx.kda: state [B, H, Dv, Dk] fp32)
  -> RMSNorm(o) * sigmoid(g_b(g_a(x)))  (in fp32) -> o_proj.
Parameter names follow mlx-lm's `kimi_linear` so converted checkpoints load in both.
"""

from __future__ import annotations


import mlx.core as mx
import mlx.nn as nn

from .cache import KDACache
from .config import ModelArgs
from .kda import kda_decode_layer, kda_update, layer_kernel_ready
# The one definition of the math around the recurrence (conv, prologue, output norm and gate).
from .kda.prologue import conv_silu, forget_gate, l2_normalize, output_gate


class ShortConv(nn.Module):
    """Depthwise causal conv over time. weight: [C, K, 1] (MLX Conv1d layout, as mlx-lm stores it)."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Module()
        self.conv.weight = mx.zeros((channels, kernel_size, 1))
        self.kernel_size = kernel_size

    def __call__(self, x: mx.array, window: mx.array | None,
                 valid: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """x: [B, T, C], window: [B, K-1, C] or None, valid: [B, T] bool (False = LEFT padding) or
        None -> (silu(conv) [B, T, C], new window [B, K-1, C]). Each row's real tokens see the
        window then its earlier real tokens, never its padding, and the new window holds the
        last K-1 real inputs of the row (padded positions' outputs are meaningless)."""
        B, T, C = x.shape
        K = self.kernel_size
        if window is None:
            window = mx.zeros((B, K - 1, C), dtype=x.dtype)
        xs = mx.concatenate([window, x], axis=1)  # [B, K-1+T, C]
        if valid is not None:
            xs = _pads_first(xs, T - valid.sum(axis=1).astype(mx.int32), K - 1)
        return conv_silu(xs, self.conv.weight[:, :, 0], T), xs[:, T:]


def _pads_first(xs: mx.array, pads: mx.array, w: int) -> mx.array:
    """xs [B, w+T, C] = [window (w), pads (p_b), real tokens] per row -> [pads, window, real
    tokens], so the window sits right before the row's first real token. pads: [B] int32."""
    j = mx.arange(xs.shape[1], dtype=mx.int32)[None]  # [1, w+T]
    p = pads[:, None]  # [B, 1]
    src = mx.where(j < p, w + j, mx.where(j < p + w, j - p, j))  # [B, w+T] source position
    return mx.take_along_axis(xs, src[..., None], axis=1)


class KimiDeltaAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        H, D, hidden = args.kda_heads, args.kda_head_dim, args.hidden_size
        self.num_heads, self.head_dim = H, D
        proj = H * D
        self.q_proj = nn.Linear(hidden, proj, bias=False)
        self.k_proj = nn.Linear(hidden, proj, bias=False)
        self.v_proj = nn.Linear(hidden, proj, bias=False)
        self.q_conv = ShortConv(proj, args.conv_kernel)
        self.k_conv = ShortConv(proj, args.conv_kernel)
        self.v_conv = ShortConv(proj, args.conv_kernel)
        self.f_a_proj = nn.Linear(hidden, D, bias=False)
        self.f_b_proj = nn.Linear(D, proj, bias=False)
        self.b_proj = nn.Linear(hidden, H, bias=False)
        self.g_a_proj = nn.Linear(hidden, D, bias=False)
        self.g_b_proj = nn.Linear(D, proj, bias=False)
        self.A_log = mx.zeros((1, 1, H, 1), dtype=mx.float32)
        self.dt_bias = mx.zeros((proj,), dtype=mx.float32)
        self.o_norm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.o_proj = nn.Linear(proj, hidden, bias=False)

    def forget_gate(self, x: mx.array, fa: mx.array | None = None) -> mx.array:
        """x: [B, T, hidden] (or its f_a projection fa [B, T, D]) -> g [B, T, H, D] float32,
        log-space decay (<= 0)."""
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        f = self.f_b_proj(self.f_a_proj(x) if fa is None else fa).reshape(B, T, H, D)
        return forget_gate(f, self.dt_bias.reshape(H, D), self.A_log.reshape(H, 1))

    def project(self, x: mx.array) -> tuple[mx.array, ...]:
        """The six projections of the layer's input, each its own matmul: q, k, v [B, T, H*D],
        f_a, g_a [B, T, D], b [B, T, H] (kimi_mlx.decode runs them as two fused matmuls)."""
        return (self.q_proj(x), self.k_proj(x), self.v_proj(x), self.f_a_proj(x), self.g_a_proj(x), self.b_proj(x))

    def __call__(self, x: mx.array, mask: mx.array | None = None, cache: KDACache | None = None,
                 proj: tuple[mx.array, ...] | None = None):
        """x: [B, T, hidden]; mask: [B, T] (0 = left padding) or None; proj: `project(x)` computed
        by the caller (unpadded inputs only)."""
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        valid = None if mask is None else mask.astype(mx.bool_)  # [B, T], False = left padding
        if valid is not None:
            if proj is not None:
                raise ValueError("precomputed projections are for unpadded inputs (mask None)")
            x = mx.where(valid[..., None], x, 0).astype(x.dtype)
        qx, kx, vx, fa, ga, bx = self.project(x) if proj is None else proj
        if valid is None and T == 1 and cache is not None and self.kernel_step_ready(x.dtype):
            return self.kernel_step(x, (qx, kx, vx, fa, ga, bx), cache)
        windows = cache.conv if cache is not None and cache.conv is not None else [None] * 3
        q, wq = self.q_conv(qx, windows[0], valid)
        k, wk = self.k_conv(kx, windows[1], valid)
        v, wv = self.v_conv(vx, windows[2], valid)
        q = l2_normalize(q.reshape(B, T, H, D)) * (D**-0.5)  # [B, T, H, Dk] fp32
        k = l2_normalize(k.reshape(B, T, H, D))  # [B, T, H, Dk] fp32
        v = v.reshape(B, T, H, D)  # [B, T, H, Dv]
        g = self.forget_gate(x, fa)  # [B, T, H, Dk] fp32
        beta = mx.sigmoid(bx.astype(mx.float32))  # [B, T, H]
        if valid is not None:
            # A padded position leaves a carried state as it is: no decay (g = 0), no write (beta = 0).
            g = mx.where(valid[..., None, None], g, 0.0)
            beta = mx.where(valid[..., None], beta, 0.0)

        state = cache.recurrent if cache is not None else None
        o, state = kda_update(q, k, v, g, beta, state)  # o: [B, T, H, Dv]
        if cache is not None:
            cache.conv, cache.recurrent = [wq, wk, wv], state
            cache.offset += T

        gate = self.g_b_proj(ga).reshape(B, T, H, D)
        o = output_gate(o, gate.astype(x.dtype), self.o_norm.weight, self.o_norm.eps)
        return self.o_proj(o.reshape(B, T, H * D))

    def kernel_step_ready(self, dtype) -> bool:
        """True when a one-token step runs as one kernel (kimi_mlx.kda.layer_kernel_ready: the KDA
        path for one token is our kernels and the Layer kernel passed its self-check)."""
        return layer_kernel_ready(self.num_heads, self.head_dim, self.head_dim, self.q_conv.kernel_size, dtype)

    def conv_weight(self) -> mx.array:
        """The three convs' weights stacked, [3 H D, K, 1] (q, k, v channels). Made per call (one
        small copy; the compiled decode step passes its own stacked buffer instead): a cached
        array made inside an mx.compile trace would outlive the trace."""
        return mx.concatenate([self.q_conv.conv.weight, self.k_conv.conv.weight, self.v_conv.conv.weight], axis=0)

    def kernel_step(self, x: mx.array, proj: tuple[mx.array, ...], cache: KDACache,
                    qkv: mx.array | None = None, conv_w: mx.array | None = None) -> mx.array:
        """The one-token step from the projections (`project(x)`; qkv: q, k, v side by side when
        the caller has them fused) through kda_decode_layer (conv, prologue, recurrence, output
        norm and gate in one kernel), then o_proj. Advances `cache`. Same math as __call__."""
        B, T, _ = x.shape
        H, D, K = self.num_heads, self.head_dim, self.q_conv.kernel_size
        qx, kx, vx, fa, ga, bx = proj
        if qkv is None:
            qkv = mx.concatenate([qx, kx, vx], axis=-1)  # [B, T, 3 H D]
        windows = cache.conv
        if windows is None:
            windows = [mx.zeros((B, K - 1, H * D), dtype=qkv.dtype)] * 3
        f = self.f_b_proj(fa).reshape(B, T, H, D)
        gate = self.g_b_proj(ga).reshape(B, T, H, D)
        y, windows, state = kda_decode_layer(qkv, windows, self.conv_weight() if conv_w is None else conv_w, f, bx,
                                             self.A_log, self.dt_bias, gate, self.o_norm.weight, self.o_norm.eps,
                                             cache.recurrent)
        cache.conv, cache.recurrent = windows, state
        cache.offset += T
        return self.o_proj(y.reshape(B, T, H * D))
