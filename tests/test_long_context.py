"""Long context on a tiny model: paged latent cache, attention over key blocks, quantized latents.

The truth is one forward over the whole prompt with one page and one key block (the plain
softmax). Pages and blocks are made small here so a few hundred tokens cross many of them.
"""

import mlx.core as mx
import numpy as np
import pytest
from tiny import TINY_CONFIG, random_weights, write_checkpoint

from kimi_mlx import KimiError, load_model, mla_layer
from kimi_mlx.cache import LatentCache

# ||out - ref|| / ||ref|| for float32 logits: the paged / blocked paths only reorder sums.
TOL_FP32 = 1e-5
# A quantized cache against the same model reading the same rounded latents unquantized.
TOL_KV_PLUMBING = 1e-5
# Quality cost on this random model's logits (measured 0.038 at 8 bits, 0.066-0.145 at 4).
TOL_KV_QUALITY = {8: 0.06, 4: 0.2}


def rel_err(out, ref) -> float:
    return (mx.linalg.norm((out - ref).astype(mx.float32)) / mx.linalg.norm(ref.astype(mx.float32))).item()


@pytest.fixture(scope="module", params=[16, 64], ids=["rank16", "rank64"])
def model(request, tmp_path_factory):
    """rank 16: latent 20 wide (padded to a group, dequantized to read); rank 64: values read as
    whole quantized groups through quantized matmuls."""
    config = {**TINY_CONFIG, "kv_lora_rank": request.param}
    return load_model(write_checkpoint(tmp_path_factory.mktemp("long"), config=config,
                                       weights=random_weights(config)))


def _tokens(n, seed=0):
    return mx.array(np.random.default_rng(seed).integers(3, 96, size=(1, n)).astype(np.int32))


def _stepped(model, ids, step, kv_bits=None, cache=None):
    cache = cache if cache is not None else model.make_cache(kv_bits)
    outs = [model(ids[:, a:a + step], cache=cache) for a in range(0, ids.shape[1], step)]
    return mx.concatenate(outs, axis=1), cache


@pytest.fixture
def small_pages(monkeypatch):
    """Pages of 64 rows (first allocation 16) and key blocks of 32: the paths a 1M context takes."""
    monkeypatch.setattr(LatentCache, "step", 16)
    monkeypatch.setattr(LatentCache, "page_size", 64)
    monkeypatch.setattr(mla_layer, "SCORE_BLOCK_BYTES", 1)
    monkeypatch.setattr(mla_layer, "MIN_KEY_BLOCK", 32)
    monkeypatch.setattr(mla_layer, "SYNC_SCORE_BYTES", 1)  # evaluate after every block


@pytest.mark.parametrize("step", [1, 13, 100, 300])  # absorbed (<= 128 queries) and expanded forms
def test_paged_blocked_stepped_prefill_equals_one_shot(model, step, small_pages, monkeypatch):
    ids = _tokens(300)
    with monkeypatch.context() as plain:  # the truth: one page, one key block
        plain.setattr(LatentCache, "page_size", 1 << 20)
        plain.setattr(mla_layer, "SCORE_BLOCK_BYTES", 1 << 40)
        ref = model(ids)
    out, cache = _stepped(model, ids, step)
    assert rel_err(out, ref) <= TOL_FP32
    latent = next(c for c in cache if isinstance(c, LatentCache))
    assert len(latent.pages) == 300 // 64 and latent.offset == 300  # sealed pages, never re-copied


def test_padded_batch_with_pages_equals_single_runs(model, small_pages):
    a, b = _tokens(150, seed=1), _tokens(97, seed=2)
    pad = mx.zeros((1, 150 - 97), dtype=mx.int32)
    batch = mx.concatenate([a, mx.concatenate([pad, b], axis=1)], axis=0)
    mask = mx.concatenate([mx.ones((1, 150)), mx.concatenate([mx.zeros((1, 53)), mx.ones((1, 97))], axis=1)])
    cache = model.make_cache()
    out = mx.concatenate([model(batch[:, s:s + 40], cache=cache, mask=mask[:, s:s + 40]) for s in range(0, 150, 40)], 1)
    assert rel_err(out[0], model(a)[0]) <= TOL_FP32
    assert rel_err(out[1, 53:], model(b)[0]) <= TOL_FP32


