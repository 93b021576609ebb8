"""Multi-head Latent Attention without position encoding (7 of the 27 layers).

Per token the cache keeps one 576-wide latent: c = RMSNorm(kv_a(x)[:512]) (eps 1e-6, as the
reference; mlx-lm uses 1e-5) and the shared key part k_r = kv_a(x)[512:] (no RoPE: mla_use_nope).
kv_b_proj is stored split (mlx-lm names): embed_q [H, R, Dn] maps c to per-head keys and
unembed_out [H, Dv, R] maps c to per-head values.

Two equivalent forms of  softmax(q_n.k_n + q_r.k_r) v  with scale (Dn+Dr)^-0.5:
- absorbed (decode, few queries): q_lat = q_n W_k^T, attend over the latent directly, then W_v.
  Never expands per-head K/V over the S cached tokens.
- expanded (prefill, many queries): expand K/V for the S tokens once, then regular attention;
  cheaper when T queries share the expansion.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.mla import MultiLinear  # per-head linear with a quantized form; reused as is

from .cache import LatentCache
from .config import ModelArgs

KV_NORM_EPS = 1e-6  # the reference's kv_a_layernorm is built without eps, so its default 1e-6 applies
ABSORB_MAX_QUERIES = 16  # up to this many new tokens per call use the absorbed form


class MLAttention(nn.Module):
    def __init__(self, args: ModelArgs):
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
        B, T, _ = x.shape
        H, R = self.num_heads, self.rank
        q = self.q_proj(x).reshape(B, T, H, -1).transpose(0, 2, 1, 3)  # [B, H, T, Dn+Dr]
        q_nope, q_rope = q[..., : self.nope_dim], q[..., self.nope_dim :]

        kv = self.kv_a_proj_with_mqa(x)  # [B, T, R+Dr]
        latent = mx.concatenate([self.kv_a_layernorm(kv[..., :R]), kv[..., R:]], axis=-1)
        offset = 0 if cache is None else cache.offset
        if cache is not None:
            latent, keys_valid = cache.update_and_fetch(latent, mask)  # [B, S, R+Dr], [B, S]
        else:
            keys_valid = None if mask is None else mask.astype(mx.bool_)
        S = latent.shape[1]
        attn_mask = self._mask(T, S, offset, keys_valid)  # [B|1, 1, T, S] bool
        latent = latent[:, None]  # [B, 1, S, R+Dr]: one shared "KV head"
        c = latent[..., :R]  # [B, 1, S, R]

        if T <= ABSORB_MAX_QUERIES:
            q_lat = self.embed_q(q_nope)  # [B, H, T, R]
            q_cat = mx.concatenate([q_lat, q_rope], axis=-1)  # [B, H, T, R+Dr]
            o = mx.fast.scaled_dot_product_attention(q_cat, latent, c, scale=self.scale, mask=attn_mask)
            o = self.unembed_out(o)  # [B, H, T, Dv]
        else:
            k_nope = self.embed_q(c, transpose=False)  # [B, H, S, Dn]
            k_rope = mx.broadcast_to(latent[..., R:], (B, H, S, self.rope_dim))
            k = mx.concatenate([k_nope, k_rope], axis=-1)  # [B, H, S, Dn+Dr]
            v = self.unembed_out(c)  # [B, H, S, Dv]
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=attn_mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, T, -1))

    @staticmethod
    def _mask(T: int, S: int, offset: int, keys_valid: mx.array | None) -> mx.array:
        """Causal (query i sits at position offset+i) and key-padding mask, True = attend."""
        causal = (mx.arange(T)[:, None] + offset) >= mx.arange(S)[None]  # [T, S]
        if keys_valid is None:
            return causal
        return causal[None, None] & keys_valid[:, None, None, :]  # [B, 1, T, S]
