"""Per-layer caches carried across model calls.

Layouts (owned here):
- KDACache.conv:  three arrays [B, K-1, C] (q, k, v pre-conv projections of the last K-1 tokens,
  in the activation dtype); C = H * D.
- KDACache.recurrent: [B, H, Dv, Dk] float32 (the KDA state; see kimi_mlx/kda).
- LatentCache: the 576-wide MLA latent of every token, [B, n, R + P] per page, where R =
  kv_lora_rank (normed latent, 512) and P = the shared "rope" key part (64); never per-head keys
  or values. Tokens live in pages of `page_size`: a full page is sealed and never written again,
  so appending never copies old tokens and a million-token cache costs only itself (plus the
  unused rows of the last page, which grows by doubling from `step` rows).
  With kv_bits 8 or 4 a page holds mx.quantize(latent, group_size=64) instead: packed words
  [B, n, W * bits / 32] uint32, scales and biases [B, n, W / 64] in the activation dtype
  (576 = 9 groups of 64; the first 8 groups are the 512-wide value part). A width that is not
  a whole number of groups is zero-padded to one (the demo model's 64 + 16).
  LatentCache.key_mask: [B, S_alloc] bool (False for left padding), only when a padded batch was seen.

Both expose `state` / `meta_state` (lists of arrays / strings) so a cache round-trips through
safetensors, and `copy()` for turn snapshots (recurrent state cannot be trimmed, only restored).
Arrays are only ever replaced, never written in place (functional slice updates), so a copy can
share them: writing to one cache copies at most the page being written.
"""

from __future__ import annotations

import mlx.core as mx

from .errors import KimiError

