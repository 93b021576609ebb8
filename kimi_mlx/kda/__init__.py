"""Kimi Delta Attention (KDA): the gated delta-rule recurrence with a per-channel forget gate.

Conventions, shared by every path (naive, chunked, mx_fast, metal):

    q, k   [B, T, H, Dk]  any float dtype; the caller has already L2-normalised q and k
                          and scaled q by Dk**-0.5
    v      [B, T, H, Dv]  any float dtype
    g      [B, T, H, Dk]  float32 forget gate in LOG space (<= 0), one value per Dk channel
    beta   [B, T, H]      write strength in (0, 1)
    state  [B, H, Dv, Dk] float32 (the mlx-lm / mx.fast layout), or None for zeros

Per token t, with S = state:
    S   = S * exp(g_t)                 decay each Dk channel (broadcast over Dv)
    kv  = S k_t                        sum over Dk -> [Dv]
    S   = S + beta_t (v_t - kv) k_t^T  delta-rule write
    o_t = S q_t                        sum over Dk -> [Dv]

`kda_decode_layer` is the layer's whole decode step around the recurrence (conv, prologue,
output norm and gate), one kernel on a GPU. Every path returns (o [B, T, H, Dv] in v.dtype, new state [B, H, Dv, Dk] float32) and does all
internal math in float32. `kda_naive` (one token at a time) is the truth the others are
tested against; `kda_update` picks a path (see dispatch.py).
"""

from .chunked import kda_chunked
from .dispatch import KDA_PATHS, get_kda_path, kda_update, layer_kernel_ready, set_kda_path
from .metal import kda_decode_layer, kda_metal, set_kernel_mode
from .mx_fast import kda_mx_fast
from .naive import kda_naive, kda_step

__all__ = [
    "KDA_PATHS",
    "get_kda_path",
    "kda_chunked",
    "kda_decode_layer",
    "kda_metal",
    "kda_mx_fast",
    "kda_naive",
    "kda_step",
    "kda_update",
    "layer_kernel_ready",
    "set_kda_path",
    "set_kernel_mode",
]
