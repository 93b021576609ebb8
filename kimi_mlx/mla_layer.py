"""Multi-head Latent Attention without position encoding (7 of the 27 layers).

Per token the cache keeps one 576-wide latent: c = RMSNorm(kv_a(x)[:512]) (eps 1e-6, as the
reference; mlx-lm uses 1e-5) and the shared key part k_r = kv_a(x)[512:] (no RoPE: mla_use_nope).
kv_b_proj is stored split (mlx-lm names): embed_q [H, R, Dn] maps c to per-head keys and
unembed_out [H, Dv, R] maps c to per-head values.

Two equivalent forms of  softmax(q_n.k_n + q_r.k_r) v  with scale (Dn+Dr)^-0.5:
- absorbed: q_lat = q_n W_k^T per head; scores against the [S, R+P] latent, output in the latent
  space, then W_v. Costs (R+P) + R = 1088 multiply-adds per head, query and key.
- expanded: per-head K/V of a key block, then regular attention: (Dn+Dr) + Dv = 320 per head,
  query and key, plus R * (Dn+Dv) = 131072 per head and key to expand, shared by the T queries.
  Cheaper once T is large (one prefill step), never needed for decode.
Either way the keys are visited in blocks with an online softmax (flash-attention style), so a
step holds one [B, H, T, block] score matrix and one expanded block, never anything of size S:
prefill memory does not grow with the context beyond the latent cache itself. Quantized caches
(kv_bits 8/4) are read with quantized matmuls (absorbed) or dequantized a block at a time.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cache import LatentCache
from .config import ModelArgs

KV_NORM_EPS = 1e-6  # the reference's kv_a_layernorm is built without eps, so its default 1e-6 applies
# Steps of more queries than this use the expanded form: measured on CPU (bench/bench_long_context.py
# --forms); the multiply-add count alone puts the crossover at R(Dn+Dv) / (2R+P - (Dn+Dr+Dv)) = 171.
ABSORB_MAX_QUERIES = 128
# fp32 scores of one key block [B, H, T, block]: this, rounded to 2^k keys. A prefill step
# evaluates its running softmax once the blocks queued since the last evaluation hold
# SYNC_SCORE_BYTES of scores (so the lazy graph holds about that much). Each block costs a dozen
# launches and each evaluation a host sync, so small blocks are launch-bound; large ones cost
# memory (an MLA layer's step peaks at ~3.5x the block's bytes). Measured on the H200, one MLA
# layer's 2048-token step over a 64k prefix (bench/gpu/mla_forms.py): 207 ms at 64 MB blocks,
# 95 ms at 256 MB, 60 ms at 1 GiB; its peak 0.7 / 1.05 / 3.5 GiB at 64 MB / 256 MB / 1 GiB
# (bench/gpu/prefill_memory.py). 512 MB: between the two, for 128k prompts in a minute.
SCORE_BLOCK_BYTES = 512 << 20
SYNC_SCORE_BYTES = 512 << 20
MIN_KEY_BLOCK = 256
MASKED = -1e30  # finite, so a fully masked block never makes NaN in the online softmax


class MLAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        # Imported here: mlx-lm's package imports transformers (seconds), and `kimi-mlx plan` imports
        # this module for its block sizes without building a layer.
        from mlx_lm.models.mla import MultiLinear  # per-head linear with a quantized form; reused as is

        super().__init__()
        self.num_heads = H = args.num_attention_heads
        self.nope_dim = args.qk_nope_head_dim
        self.rope_dim = args.qk_rope_head_dim
        self.v_dim = args.v_head_dim
        self.rank = args.kv_lora_rank
        self.scale = (self.nope_dim + self.rope_dim) ** -0.5
        hidden = args.hidden_size
        self.q_proj = nn.Linear(hidden, H * (self.nope_dim + self.rope_dim), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(self.rank, eps=KV_NORM_EPS)
        self.embed_q = MultiLinear(self.nope_dim, self.rank, H)  # weight [H, R, Dn]
        self.unembed_out = MultiLinear(self.rank, self.v_dim, H)  # weight [H, Dv, R]
        self.o_proj = nn.Linear(H * self.v_dim, hidden, bias=False)

    def __call__(self, x: mx.array, mask: mx.array | None = None, cache: LatentCache | None = None):
        """x: [B, T, hidden]; mask: [B, T] (0 = left padding) or None."""
        q, latent = self.project(x)
        if cache is None:
            cache = LatentCache()  # this call's own tokens only
        return self.output(self.attend(q, latent, cache, mask), x.dtype, self.absorbs(q.shape[2]))

    # The three pieces of a call (kimi_mlx.decode compiles the first and the last: their shapes
    # are fixed at decode, while the attention's key count grows every token).

    def project(self, x: mx.array, proj: tuple[mx.array, mx.array] | None = None) -> tuple[mx.array, mx.array]:
        """x [B, T, hidden] -> (q [B, H, T, Dn+Dr], latent [B, T, R+Dr] to cache). proj: (q_proj(x),
        kv_a_proj_with_mqa(x)) computed by the caller (kimi_mlx.decode fuses the two matmuls)."""
        B, T, _ = x.shape
        R = self.rank
        qx, kv = (self.q_proj(x), self.kv_a_proj_with_mqa(x)) if proj is None else proj  # kv: [B, T, R+Dr]
        q = qx.reshape(B, T, self.num_heads, -1).transpose(0, 2, 1, 3)  # [B, H, T, Dn+Dr]
        latent = mx.concatenate([self.kv_a_layernorm(kv[..., :R]), kv[..., R:]], axis=-1)
        return q, latent

    @staticmethod
    def absorbs(T: int) -> bool:
        """Whether a step of T queries uses the absorbed form (else the expanded one)."""
        return T <= ABSORB_MAX_QUERIES

    def attend(self, q: mx.array, latent: mx.array, cache: LatentCache, mask: mx.array | None = None) -> mx.array:
        """Append latent to the cache, attend over it: -> o [B, H, T, R] (absorbed form: still in
        the latent space) or [B, H, T, Dv] (expanded), float32 (or the cache's dtype when all the
        scores fit one block); `output` finishes it. q may also be `absorb(q)` already ([B, H*T,
        R+Dr]: kimi_mlx.decode computes it inside its compiled projection step)."""
        H = self.num_heads
        B, T = (q.shape[0], q.shape[2]) if q.ndim == 4 else (q.shape[0], q.shape[1] // H)
        offset = cache.offset
        cache.update(latent, mask)  # the step attends to its own tokens as cached (maybe quantized)
        blocks = _key_blocks(cache.segments(), _block_size(B * H * T))
        if q.ndim == 3 or self.absorbs(T):
            return self._absorbed(q if q.ndim == 3 else self.absorb(q), (B, H, T), cache).attend(
                blocks, offset, cache.keys_valid)
        return self._expanded(q, cache).attend(blocks, offset, cache.keys_valid)

    def absorb(self, q: mx.array) -> mx.array:
        """q [B, H, T, Dn+Dr] -> the absorbed queries [B, H*T, R+Dr]: q_n W_k^T per head beside q_r,
        times the softmax scale."""
        B, H, T, _ = q.shape
        q_lat = self.embed_q(q[..., : self.nope_dim])  # [B, H, T, R]
        return (mx.concatenate([q_lat, q[..., self.nope_dim:]], axis=-1) * self.scale).reshape(B, H * T, -1)

    def output(self, o: mx.array, dtype: mx.Dtype, absorbed: bool) -> mx.array:
        """o from `attend` -> [B, T, hidden]: W_v (absorbed form only), then o_proj."""
        B, H, T, _ = o.shape
        o = o.astype(dtype)
        if absorbed:  # values still in the latent space
            o = self.unembed_out(o)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, T, -1))

    def _absorbed(self, q_cat: mx.array, shape: tuple[int, int, int], cache: LatentCache) -> "_Attention":
        """Scores and output in the latent space: q_cat = absorb(q) [B, H*T, R+Dr] (q_n W_k^T
        beside q_r, scaled), then W_v on the result (`output`). shape: (B, H, T)."""
        B, H, T = shape
        R, bits, group = self.rank, cache.kv_bits, cache.group_size

        if bits is not None and R % group == 0:  # values are whole groups: read them quantized
            extra = -q_cat.shape[-1] % group  # pages are zero-padded to whole groups
            q_pad = mx.pad(q_cat, [(0, 0), (0, 0), (0, extra)]) if extra else q_cat

        def block(arrays):  # one GEMM for all heads: [B, H*T, R+Dr] x [B, n, R+Dr]^T
            if bits is not None and R % group == 0:
                w, sc, bi = arrays
                s = mx.quantized_matmul(q_pad, w, sc, bi, transpose=True, group_size=group, bits=bits)
                # Values (the first R // group groups): dequantized, then a plain GEMM. quantized_matmul
                # with transpose=False would read them packed, but MLX's CUDA backend has no such kernel
                # for these shapes; this form runs on every backend (one more pass over the block).
                values = mx.dequantize(w[..., : R * bits // 32], sc[..., : R // group], bi[..., : R // group],
                                       group_size=group, bits=bits)  # [B, n, R]
                pv = lambda p: p.astype(values.dtype) @ values  # noqa: E731
            else:
                lat = cache.dequantize(arrays)  # [B, n, R+Dr]
                s = q_cat @ lat.swapaxes(1, 2)
                # values = the first R columns: the product runs over all R+Dr (12% more multiply-adds)
                # and drops the last Dr of its output; a [..., :R] operand is strided, which a GEMM
                # may first copy (the whole block, every token).
                pv = lambda p: (p.astype(lat.dtype) @ lat)[..., :R]  # noqa: E731
            return s.reshape(B, H, T, -1), lambda p: pv(p.reshape(B, H * T, -1)).reshape(B, H, T, R)

        return _Attention(block, (B, H, T))

    def _expanded(self, q: mx.array, cache: LatentCache) -> "_Attention":
        """Per-head keys and values of one key block at a time, then regular attention."""
        B, H, T, _ = q.shape
        R = self.rank
        q = q * self.scale

        def block(arrays):
            lat = cache.dequantize(arrays)[:, None]  # [B, 1, n, R+Dr]
            k_rope = mx.broadcast_to(lat[..., R:], (B, H, lat.shape[2], self.rope_dim))
            k = mx.concatenate([self.embed_q(lat[..., :R], transpose=False), k_rope], axis=-1)  # [B, H, n, Dn+Dr]
            v = self.unembed_out(lat[..., :R])  # [B, H, n, Dv]
            return q @ k.swapaxes(-1, -2), lambda p: p.astype(v.dtype) @ v

        return _Attention(block, (B, H, T))


class _Attention:
    """softmax(scores) @ values over key blocks, one block at a time (online softmax, fp32).

    block(arrays) -> (scores [B, H, T, n] scaled, pv(p) -> p @ V [B, H, T, D]); `attend` returns
    the normalised output [B, H, T, D]: the values' dtype over one block, fp32 over several (one
    softmax over them all when their scores fit one block: a decode step over several pages;
    else the online softmax).
    Query i sits at position offset + i and sees the keys at positions <= its own that are valid
    (keys_valid [B, S], False = left padding).
    """

    def __init__(self, block, shape):
        self.block, self.shape = block, shape

    def attend(self, blocks, offset: int, keys_valid: mx.array | None) -> mx.array:
        T = self.shape[2]
        if len(blocks) == 1:
            # One key block (every decode step up to a page, most prefill steps): the plain
            # softmax, one kernel (fp32 accumulation inside, `precise`) instead of the online
            # softmax's ~7 (casts, max, exp, sum, rescale, divide); the same math, and the
            # online form below is its check (tests/test_long_context.py: blocked == one block).
            k0, arrays = blocks[0]
            s, pv = self.block(arrays)
            return pv(mx.softmax(self._masked(s, k0, arrays[0].shape[1], offset, keys_valid), axis=-1, precise=True))
        B, H = self.shape[:2]
        if B * H * T * sum(a[0].shape[1] for _, a in blocks) * 4 <= SCORE_BLOCK_BYTES:
            # All keys' scores fit one block (a decode step over several pages): one softmax over
            # the pages' scores side by side, then each page's values; no online-softmax rescaling.
            parts = [self.block(a) for _, a in blocks]  # [(scores [B, H, T, n], pv)]
            scores = [self._masked(s, k0, a[0].shape[1], offset, keys_valid) for (k0, a), (s, _) in zip(blocks, parts)]
            sizes = [s.shape[-1] for s in scores]
            p = mx.softmax(mx.concatenate(scores, axis=-1), axis=-1, precise=True)
            ps = mx.split(p, [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)], axis=-1)
            out = parts[0][1](ps[0]).astype(mx.float32)  # the pages' sums in fp32 (a million keys: 16 pages)
            for (_, pv), pi in zip(parts[1:], ps[1:]):
                out = out + pv(pi).astype(mx.float32)
            return out
        m = l = acc = None
        pending = 0  # bytes of fp32 scores queued since the last evaluation
        for k0, arrays in blocks:
            n = arrays[0].shape[1]
            s, pv = self.block(arrays)
            s = self._masked(s.astype(mx.float32), k0, n, offset, keys_valid)
            block_max = s.max(axis=-1, keepdims=True)
            if m is None:
                m = block_max
                p = mx.exp(s - m)
                l, acc = p.sum(axis=-1, keepdims=True), pv(p).astype(mx.float32)
            else:
                m_new = mx.maximum(m, block_max)
                p = mx.exp(s - m_new)
                correction = mx.exp(m - m_new)
                l = l * correction + p.sum(axis=-1, keepdims=True)
                acc = acc * correction + pv(p).astype(mx.float32)
                m = m_new
            pending += s.size * 4
            if T > 1 and pending >= SYNC_SCORE_BYTES:
                # A prefill step's lazy graph would hold every block's scores at once ([B, H, T,
                # block] each); evaluating the running softmax state makes the blocks run a few
                # at a time (memory of SYNC_SCORE_BYTES). Decode (one query) never syncs here: its
                # scores are 4 bytes per head and key (128 MB at 1M keys), and a host sync per
                # page, layer and token would stall the GPU.
                mx.eval(m, l, acc)
                pending = 0
        return acc / l  # [B, H, T, D] float32

    def _masked(self, s: mx.array, k0: int, n: int, offset: int, keys_valid: mx.array | None) -> mx.array:
        """Scores [B, H, T, n] of keys k0.. with the keys a query may not see set to MASKED."""
        T = self.shape[2]
        keep = None
        if k0 + n - 1 > offset:  # a key later than the first query: causal mask
            keep = mx.arange(offset, offset + T)[:, None] >= mx.arange(k0, k0 + n)[None]  # [T, n]
        if keys_valid is not None:
            valid = keys_valid[:, None, None, k0:k0 + n]  # [B, 1, 1, n]
            keep = valid if keep is None else keep & valid
        return s if keep is None else mx.where(keep, s, MASKED)


def _block_size(rows: int) -> int:
    """Keys per block: fp32 scores of `rows` query rows within SCORE_BLOCK_BYTES, a power of two
    (so blocks start at the same positions whatever the page layout: reloaded caches are bit-exact)."""
    keys = max(MIN_KEY_BLOCK, SCORE_BLOCK_BYTES // (4 * rows))
    return min(1 << (keys.bit_length() - 1), LatentCache.page_size)


def _key_blocks(segments, block: int):
    """Split cache pages into key blocks: [(first key position, arrays [B, n, ...])]."""
    out = []
    for start, arrays in segments:
        n = arrays[0].shape[1]
        for b0 in range(0, n, block):
            out.append((start + b0, tuple(a[:, b0:b0 + block] for a in arrays) if n > block else arrays))
    return out
