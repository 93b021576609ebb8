"""Left-padded batches with a carried cache equal single-request runs (the server's batching).

Contract: model(ids [B, T], cache, mask [B, T]) with mask 0 on LEFT padding leaves each row's
state as if the padding were absent, also when the cache was carried from earlier calls: a
padded KDA position neither decays nor writes the recurrent state and does not enter the conv
window; an MLA padded key is never attended. Truth: the same model on each row alone (B = 1,
no padding), fp32, every KDA path (the naive recurrence among them).
Tolerance (fp32, relative ||out - ref|| / ||ref|| per row): 1e-5, op-order noise only; the
bug this guards against (padding decaying the carried state) moves rows by > 1e-2.
"""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from kimi_mlx import load_model  # noqa: E402
from kimi_mlx.kda import set_kda_path  # noqa: E402
from tiny import TINY_CONFIG, random_weights, write_checkpoint  # noqa: E402

TOL_FP32 = 1e-5


def rel_err(out, ref) -> float:
    return (mx.linalg.norm((out - ref).astype(mx.float32)) / mx.linalg.norm(ref.astype(mx.float32))).item()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(write_checkpoint(tmp_path_factory.mktemp("pad"), weights=random_weights(TINY_CONFIG, seed=3)))


@pytest.fixture(params=["naive", "chunked", "mx_fast"])
def kda_path(request):
    set_kda_path(request.param)
    yield request.param
    set_kda_path(None)


def _ids(n, seed):
    return np.random.default_rng(seed).integers(3, 96, size=n).tolist()


def _padded_call(model, rows, cache):
    """One model call on rows of different lengths, left-padded with the pad id 0."""
    T = max(len(r) for r in rows)
    ids = mx.array([[0] * (T - len(r)) + r for r in rows], dtype=mx.int32)
    mask = mx.array([[0] * (T - len(r)) + [1] * len(r) for r in rows], dtype=mx.int32)
    return model(ids, cache=cache, mask=mask), T


def test_padded_batch_with_carried_cache_equals_single_rows(model, kda_path):
    """Three calls with padding in each (the second pads a row to fewer than K-1 = 3 new tokens,
    so its conv window must keep tokens of the first call), then greedy-free decode steps."""
    chunks = [[_ids(7, 1), _ids(40, 2)], [_ids(2, 3), _ids(9, 4)], [_ids(35, 5), _ids(1, 6)]]
    decode = [_ids(4, 7), _ids(4, 8)]
    cache = model.make_cache()
    outs = [[], []]
    for chunk in chunks:
        logits, T = _padded_call(model, chunk, cache)
        for b in range(2):
            outs[b].append(logits[b:b + 1, T - len(chunk[b]):])
    for step in range(4):
        logits = model(mx.array([[decode[0][step]], [decode[1][step]]], dtype=mx.int32), cache=cache)
        for b in range(2):
            outs[b].append(logits[b:b + 1])
    for b in range(2):
        single = model.make_cache()
        ref = [model(mx.array([c[b]], dtype=mx.int32), cache=single) for c in chunks]
        ref += [model(mx.array([[t]], dtype=mx.int32), cache=single) for t in decode[b]]
        out, ref = mx.concatenate(outs[b], axis=1), mx.concatenate(ref, axis=1)
        assert out.shape == ref.shape
        assert rel_err(out, ref) <= TOL_FP32, f"row {b} ({kda_path})"


def test_padding_only_row_leaves_its_state_alone(model):
    """A row that is all padding in one call (a batch member with nothing new) keeps its state."""
    a, b = _ids(12, 9), _ids(20, 10)
    cache = model.make_cache()
    _padded_call(model, [a, b], cache)
    ids = mx.array([[0] * 5, _ids(5, 11)], dtype=mx.int32)
    model(ids, cache=cache, mask=mx.array([[0] * 5, [1] * 5], dtype=mx.int32))
    nxt = model(mx.array([[7], [7]], dtype=mx.int32), cache=cache)[0:1]
    single = model.make_cache()
    model(mx.array([a], dtype=mx.int32), cache=single)
    ref = model(mx.array([[7]], dtype=mx.int32), cache=single)
    assert rel_err(nxt, ref) <= TOL_FP32