@pytest.mark.parametrize("step", [1, 13])
def test_one_softmax_over_several_pages_equals_one_shot(model, step, small_pages, monkeypatch):
    """Scores of all pages fit one block: one softmax over the pages side by side (the decode
    form past a page), not the online softmax; padded batch rows too."""
    monkeypatch.setattr(mla_layer, "SCORE_BLOCK_BYTES", 1 << 40)
    ids = _tokens(150)
    ref = model(ids)
    out, cache = _stepped(model, ids, step)
    assert rel_err(out, ref) <= TOL_FP32
    assert len(next(c for c in cache if isinstance(c, LatentCache)).pages) == 150 // 64
    a, b = _tokens(150, seed=1), _tokens(97, seed=2)
    batch = mx.concatenate([a, mx.concatenate([mx.zeros((1, 53), dtype=mx.int32), b], axis=1)], axis=0)
    mask = mx.concatenate([mx.ones((1, 150)), mx.concatenate([mx.zeros((1, 53)), mx.ones((1, 97))], axis=1)])
    cache = model.make_cache()
    model(batch[:, :140], cache=cache, mask=mask[:, :140])
    tail = mx.concatenate([model(batch[:, s:s + 1], cache=cache, mask=mask[:, s:s + 1]) for s in range(140, 150)], 1)
    assert rel_err(tail[0], model(a)[0, 140:]) <= TOL_FP32
    assert rel_err(tail[1], model(b)[0, 87:]) <= TOL_FP32


class _RoundedLatents(LatentCache):
    """An unquantized cache that stores latents already rounded through kv_bits quantization:
    the same numbers a quantized cache holds, read with plain matmuls."""

    def __init__(self, kv_bits):
        super().__init__()
        self.round_bits = kv_bits

    def update(self, latent, key_mask=None):
        W = latent.shape[-1]
        q = LatentCache(self.round_bits)
        rounded = mx.dequantize(*mx.quantize(q._pad(latent), group_size=q.group_size, bits=self.round_bits),
                                group_size=q.group_size, bits=self.round_bits)[..., :W]
        super().update(rounded, key_mask)


@pytest.mark.parametrize("kv_bits", [8, 4])
@pytest.mark.parametrize("step", [7, 200])
def test_quantized_latent_cache(model, kv_bits, step, small_pages):
    ids = _tokens(300)
    out, cache = _stepped(model, ids, step, kv_bits)
    rounded = [_RoundedLatents(kv_bits) if isinstance(c, LatentCache) else c for c in model.make_cache()]
    same_numbers, _ = _stepped(model, ids, step, cache=rounded)
    assert rel_err(out, same_numbers) <= TOL_KV_PLUMBING  # quantized pages are read correctly
    assert rel_err(out, model(ids)) <= TOL_KV_QUALITY[kv_bits]  # and cost what we state
    latent = next(c for c in cache if isinstance(c, LatentCache))
    rows = sum(p[0].shape[1] for p in latent.pages) + latent.tail[0].shape[1]
    padded = -(-latent.width // 64) * 64  # whole groups of 64
    per_row = padded * kv_bits // 8 + 2 * (padded // 64) * 4  # packed + fp32 scale and bias per group
    assert latent.nbytes == rows * per_row


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_paged_cache_round_trips_and_snapshots(model, kv_bits, small_pages, tmp_path):
    ids = _tokens(150)
    _, cache = _stepped(model, ids, 50, kv_bits)
    snapshot = [c.copy() for c in cache]
    arrays, meta = {}, {}
    for i, c in enumerate(cache):
        arrays.update({f"{i}.{j}": a for j, a in enumerate(c.state)})
        meta[str(i)] = ",".join(c.meta_state)
    mx.save_safetensors(str(tmp_path / "c.safetensors"), arrays, metadata=meta)
    loaded, meta2 = mx.load(str(tmp_path / "c.safetensors"), return_metadata=True)
    restored = model.make_cache()  # made at 16 bits: the file says what it holds
    for i, c in enumerate(restored):
        c.state = [loaded[f"{i}.{j}"] for j in range(len(cache[i].state))]
        c.meta_state = meta2[str(i)].split(",")
    nxt = _tokens(70, seed=3)
    want = model(nxt, cache=cache)  # writes into the live cache: the snapshot must not see it
    assert mx.array_equal(model(nxt, cache=restored), want)
    assert mx.array_equal(model(nxt, cache=snapshot), want)


def test_bad_kv_bits_is_one_clear_error(model):
    with pytest.raises(KimiError, match="16, 8 or 4"):
        model.make_cache(kv_bits=3)


def test_decode_never_syncs_the_host_between_key_blocks(model, small_pages, monkeypatch):
    """A prefill step evaluates the running softmax between key blocks (memory of one block); a
    decode step over many pages must not: a host sync per page, layer and token stalls a GPU."""
    ids = _tokens(200)
    cache = model.make_cache()
    syncs = []
    real_eval = mx.eval
    monkeypatch.setattr(mla_layer.mx, "eval", lambda *a: (syncs.append(len(a)), real_eval(*a))[1])
    model(ids[:, :150], cache=cache)
    assert syncs, "the prefill step no longer bounds its memory block by block"
    syncs.clear()
    mx.async_eval(model(ids[:, 150:151], cache=cache))  # 150 keys in 64-row pages, 32-key blocks
    assert syncs == []
