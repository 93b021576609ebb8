"""Caches: snapshots restore exactly, state round-trips through safetensors, latents grow in blocks."""

import mlx.core as mx
import numpy as np
import pytest
from tiny import random_weights, write_checkpoint

from kimi_mlx import load_model
from kimi_mlx.cache import KDACache, LatentCache


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(write_checkpoint(tmp_path_factory.mktemp("tiny"), weights=random_weights()))


def _tokens(n, seed=0):
    return mx.array(np.random.default_rng(seed).integers(3, 96, size=(1, n)).astype(np.int32))


def test_stepwise_prefill_equals_one_shot(model):
    ids = _tokens(40)
    full = model(ids)
    cache = model.make_cache()
    parts = [model(ids[:, a:b], cache=cache) for a, b in ((0, 17), (17, 18), (18, 40))]
    assert mx.allclose(mx.concatenate(parts, axis=1), full, atol=1e-4).item()


def test_snapshot_restores_exactly(model):
    cache = model.make_cache()
    model(_tokens(12), cache=cache)
    snapshot = [c.copy() for c in cache]
    turn = _tokens(6, seed=1)
    first = model(turn, cache=cache)
    model(_tokens(5, seed=2), cache=cache)  # the turn we undo
    again = model(turn, cache=snapshot)
    assert mx.array_equal(first, again)


def test_state_round_trips_through_safetensors(model, tmp_path):
    cache = model.make_cache()
    model(_tokens(20), cache=cache)
    arrays, meta = {}, {}
    for i, c in enumerate(cache):
        for j, a in enumerate(c.state):
            arrays[f"{i}.{j}"] = a
        meta[str(i)] = ",".join(c.meta_state)
    mx.save_safetensors(str(tmp_path / "cache.safetensors"), arrays, metadata=meta)
    loaded, meta2 = mx.load(str(tmp_path / "cache.safetensors"), return_metadata=True)
    restored = model.make_cache()
    for i, c in enumerate(restored):
        c.state = [loaded[f"{i}.{j}"] for j in range(len(cache[i].state))]
        c.meta_state = meta2[str(i)].split(",")
    nxt = _tokens(3, seed=3)
    assert mx.array_equal(model(nxt, cache=cache), model(nxt, cache=restored))


def test_latent_cache_grows_in_blocks_and_keeps_content():
    c = LatentCache()
    a = mx.random.normal((1, 5, 12))
    b = mx.random.normal((1, LatentCache.step, 12))
    c.update_and_fetch(a)
    assert c.latent.shape[1] == LatentCache.step  # one block allocated, not 5 rows
    out, _ = c.update_and_fetch(b)
    assert c.latent.shape[1] == 2 * LatentCache.step and c.offset == 5 + LatentCache.step
    assert mx.array_equal(out, mx.concatenate([a, b], axis=1))


def test_kda_cache_state_is_fp32_and_tracks_offset(model):
    cache = model.make_cache()
    model(_tokens(7), cache=cache)
    kda = [c for c in cache if isinstance(c, KDACache)]
    assert kda and all(c.recurrent.dtype == mx.float32 and c.offset == 7 for c in kda)
    assert all(c.conv[0].shape[1] == 3 for c in kda)  # K - 1 window rows
