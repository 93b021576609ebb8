"""The decode batch's caches: per-request caches (B = 1) merged into one batched cache and split out.

Layouts (kimi_mlx/cache.py):
- KDACache: conv windows 3 x [B, K-1, C] and the fp32 state [B, H, Dv, Dk] have the same size
  for every request, so rows concatenate and slice along the batch axis.
- LatentCache: rows hold different numbers of tokens. Merged rows are LEFT-padded to the
  longest with zeros and `key_mask` False on the padding (MLA never attends a masked key), as
  mlx-lm's BatchKVCache does for attention caches. Decode steps append one token to every row,
  so padding only ever sits at the start of a row; a row leaving the batch may let the common
  padding be trimmed.
The batched cache is a plain list of layer caches: the model runs on it unchanged. After a
batched prefill chunk a row may also hold padding in its middle (its chunk was left-padded on
top of its earlier tokens); split_rows gathers each row's real positions back out.
A layer cache that holds nothing (a layer another rank runs in a pipeline, kimi_mlx/parallel/
pipeline.py) passes through every function here as an empty cache of its kind.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..cache import KDACache, LatentCache


def _latent_rows(c: LatentCache) -> tuple[list[mx.array], mx.array]:
    """The cache as one page: (arrays [B, S, ...], keys valid [B, S] bool)."""
    segs = c.segments()
    n = len(segs[0][1]) if segs else 1
    arrays = [mx.concatenate([page[j] for _, page in segs], axis=1) for j in range(n)]
    valid = c.keys_valid
    if valid is None:
        valid = mx.ones((arrays[0].shape[0], c.offset), dtype=mx.bool_)
    return arrays, valid


def _left_pad(a: mx.array, n: int, value=0) -> mx.array:
    if n == 0:
        return a
    return mx.concatenate([mx.full((a.shape[0], n, *a.shape[2:]), value, dtype=a.dtype), a], axis=1)


def _latent_from(arrays: list[mx.array], valid: mx.array, like: LatentCache) -> LatentCache:
    out = LatentCache(like.kv_bits, like.group_size)
    out.width = like.width
    out.tail, out.tail_used, out.offset = tuple(arrays), arrays[0].shape[1], arrays[0].shape[1]
    out.key_mask = valid
    return out


def merge_caches(caches: list[list]) -> list:
    """Caches of several batches (each a list of layer caches, rows in order) -> one batch.
    A fresh cache (nothing consumed yet) joins as zero state / all-padding latent rows."""
    out = []
    for layer in zip(*caches):
        filled = [c for c in layer if c.state]
        if not filled:  # all fresh: the layers start a batch of their own
            out.append(KDACache() if isinstance(layer[0], KDACache) else LatentCache(layer[0].kv_bits,
                                                                                      layer[0].group_size))
            continue
        like = filled[0]
        if isinstance(like, KDACache):
            merged = KDACache()
            parts = [c.state if c.state else [mx.zeros((1, *a.shape[1:]), dtype=a.dtype) for a in like.state]
                     for c in layer]
            merged.state = [mx.concatenate(p, axis=0) for p in zip(*parts)]
            merged.offset = max(c.offset for c in layer)
            out.append(merged)
            continue
        ref, _ = _latent_rows(like)
        rows = [_latent_rows(c) if c.state else
                ([mx.zeros((1, 0, *a.shape[2:]), dtype=a.dtype) for a in ref], mx.zeros((1, 0), dtype=mx.bool_))
                for c in layer]
        S = max(v.shape[1] for _, v in rows)
        arrays = [mx.concatenate([_left_pad(a[j], S - a[j].shape[1]) for a, _ in rows], axis=0)
                  for j in range(len(ref))]
        valid = mx.concatenate([_left_pad(v, S - v.shape[1], False) for _, v in rows], axis=0)
        out.append(_latent_from(arrays, valid, like))
    return out


def select_rows(cache: list, rows: list[int]) -> list:
    """The batch's rows `rows` (in that order) as a batch of their own; common left padding of
    the latent caches is dropped, and a batch without padding left carries no key mask."""
    idx = mx.array(rows, dtype=mx.int32)
    out = []
    for c in cache:
        if not c.state:  # a remote layer: nothing to select
            out.append(c.copy())
            continue
        if isinstance(c, KDACache):
            new = KDACache()
            new.state, new.offset = [a[idx] for a in c.state], c.offset
            out.append(new)
            continue
        arrays, valid = _latent_rows(c)
        arrays, valid = [a[idx] for a in arrays], valid[idx]
        # padding is only ever at the start of a row: its length is the count of False
        pad = int((valid.shape[1] - valid.sum(axis=1)).min().item())
        arrays, valid = [a[:, pad:] for a in arrays], valid[:, pad:]
        new = _latent_from(arrays, valid, c)
        if bool(valid.all().item()):
            new.key_mask = None
        out.append(new)
    return out


def _own_offsets(row: list) -> list:
    """A single-request cache whose KDA layers report the batch's length: give them the row's own
    token count (its latent length), so the cache describes itself (prompt-cache files check it)."""
    n = next((c.offset for c in row if isinstance(c, LatentCache) and c.state), None)
    if n is not None:
        for c in row:
            if isinstance(c, KDACache):
                c.offset = n
    return row


def extract_row(cache: list, row: int) -> list:
    """One row as a single-request cache (B = 1, no padding): what the request consumed."""
    return _own_offsets(select_rows(cache, [row]))


def split_rows(cache: list) -> list[list]:
    """A batch -> one single-request cache per row, each without its padding (which may sit
    anywhere in a row after a left-padded prefill chunk on top of merged caches): the row's
    valid latent positions are gathered, and a row with no padding carries no key mask."""
    B = next((c.state[0].shape[0] for c in cache if c.state), 1)
    out = [[] for _ in range(B)]
    for c in cache:
        if not c.state:  # a remote layer
            for b in range(B):
                out[b].append(c.copy())
            continue
        if isinstance(c, KDACache):
            for b in range(B):
                new = KDACache()
                new.state, new.offset = [a[b:b + 1] for a in c.state], c.offset
                out[b].append(new)
            continue
        arrays, valid = _latent_rows(c)
        valid_np = np.array(valid)
        for b in range(B):
            keep = np.flatnonzero(valid_np[b])
            rows = [a[b:b + 1] if len(keep) == a.shape[1] else a[b:b + 1, mx.array(keep)] for a in arrays]
            new = _latent_from(rows, mx.ones((1, len(keep)), dtype=mx.bool_), c)
            new.key_mask = None
            out[b].append(new)
    return [_own_offsets(row) for row in out]