KV_BITS = (16, 8, 4)  # latent cache precision: 16 = the activation dtype, unquantized
KV_GROUP_SIZE = 64


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
    """The MLA latent cache of one layer, in pages (see the module docstring)."""

    step = 256  # rows of a page's first allocation
    page_size = 65536  # rows of a full page: step * 2^k, so doubling lands on it

    def __init__(self, kv_bits: int | None = None, group_size: int = KV_GROUP_SIZE):
        if kv_bits == 16:
            kv_bits = None
        if kv_bits not in (None, 8, 4):
            raise KimiError(f"kv_bits {kv_bits}: the latent cache takes 16, 8 or 4 bits")
        self.kv_bits, self.group_size = kv_bits, group_size
        self.pages: list[tuple[mx.array, ...]] = []  # sealed pages: (latent,) or (packed, scales, biases)
        self.tail: tuple[mx.array, ...] | None = None  # the page being written, [B, capacity, ...] each
        self.tail_used = 0
        self.key_mask: mx.array | None = None  # [B, S_alloc] bool, None = no padding seen
        self.offset = 0
        self.width: int | None = None  # R + P; quantized pages hold it zero-padded to whole groups

    # ---- writing

    def update(self, latent: mx.array, key_mask: mx.array | None = None) -> None:
        """Append latent [B, T, R+P] (and its key mask [B, T], 0 = left padding)."""
        B, T, _ = latent.shape
        self.width = latent.shape[-1]
        rows = (latent,) if self.kv_bits is None else tuple(
            mx.quantize(self._pad(latent), group_size=self.group_size, bits=self.kv_bits))
        done = 0
        while done < T:
            if self.tail is not None and self.tail_used >= self.page_size:
                self._seal()
            take = min(T - done, self.page_size - self.tail_used)
            need = self.tail_used + take
            capacity = 0 if self.tail is None else self.tail[0].shape[1]
            if need > capacity:  # double (up to a page): copying the tail costs O(page) per page
                grown = min(self.page_size, max(2 * capacity, -(-need // self.step) * self.step))
                self._resize_tail(rows, grown)
            start = mx.array([0, self.tail_used, 0])
            self.tail = tuple(
                mx.slice_update(buf, r[:, done:done + take], start, axes=(0, 1, 2)) for buf, r in zip(self.tail, rows)
            )
            self.tail_used += take
            done += take
        self._update_mask(B, T, key_mask)
        self.offset += T

    def _resize_tail(self, rows: tuple[mx.array, ...], capacity: int) -> None:
        B = rows[0].shape[0]
        fresh = tuple(mx.zeros((B, capacity, r.shape[2]), dtype=r.dtype) for r in rows)
        if self.tail is not None and self.tail_used:
            zero = mx.array([0, 0, 0])
            fresh = tuple(mx.slice_update(f, t[:, : self.tail_used], zero, axes=(0, 1, 2))
                          for f, t in zip(fresh, self.tail))
        self.tail = fresh

    def _seal(self) -> None:
        self.pages.append(tuple(t[:, : self.tail_used] for t in self.tail))
        self.tail, self.tail_used = None, 0

    def _update_mask(self, B: int, T: int, key_mask: mx.array | None) -> None:
        prev, end = self.offset, self.offset + T
        if key_mask is None and self.key_mask is None:
            return
        if self.key_mask is None or end > self.key_mask.shape[1]:
            grown = mx.ones((B, max(2 * prev, -(-end // self.step) * self.step)), dtype=mx.bool_)
            if self.key_mask is not None:
                grown = mx.slice_update(grown, self.key_mask[:, :prev], mx.array([0, 0]), axes=(0, 1))
            self.key_mask = grown
        new = key_mask.astype(mx.bool_) if key_mask is not None else mx.ones((B, T), dtype=mx.bool_)
        self.key_mask = mx.slice_update(self.key_mask, new, mx.array([0, prev]), axes=(0, 1))

    # ---- reading

    def segments(self) -> list[tuple[int, tuple[mx.array, ...]]]:
        """[(first token position, page arrays [B, n, ...])] covering tokens 0..offset-1, in order."""
        out, start = [], 0
        for page in self.pages:
            out.append((start, page))
            start += page[0].shape[1]
        if self.tail is not None and self.tail_used:
            out.append((start, tuple(t[:, : self.tail_used] for t in self.tail)))
        return out

    @property
    def keys_valid(self) -> mx.array | None:
        """[B, offset] bool (False = left padding), or None when no padding was seen."""
        return None if self.key_mask is None else self.key_mask[:, : self.offset]

    def _pad(self, latent: mx.array) -> mx.array:
        """Zero columns up to a multiple of the group size (quantization needs whole groups)."""
        extra = -latent.shape[-1] % self.group_size
        return latent if not extra else mx.pad(latent, [(0, 0), (0, 0), (0, extra)])

    def dequantize(self, arrays: tuple[mx.array, ...]) -> mx.array:
        """Page arrays -> latent [B, n, R+P] in the activation dtype."""
        if len(arrays) == 1:
            return arrays[0]
        out = mx.dequantize(*arrays, group_size=self.group_size, bits=self.kv_bits)
        return out if self.width is None else out[..., : self.width]

    def update_and_fetch(self, latent: mx.array, key_mask: mx.array | None = None):
        """Append, then return all S cached: ([B, S, R+P], [B, S] | None). A copy of the whole
        cache: for tests and tools; attention reads `segments()` page by page instead."""
        self.update(latent, key_mask)
        parts = [self.dequantize(arrays) for _, arrays in self.segments()]
        return mx.concatenate(parts, axis=1), self.keys_valid

    @property
    def latent(self) -> mx.array | None:
        """The buffer of the page being written, [B, capacity, ...] (packed words when quantized)."""
        return None if self.tail is None else self.tail[0]

    @property
    def nbytes(self) -> int:
        """Bytes held, allocated rows included."""
        arrays = [a for page in self.pages for a in page] + list(self.tail or ())
        return sum(a.nbytes for a in arrays) + (0 if self.key_mask is None else self.key_mask.nbytes)

    # ---- state (a list of arrays that describes itself: one array per page, or three when quantized)

    @property
    def state(self) -> list[mx.array]:
        arrays = [a for _, page in self.segments() for a in page]
        if arrays and self.key_mask is not None:
            arrays.append(self.keys_valid)
        return arrays

    @state.setter
    def state(self, arrays: list[mx.array]) -> None:
        arrays = list(arrays)
        self.key_mask = arrays.pop() if arrays and arrays[-1].dtype == mx.bool_ else None
        pages, i = [], 0
        while i < len(arrays):
            n = 3 if arrays[i].dtype == mx.uint32 else 1
            pages.append(tuple(arrays[i:i + n]))
            i += n
        if pages and len(pages[0]) == 3 and self.kv_bits is None:
            # bits from the shapes: packed words hold W * bits / 32, scales W / group (meta_state confirms)
            packed, scales = pages[0][0].shape[-1], pages[0][1].shape[-1]
            self.kv_bits = packed * 32 // (scales * self.group_size)
        elif pages and len(pages[0]) == 1:
            self.kv_bits = None
        self.pages = pages[:-1]
        self.tail = pages[-1] if pages else None
        self.tail_used = 0 if self.tail is None else self.tail[0].shape[1]
        self.offset = sum(p[0].shape[1] for p in pages)

    @property
    def meta_state(self) -> list[str]:
        return [str(self.offset), str(self.kv_bits or 16), str(self.group_size), str(self.width or 0)]

    @meta_state.setter
    def meta_state(self, values: list[str]) -> None:
        self.offset = int(values[0])
        if len(values) >= 3:  # files written before kv_bits existed carry the offset only
            bits = int(values[1])
            self.kv_bits, self.group_size = (None if bits == 16 else bits), int(values[2])
        self.width = int(values[3]) or None if len(values) >= 4 else None

    def copy(self) -> "LatentCache":
        """A snapshot that shares the arrays (they are never written in place)."""
        new = LatentCache(self.kv_bits, self.group_size)
        new.pages, new.tail, new.tail_used = list(self.pages), self.tail, self.tail_used
        new.key_mask, new.offset, new.width = self.key_mask, self.offset, self.width
        return new


def make_cache(model, kv_bits: int | None = None) -> list:
    """One cache per layer of `model`; MLA layers keep their latents at `kv_bits` (16, 8 or 4)."""
    return [KDACache() if layer.is_kda else LatentCache(kv_bits) for layer in model.layers]
