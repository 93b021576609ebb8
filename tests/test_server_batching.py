"""Continuous batching and the state cache, below HTTP (kimi_mlx/server/{batch_cache,engine,state_cache}.py).

Truth: the same model on each request alone (B = 1, kimi_mlx.generate), fp32 weights.
Tolerances (fp32): logits relative error per row 1e-5; token logprobs max |diff| 1e-4 (the
batched step runs the same math in another op order; a row mixed up with another, or a wrong
pad mask, moves logprobs by > 0.1).
"""

from __future__ import annotations

import queue
import time
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from kimi_mlx import load_model, load_tokenizer, stream_generate  # noqa: E402
from kimi_mlx.server.batch_cache import extract_row, merge_caches, select_rows, split_rows  # noqa: E402
from kimi_mlx.server.engine import Engine, QueueFull, Request  # noqa: E402
from kimi_mlx.server.sampling import SamplingParams  # noqa: E402
from kimi_mlx.server.state_cache import StateCache, cache_nbytes  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "kimi_mlx" / "demo" / "model"
TOL_LOGITS = 1e-5
TOL_LOGPROB = 1e-4


def rel_err(out, ref) -> float:
    return (mx.linalg.norm((out - ref).astype(mx.float32)) / mx.linalg.norm(ref.astype(mx.float32))).item()


@pytest.fixture(scope="module")
def demo():
    return load_model(DEMO, dtype=mx.float32), load_tokenizer(DEMO)


def _ids(n, seed):
    return np.random.default_rng(seed).integers(3, 600, size=n).tolist()


def _prefilled(model, ids):
    cache = model.make_cache()
    model(mx.array([ids]), cache=cache)
    return cache


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_merged_rows_decode_like_single_rows(demo, kv_bits):
    """Rows of 5, 40 and 300 tokens merged into one batch (left-padded latents), three decode
    steps, then the middle row leaves: every step's logits equal each row's own."""
    model = demo[0]
    prompts = [_ids(5, 1), _ids(40, 2), _ids(300, 3)]
    singles = []
    for p in prompts:
        c = model.make_cache(kv_bits)
        model(mx.array([p]), cache=c)
        singles.append(c)
    batch = merge_caches([[x.copy() for x in c] for c in singles])
    rows = [0, 1, 2]
    for step in range(4):
        if step == 3:  # row 1 leaves
            batch, rows = select_rows(batch, [0, 2]), [0, 2]
        tok = 7 + step
        out = model(mx.array([[tok]] * len(rows)), cache=batch)
        for b, r in enumerate(rows):
            ref = model(mx.array([[tok]]), cache=singles[r])
            assert rel_err(out[b:b + 1], ref) <= TOL_LOGITS, f"step {step} row {r}"
    # a row taken out of the batch continues on its own like the single cache
    alone = extract_row(batch, 0)
    assert {c.offset for c in alone} == {5 + 4}  # its own length in every layer, not the batch's
    assert rel_err(model(mx.array([[3]]), cache=alone), model(mx.array([[3]]), cache=singles[0])) <= TOL_LOGITS


def _collect(q):
    toks, lps = [], []
    while True:
        ev = q.get(timeout=60)
        assert ev.error is None, ev.error
        toks.append(ev.token)
        lps.append(ev.logprob)
        if ev.finish_reason:
            return toks, lps, ev


def test_engine_batched_requests_equal_single_requests(demo):
    """Six requests of different lengths submitted at once decode together (fewer decode steps
    than tokens) and each gets the tokens and logprobs it gets alone."""
    model, tok = demo
    prompts = [_ids(n, 10 + n) for n in (3, 17, 64, 9, 130, 33)]
    eng = Engine(model, tok, max_batch=8, prefill_step=48)
    outs = [queue.Queue() for _ in prompts]
    for p, q in zip(prompts, outs):
        eng.submit(Request(ids=p, max_tokens=12, top_logprobs=0, ignore_eos=True, deliver=q.put))
    eng.start()
    try:
        results = [_collect(q) for q in outs]
    finally:
        eng.stop()
    for p, (toks, lps, last) in zip(prompts, results):
        ref = [r for r in stream_generate(model, tok, p, 12) if r.token is not None]
        n = min(len(ref), len(toks))
        assert toks[:n] == [r.token for r in ref][:n]
        assert max(abs(a - r.logprob) for a, r in zip(lps[:n], ref)) <= TOL_LOGPROB
        assert len(toks) == 12 and last.finish_reason == "length"
    assert eng.stats["decode_steps"] < 6 * 11  # rows shared steps


def test_engine_queue_bound(demo):
    model, tok = demo
    eng = Engine(model, tok, max_batch=2, max_queue=1)  # not started: nothing leaves the queue
    for _ in range(3):
        eng.submit(Request(ids=[5, 6], max_tokens=2))
    with pytest.raises(QueueFull):
        eng.submit(Request(ids=[5, 6], max_tokens=2))


