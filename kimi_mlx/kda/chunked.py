"""Chunkwise-parallel KDA for prefill (WY/UT form), differentiable with MLX autodiff.

Conventions are stated once in kimi_mlx/kda/__init__.py. Inside one chunk of C tokens with
start state S0 [Dv, Dk], G_t = cumsum of g within the chunk (inclusive, <= 0):

    S_t  = S0 diag(e^{G_t}) + sum_{j<=t} u_j (k_j * e^{G_t - G_j})^T
    u    = T^-1 (beta v) - T^-1 (beta k e^{G}) S0^T,   T = I + diag(beta) strict_lower(A_kk)
    o_t  = S0 (q_t e^{G_t}) + sum_{j<=t} A_qk[t, j] u_j
    A_xk[t, j] = sum_c x_t[c] k_j[c] e^{G_t[c] - G_j[c]}          (j <= t)

e^{G_t - G_j} is never formed from a difference of cumsums: it is the product of the per-token
decays a = e^g over (j, t] (see _decay_gram). Everything except the S0-dependent products is
computed for all chunks at once; a short Python loop then carries the fp32 state from chunk
to chunk.
"""

from __future__ import annotations

import mlx.core as mx

from ..precision import fp32_matmul as mm  # every product here needs float32 (TF32 GPUs: 3 passes)

CHUNK = 64  # tokens per chunk (kda_chunked's default; kimi_mlx.plan and kda.metal read it)
# Block sizes of the decay-gram hierarchy: a 64-chunk splits into 4 x 16, each 16 into 4 x 4,
# each 4 goes diagonal by diagonal. See _decay_gram for why.
GRAM_BLOCKS = (16, 4)
# Diagonal blocks of the triangular inverse up to this size use the product form.
INV_BASE = 16


