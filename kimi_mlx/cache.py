"""Per-layer caches carried across model calls.

Layouts (owned here):
- KDACache.conv:  three arrays [B, K-1, C] (q, k, v pre-conv projections of the last K-1 tokens,
  in the activation dtype); C = H * D.
- KDACache.recurrent: [B, H, Dv, Dk] float32 (the KDA state; see kimi_mlx/kda).
- LatentCache.latent: [B, S, R + P] where R = kv_lora_rank (normed latent, 512) and P = the
  shared "rope" key part (64): the 576-wide MLA latent, never per-head keys/values.
  LatentCache.key_mask: [B, S] bool (False for left padding), only when a padded batch was seen.

Both expose `state` / `meta_state` (lists of arrays / strings) so a cache round-trips through
safetensors, and `copy()` for turn snapshots (recurrent state cannot be trimmed, only restored).
"""

from __future__ import annotations

import mlx.core as mx


class KDACache:
    """Conv windows and the fp32 recurrent state of one KDA layer."""

    def __init__(self):
        self.conv: list[mx.array] | None = None  # 3 x [B, K-1, C]
        self.recurrent: mx.array | None = None  # [B, H, Dv, Dk] float32
        self.offset = 0

    @property
    def state(self) -> list[mx.array]:
        if self.conv is None:
            return []
        return [*self.conv, self.recurrent]

    @state.setter
    def state(self, arrays: list[mx.array]) -> None:
        if not arrays:
            self.conv, self.recurrent = None, None
            return
        *self.conv, self.recurrent = arrays

    @property
    def meta_state(self) -> list[str]:
        return [str(self.offset)]

    @meta_state.setter
    def meta_state(self, values: list[str]) -> None:
        self.offset = int(values[0])

    def copy(self) -> "KDACache":
        new = KDACache()
        new.state, new.offset = list(self.state), self.offset  # arrays are immutable: sharing is a copy
        return new


class LatentCache:
    """The MLA latent cache; grows in blocks of `step` tokens so appending is O(new tokens)."""

    step = 256

    def __init__(self):
        self.latent: mx.array | None = None  # [B, S_alloc, R + P]
        self.key_mask: mx.array | None = None  # [B, S_alloc] bool, None = no padding seen
        self.offset = 0

    def update_and_fetch(self, latent: mx.array, key_mask: mx.array | None = None):
        """Append latent [B, T, R+P] (and its key mask [B, T]); return all S cached: ([B, S, R+P], [B, S] | None)."""
        B, T, W = latent.shape
        prev, end = self.offset, self.offset + T
        if self.latent is None or end > self.latent.shape[1]:
            n_alloc = ((end + self.step - 1) // self.step) * self.step
            grown = mx.zeros((B, n_alloc, W), dtype=latent.dtype)
            if self.latent is not None:
                grown[:, :prev] = self.latent[:, :prev]
            self.latent = grown
            if self.key_mask is not None:
                mask = mx.ones((B, n_alloc), dtype=mx.bool_)
                mask[:, :prev] = self.key_mask[:, :prev]
                self.key_mask = mask
        if key_mask is not None and self.key_mask is None:
            self.key_mask = mx.ones((B, self.latent.shape[1]), dtype=mx.bool_)
        self.latent[:, prev:end] = latent
        if self.key_mask is not None:
            self.key_mask[:, prev:end] = (
                key_mask.astype(mx.bool_) if key_mask is not None else mx.ones((B, T), dtype=mx.bool_)
            )
        self.offset = end
        keys_valid = None if self.key_mask is None else self.key_mask[:, :end]
        return self.latent[:, :end], keys_valid

    @property
    def state(self) -> list[mx.array]:
        if self.latent is None:
            return []
        arrays = [self.latent[:, : self.offset]]
        if self.key_mask is not None:
            arrays.append(self.key_mask[:, : self.offset])
        return arrays

    @state.setter
    def state(self, arrays: list[mx.array]) -> None:
        self.latent = arrays[0] if arrays else None
        self.key_mask = arrays[1] if len(arrays) > 1 else None
        self.offset = 0 if self.latent is None else self.latent.shape[1]

    @property
    def meta_state(self) -> list[str]:
        return [str(self.offset)]

    @meta_state.setter
    def meta_state(self, values: list[str]) -> None:
        self.offset = int(values[0])

    def copy(self) -> "LatentCache":
        # Only the used prefix is kept, so the snapshot never aliases a buffer that is written later.
        new = LatentCache()
        new.state = [mx.array(a) for a in self.state]
        return new