def test_seeded_sampling_does_not_depend_on_the_batch(demo):
    """A seeded request draws the same tokens alone and beside others."""
    model, tok = demo
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42)

    def run(n_others):
        eng = Engine(model, tok, max_batch=8)
        q = queue.Queue()
        eng.submit(Request(ids=_ids(20, 1), max_tokens=10, sampling=params, ignore_eos=True, deliver=q.put))
        for i in range(n_others):
            eng.submit(Request(ids=_ids(9 + i, 2 + i), max_tokens=10,
                               sampling=SamplingParams(temperature=1.0)))
        eng.start()
        try:
            return _collect(q)[0]
        finally:
            eng.stop()

    assert run(0) == run(3)


# ------------------------------------------------------------------ state cache


def test_state_cache_longest_prefix_lru_and_spill(demo, tmp_path):
    model = demo[0]
    a = _ids(50, 1)
    c30, c50 = _prefilled(model, a[:30]), _prefilled(model, a)
    size = cache_nbytes(c30)
    sc = StateCache(max_bytes=int(2.5 * size), spill_dir=tmp_path, spill_bytes=100 * size, model=model)
    sc.insert(a[:30], c30)
    sc.insert(a, c50)
    n, snap = sc.lookup(a + [9, 9])
    assert n == 50
    assert rel_err(model(mx.array([[4]]), cache=snap), model(mx.array([[4]]), cache=[x.copy() for x in c50])) == 0
    assert sc.lookup(a[:40] + [1])[0] == 30  # longest snapshot that is a prefix
    assert sc.lookup(a[:30])[0] == 0  # a proper prefix only: one token must be left to prefill
    assert sc.lookup([1, 2, 3])[0] == 0
    # a third snapshot overflows 2.5 x: the least recently used (a[:30]) is spilled to disk
    b = _ids(40, 2)
    sc.insert(b, _prefilled(model, b))
    assert sc.nbytes <= sc.max_bytes and sc.spilled_nbytes > 0 and len(list(tmp_path.iterdir())) == 1
    n, snap = sc.lookup(a[:30] + [5])  # read back from disk, identical state
    assert n == 30
    ref = [x.copy() for x in c30]
    assert rel_err(model(mx.array([[4]]), cache=snap), model(mx.array([[4]]), cache=ref)) == 0
    # a row that went through a batch spills and comes back too (its layers agree on its length)
    d = _ids(12, 9)
    row = split_rows(merge_caches([[x.copy() for x in c30], _prefilled(model, d)]))[1]
    sc.insert(d, row)
    budget, sc.max_bytes = sc.max_bytes, 0
    sc._evict()  # all to disk
    sc.max_bytes = budget
    n, snap = sc.lookup(d + [8])
    assert n == 12
    assert rel_err(model(mx.array([[4]]), cache=snap), model(mx.array([[4]]), cache=_prefilled(model, d))) <= TOL_LOGITS
    # a server started later on the same folder finds what was spilled there
    sc.insert(a[:30], c30)
    sc.max_bytes = 0
    sc._evict()  # everything to disk
    assert len(list(tmp_path.iterdir())) >= 2
    later = StateCache(max_bytes=10 * size, spill_dir=tmp_path, spill_bytes=100 * size, model=model)
    n, snap = later.lookup(a + [7])
    assert n == 50
    assert rel_err(model(mx.array([[4]]), cache=snap), model(mx.array([[4]]), cache=[x.copy() for x in c50])) == 0
    later.clear()
    assert later.nbytes == 0 and not list(tmp_path.iterdir())


def test_engine_snapshots_at_boundaries_and_reuses_them(demo):
    """A prompt prefilled with a boundary at 40 leaves a snapshot there; a second prompt sharing
    those 40 tokens prefills only the rest and gets the same tokens as a cold run."""
    model, tok = demo
    shared, tail1, tail2 = _ids(40, 5), _ids(10, 6), _ids(7, 7)
    eng = Engine(model, tok, state_cache=StateCache(64 << 20), prefill_step=16)
    eng.start()
    try:
        q1, q2 = queue.Queue(), queue.Queue()
        eng.submit(Request(ids=shared + tail1, max_tokens=5, snapshot_at=[40], deliver=q1.put))
        _collect(q1)
        eng.submit(Request(ids=shared + tail2, max_tokens=5, ignore_eos=True, deliver=q2.put))
        toks, _, last = _collect(q2)
    finally:
        eng.stop()
    assert last.usage["cached_tokens"] == 40
    ref = [r.token for r in stream_generate(model, tok, shared + tail2, 5) if r.token is not None]
    assert toks[:len(ref)] == ref