def _to_chunks(x: mx.array, chunk: int) -> mx.array:
    """[B, T, H, ...] -> [B, H, N, C, ...] float32, zero-padded to N * C tokens.

    Padded tokens have k = 0, beta = 0 and g = 0 (no decay), so they leave the state unchanged.
    """
    B, T, H = x.shape[:3]
    n = -(-T // chunk)
    pad = n * chunk - T
    x = x.astype(mx.float32)
    if pad:
        x = mx.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(B, n, chunk, H, *x.shape[3:])
    return mx.moveaxis(x, 3, 1)


def _banded_gram(X: mx.array, K: mx.array, a: mx.array) -> mx.array:
    """The decay gram of a tiny block (n = 4 here), one diagonal d = t - j at a time.

    X: [..., R, n, D]; K, a: [..., n, D]. Returns [..., R, n, n], zero above the diagonal.
    Diagonal d carries prod_{t-d < m <= t} a_m, built from diagonal d-1 by one multiply.
    """
    n = K.shape[-2]
    band = [(X * K[..., None, :, :]).sum(-1)]  # d = 0: [.., R, n]
    decay = a[..., 1:, :]  # d = 1, for t = 1..n-1
    for d in range(1, n):
        if d > 1:
            decay = decay[..., 1:, :] * a[..., 1 : n - d + 1, :]  # for t = d..n-1
        kd = K[..., : n - d, :] * decay  # k_{t-d} decayed to t, [.., n-d, D]
        band.append((X[..., d:, :] * kd[..., None, :, :]).sum(-1))  # [.., R, n-d]
    # Entry (t, j) is band[t - j][j]; lay the bands out flat and gather, with a trailing 0.
    flat = mx.concatenate(band + [mx.zeros_like(band[0][..., :1])], axis=-1)
    offset = [sum(n - e for e in range(d)) for d in range(n)]
    index = [offset[t - j] + j if t >= j else flat.shape[-1] - 1 for t in range(n) for j in range(n)]
    A = mx.take(flat, mx.array(index), axis=-1)  # [.., R, n * n]
    return A.reshape(*A.shape[:-1], n, n)


def _decay_gram(X: mx.array, K: mx.array, a: mx.array, blocks=GRAM_BLOCKS) -> mx.array:
    """A[r, t, j] = sum_c X[r, t, c] K[j, c] prod_{j<m<=t} a[m, c] for j <= t, else 0.

    X: [..., R, n, D] (several row sets share the column work); K: [..., n, D];
    a: [..., n, D] per-token decay exp(g) in (0, 1]. Returns [..., R, n, n].

    Why this shape: the one-matmul form (X e^{G}) (K e^{-G})^T overflows once a channel has
    decayed by more than ~88 in log space (gates reach -5 per token and below), and the
    explicit [n, n, D] pair tensor is large. Instead split into blocks of `s`; for j in block J
    and t after it, the decay is (j, end(J)] * (end(J), t]: two products of a's, each <= 1, so
    nothing overflows and an underflow to 0 only drops a term truly below 1e-38. Then each
    block column J is one matmul. Products of the per-token a's (not exp of differences of
    cumsums, which reach -300) keep each factor within a few ulps, and exp(g) stays the only
    exp (on CPU an exp costs ~25 multiplies). Diagonal blocks recurse; the smallest are banded.
    """
    n, D = K.shape[-2:]
    sub = next((s for s in blocks if s < n and n % s == 0), None)
    if sub is None:
        return _banded_gram(X, K, a)
    nb, R = n // sub, X.shape[-3]
    Kb = K.reshape(*K.shape[:-2], nb, sub, D)  # [.., nb, s, D]
    ab = a.reshape(*a.shape[:-2], nb, sub, D)
    cols = Kb * mx.cumprod(ab, axis=-2, reverse=True, inclusive=False)  # k_j decayed to end(J)
    parts = []
    for J in range(nb - 1):
        lo = (J + 1) * sub  # rows t >= lo lie after block J
        since = mx.cumprod(a[..., lo:, :], axis=-2)  # decay over (end(J), t], [.., n-lo, D]
        rows = (X[..., lo:, :] * since[..., None, :, :]).reshape(*X.shape[:-3], R * (n - lo), D)
        blk = mm(rows, mx.swapaxes(cols[..., J, :, :], -1, -2))  # [.., R * (n-lo), s]
        blk = blk.reshape(*X.shape[:-3], R, n - lo, sub)
        parts.append(mx.pad(blk, [(0, 0)] * (blk.ndim - 2) + [(lo, 0), (0, 0)]))
    parts.append(mx.zeros((*X.shape[:-2], n, sub), dtype=X.dtype))  # nothing after the last block
    off = mx.concatenate(parts, axis=-1)  # [.., R, n, n]

    Xb = X.reshape(*X.shape[:-2], nb, sub, D)  # [.., R, nb, s, D]
    diag = _decay_gram(mx.swapaxes(Xb, -4, -3), Kb, ab, blocks)  # [.., nb, R, s, s]
    diag = mx.swapaxes(diag, -4, -3)[..., :, :, :, None, :]  # [.., R, I, s, 1, s]
    eye = mx.eye(nb)[:, None, :, None]  # [I, 1, J, 1]
    return off + (diag * eye).reshape(*off.shape)  # block-diagonal part


def _unit_lower_inverse(M: mx.array) -> mx.array:
    """Inverse of unit lower-triangular M [..., n, n] with matmuls only (differentiable).

    Halves recursively, inv([[A, 0], [C, D]]) = [[A^-1, 0], [-D^-1 C A^-1, D^-1]], down to
    16 x 16 blocks, which use the product form (I + N)^-1 = (I - N)(I + N^2)(I + N^4)(I + N^8)
    (N strictly lower, so N^16 = 0). Why: forward substitution is 64 dependent row steps of tiny
    ops (slow in MLX, a long autodiff tape); the product form on all of 64 x 64 costs 10 matmuls
    of 64^3 and sums powers up to N^63. This hybrid is all batched matmuls, ~0.7 * 64^3 MACs,
    and its product forms stop at N^15, so rounding stays at the naive path's level (tests).
    """
    n = M.shape[-1]
    if n <= INV_BASE or n % 2:
        eye = mx.eye(n)
        N = M - eye
        P, Np, p = eye - N, N, 1
        while 2 * p < n:  # after the loop P = sum_{i < 2p} (-N)^i and N^{2p} = 0
            Np = mm(Np, Np)
            P = P + mm(P, Np)
            p *= 2
        return P
    h = n // 2
    inv = _unit_lower_inverse(mx.stack([M[..., :h, :h], M[..., h:, h:]], axis=-3))
    Ai, Di = inv[..., 0, :, :], inv[..., 1, :, :]
    X = -mm(Di, mm(M[..., h:, :h], Ai))
    top = mx.concatenate([Ai, mx.zeros_like(Ai)], axis=-1)
    return mx.concatenate([top, mx.concatenate([X, Di], axis=-1)], axis=-2)


def _chunk_terms(q, k, v, g, beta):
    """The state-independent part of every chunk, all chunks at once.

    q, k, g: [B, H, N, C, Dk]; v: [B, H, N, C, Dv]; beta: [B, H, N, C].
    Returns WQ [.., 2C, Dk] (W over q decayed from the chunk start), U0 [.., C, Dv],
    Aqk [.., C, C], and kst [.., C, Dk], decay [.., 1, Dk] for the state update.
    """
    C, Dk = k.shape[-2:]
    a = mx.exp(g)  # per-token decay; the only exp (see _decay_gram)
    A = _decay_gram(mx.stack([q, k], axis=-3), k, a)  # [.., 2, C, C]
    Aqk, Akk = A[..., 0, :, :], A[..., 1, :, :]
    strict = mx.tril(mx.ones((C, C), dtype=mx.bool_), k=-1)
    Tinv = _unit_lower_inverse(mx.eye(C) + beta[..., :, None] * mx.where(strict, Akk, 0.0))

    since = mx.cumprod(a, axis=-2)  # decay since the chunk start, [.., C, Dk]
    until = mx.cumprod(a, axis=-2, reverse=True, inclusive=False)  # to the chunk end
    bk = beta[..., None]
    WU = mm(Tinv, mx.concatenate([bk * k * since, bk * v], axis=-1))  # one matmul for both
    W, U0 = WU[..., :Dk], WU[..., Dk:]  # u = U0 - W S0^T: [.., C, Dk], [.., C, Dv]
    WQ = mx.concatenate([W, q * since], axis=-2)  # both multiply S0^T, [.., 2C, Dk]
    return WQ, U0, Aqk, k * until, since[..., -1:, :]


def kda_chunked(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
    chunk_size: int = CHUNK,
) -> tuple[mx.array, mx.array]:
    """KDA over T tokens in chunks of `chunk_size` (T need not be a multiple).

    Shapes:
        q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g: [B, T, H, Dk]; beta: [B, T, H]
        state: [B, H, Dv, Dk] float32 or None (zeros)
    Returns (o [B, T, H, Dv] in v.dtype, state [B, H, Dv, Dk] float32).
    """
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    S = mx.zeros((B, H, Dv, Dk), mx.float32) if state is None else state.astype(mx.float32)
    if T == 0:
        return mx.zeros((B, 0, H, Dv), dtype=v.dtype), S
    C = chunk_size
    WQ, U0, Aqk, kst, decay = _chunk_terms(*(_to_chunks(x, C) for x in (q, k, v, g, beta)))
    outs = []
    for n in range(WQ.shape[2]):  # the only sequential part: carry S [B, H, Dv, Dk]
        P = mm(WQ[:, :, n], mx.swapaxes(S, -1, -2))  # [B, H, 2C, Dv]
        U = U0[:, :, n] - P[..., :C, :]  # [B, H, C, Dv]
        outs.append(mm(Aqk[:, :, n], U) + P[..., C:, :])  # in-chunk part + what S0 gives
        S = S * decay[:, :, n] + mm(mx.swapaxes(U, -1, -2), kst[:, :, n])
    o = mx.stack(outs, axis=2).reshape(B, H, -1, Dv)[:, :, :T]  # [B, H, T, Dv]
    return mx.swapaxes(o, 1, 2).astype(v.dtype), S