def test_radix_trie_finds_the_longest_snapshot_prefix():
    """Random conversations sharing prefixes, with snapshots here and there, some evicted:
    lookup equals a brute-force search over the snapshots kept; evicting all leaves no nodes."""
    from kimi_mlx.cache import KDACache

    def fake_cache():
        c = KDACache()
        c.state = [mx.zeros((1, 4)), mx.zeros((1, 4)), mx.zeros((1, 4)), mx.zeros((1, 8))]
        return [c]

    size = cache_nbytes(fake_cache())
    rng = np.random.default_rng(0)
    sc = StateCache(max_bytes=12 * size)
    kept = []  # in insertion (LRU) order
    base = [rng.integers(0, 5, size=rng.integers(1, 12)).tolist() for _ in range(4)]
    for step in range(60):
        seq = base[rng.integers(0, 4)] + rng.integers(0, 5, size=rng.integers(0, 10)).tolist()
        if not seq:
            continue
        sc.insert(seq, fake_cache())
        kept = [k for k in kept if k != seq] + [seq]
        kept = kept[-12:]  # what a 12-snapshot LRU keeps (no lookups in between)
        assert len(sc) == len(kept)
    for _ in range(200):
        q = base[rng.integers(0, 4)] + rng.integers(0, 5, size=rng.integers(0, 12)).tolist()
        best = max((len(k) for k in kept if len(k) < len(q) and q[:len(k)] == k), default=0)
        n, _ = sc.lookup(q)
        assert n == best
    sc.max_bytes = 0
    sc._evict()
    assert len(sc) == 0 and not sc.root.children


def test_short_prompt_is_not_held_back_by_a_long_one(demo):
    """Prefill steps go round robin: a short request submitted after a long one (many steps)
    gets its first token before the long one's prefill is done."""
    model, tok = demo
    order = []
    eng = Engine(model, tok, prefill_step=16)
    eng.submit(Request(ids=_ids(160, 1), max_tokens=1, deliver=lambda ev: order.append("long")))
    eng.submit(Request(ids=_ids(5, 2), max_tokens=1, deliver=lambda ev: order.append("short")))
    eng.start()
    try:
        for _ in range(600):
            if len(order) == 2:
                break
            time.sleep(0.05)
    finally:
        eng.stop()
    assert order == ["short", "long"]


def test_batched_prefill_over_cached_prefixes_equals_single_requests(demo):
    """Three requests prefill together on top of state-cache snapshots of 23 and 71 tokens and a
    fresh cache (carried caches of different lengths, left-padded chunks: the KDA padding rule
    at work); each gets the tokens and logprobs it gets alone."""
    model, tok = demo
    a, b = _ids(23, 31), _ids(71, 32)
    prompts = [a + _ids(9, 33), b + _ids(2, 34), _ids(40, 35)]
    eng = Engine(model, tok, state_cache=StateCache(64 << 20), prefill_step=32)
    for prefix in (a, b):  # leave snapshots at the prefixes
        q = queue.Queue()
        eng.submit(Request(ids=prefix + [5], max_tokens=1, snapshot_at=[len(prefix)], deliver=q.put))
        eng.start()
        _collect(q)
        eng.stop()
        eng.stopping = False
    outs = [queue.Queue() for _ in prompts]
    steps_before = eng.stats["prefill_steps"]
    for p, q in zip(prompts, outs):
        eng.submit(Request(ids=p, max_tokens=6, top_logprobs=0, ignore_eos=True, deliver=q.put))
    eng.start()
    try:
        results = [_collect(q) for q in outs]
    finally:
        eng.stop()
    assert [r[2].usage["cached_tokens"] for r in results] == [23, 71, 0]
    assert eng.stats["prefill_steps"] - steps_before == 2  # together: 32 + 8 tokens of the longest chunk
    for p, (toks, lps, _) in zip(prompts, results):
        ref = [r for r in stream_generate(model, tok, p, 6) if r.token is not None]
        n = min(len(ref), len(toks))
        assert toks[:n] == [r.token for r in ref][:n]
        assert max(abs(x - r.logprob) for x, r in zip(lps[:n], ref)) <= TOL_LOGPROB


def test_failing_snapshot_never_fails_a_request(demo, monkeypatch):
    model, tok = demo
    eng = Engine(model, tok, state_cache=StateCache(64 << 20))

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(eng.state_cache, "insert", broken)
    q = queue.Queue()
    eng.submit(Request(ids=_ids(30, 3), max_tokens=4, snapshot_at=[10, 30], ignore_eos=True, deliver=q.put))
    eng.start()
    try:
        toks, _, last = _collect(q)
    finally:
        eng.stop()
    assert len(toks) == 4 and last.finish_reason == "length"
