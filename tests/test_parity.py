"""Our MLX model (`kimi_mlx.load_model`) against the transformers reference on the
tiny checkpoints of conftest.py (original Moonshot layout, randomised so bugs show).

Contract under test:
    model = load_model(folder, dtype=None)          # dtype (e.g. mx.bfloat16) casts weights
    logits = model(ids [B, T] int32, cache=None, mask=None)      -> [B, T, V]
    mask: [B, T], 1 = real token, 0 = LEFT padding
    cache = model.make_cache()                      # list, one entry per layer
    model(ids, cache=cache, last_only=True)         -> [B, 1, V]

Tolerances, one table per dtype (logits of the compared positions):
    float32   max |ours - reference| <= 1e-3. Logits here are O(10), so this is ~1e-4
              relative: loose enough for op-order noise over 600 tokens, far below any
              real bug (the planted bugs below move logits by > 0.1).
    bfloat16  bf16 rounding flips some expert choices, which moves single positions by
              several logits, so no max-abs bound is promised. Promised: finite logits,
              top-1 agreement with the float32 reference >= 85%, relative RMS error
              <= 0.2. (transformers itself in bf16 reaches ~94% and ~0.08 here.)
Token ids come from `pick_untied_tokens`, so no expert choice is within 1e-3 of a
tie: float32 noise cannot flip routing and a mismatch is a real difference.
"""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

TOL = {
    "float32": {"max_abs": 1e-3},
    "bfloat16": {"top1": 0.85, "rel_rms": 0.2},
}
N_DECODE = 5


@pytest.fixture(scope="module")
def ours():
    """Factory (folder, dtype) -> our loaded model, memoised for the module."""
    from kimi_mlx import load_model

    loaded = {}

    def get(folder, dtype=None):
        key = (str(folder), dtype)
        if key not in loaded:
            loaded[key] = load_model(folder, dtype=dtype)
        return loaded[key]

    return get


def run(model, ids, mask=None, cache=None, **kwargs) -> np.ndarray:
    """Call our model on nested-list ids [B][T]; logits as float32 numpy."""
    x = mx.array(np.asarray(ids, dtype=np.int32))
    m = None if mask is None else mx.array(np.asarray(mask, dtype=np.int32))
    out = model(x, cache=cache, mask=m, **kwargs)
    return np.array(out.astype(mx.float32))


def assert_close(got: np.ndarray, want: np.ndarray, what: str, tol: float = TOL["float32"]["max_abs"]):
    """Max-abs check that names the worst position when it fails."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite logits"
    err = np.abs(got - want)
    worst = np.unravel_index(int(err.argmax()), err.shape)
    assert err.max() <= tol, f"{what}: max |err| {err.max():.3g} > {tol} at {tuple(int(i) for i in worst)}"


def decode_ours(model, prompt, decode_ids, prefill_chunks=None) -> np.ndarray:
    """Our prefill (in chunks) then single-token steps through one cache:
    logits [B, len(decode) + 1, V], laid out like ReferenceCase.decode."""
    prompt = np.asarray(prompt)
    cache = model.make_cache()
    start, rows = 0, []
    for size in prefill_chunks or [prompt.shape[1]]:
        out = run(model, prompt[:, start:start + size], cache=cache)
        start += size
    rows.append(out[:, -1])
    for i in range(len(decode_ids[0])):
        rows.append(run(model, [[row[i]] for row in decode_ids], cache=cache)[:, -1])
    return np.stack(rows, axis=1)


# ---------------------------------------------------------------------- full forward

FORWARD_CASES = [
    *[pytest.param("ref32", 1, t, id=f"D32-B1-T{t}") for t in (1, 5, 64, 65, 200)],
    pytest.param("ref32", 1, 600, id="D32-B1-T600", marks=pytest.mark.slow),
    pytest.param("ref32", 2, 65, id="D32-B2-T65"),
    *[pytest.param("ref128", 1, t, id=f"D128-B1-T{t}") for t in (5, 65)],
    pytest.param("ref128", 1, 200, id="D128-B1-T200", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("case,batch,n_tokens", FORWARD_CASES)
def test_forward_matches_reference(request, ours, case, batch, n_tokens):
    ref = request.getfixturevalue(case)
    ids = ref.tokens(n_tokens, batch=batch)
    assert_close(run(ours(ref.folder), ids), ref.logits(ids), f"{case} forward B{batch} T{n_tokens}")


# ------------------------------------------------------------- cache: prefill + decode

DECODE_CASES = [
    pytest.param("ref32", None, id="D32-prefill100"),
    pytest.param("ref32", [50, 50], id="D32-chunks50+50"),
    pytest.param("ref32", [1, 64, 35], id="D32-chunks1+64+35"),
    pytest.param("ref128", [50, 50], id="D128-chunks50+50"),
]


@pytest.mark.parametrize("case,chunks", DECODE_CASES)
def test_prefill_then_decode(request, ours, case, chunks):
    """Prefill (whole or chunked) then 5 single-token steps, teacher-forced, B=2."""
    ref = request.getfixturevalue(case)
    ids = ref.tokens(100 + N_DECODE, batch=2, seed=3)
    prompt, fed = [r[:100] for r in ids], [r[100:] for r in ids]
    model = ours(ref.folder)
    cache = model.make_cache()
    assert isinstance(cache, list) and len(cache) == ref.config["num_hidden_layers"]
    got = decode_ours(model, prompt, fed, chunks)
    assert_close(got, ref.decode(prompt, fed, prefill_chunks=chunks), f"{case} decode chunks={chunks}")


def test_last_only(ref32, ours):
    """last_only=True gives the last row of the full logits, shape [B, 1, V]."""
    ids = ref32.tokens(65, batch=2)
    model = ours(ref32.folder)
    full = run(model, ids)
    last = run(model, ids, cache=model.make_cache(), last_only=True)
    assert last.shape == (2, 1, ref32.config["vocab_size"])
    assert_close(last, full[:, -1:], "last_only vs full forward")


# ------------------------------------------------------------------- left padding


def test_left_padded_batch(ref32, ours):
    """A left-padded batch of two lengths equals two single runs: ours batched vs
    ours single, and vs the reference on each sequence. Only real positions count."""
    a, b = ref32.tokens(40, seed=4)[0], ref32.tokens(70, seed=5)[0]
    pad = ref32.config["pad_token_id"]
    n_pad = len(b) - len(a)
    batch = [[pad] * n_pad + a, b]
    mask = [[0] * n_pad + [1] * len(a), [1] * len(b)]
    model = ours(ref32.folder)
    both = run(model, batch, mask=mask)
    single_a, single_b = run(model, [a]), run(model, [b])
    assert_close(both[:1, n_pad:], single_a, "padded row vs our single run")
    assert_close(both[1:], single_b, "unpadded row vs our single run")
    assert_close(both[:1, n_pad:], ref32.logits([a]), "padded row vs reference")
    assert_close(both[1:], ref32.logits([b]), "unpadded row vs reference")


def test_left_padded_batch_decodes_through_the_cache(ref32, ours):
    """The cache remembers the prefill mask: decode steps (mask=None) of a left-padded batch
    equal each sequence's own prefill + decode, and the reference's full forward."""
    a, b = ref32.tokens(30, seed=6)[0], ref32.tokens(45, seed=7)[0]
    nxt = ref32.tokens(4, seed=8)[0]
    n_pad = len(b) - len(a)
    model = ours(ref32.folder)
    cache = model.make_cache()
    run(model, [[ref32.config["pad_token_id"]] * n_pad + a, b], mask=[[0] * n_pad + [1] * len(a), [1] * len(b)],
        cache=cache)
    steps = np.concatenate([run(model, [[t], [t]], cache=cache) for t in nxt], axis=1)  # [2, 4, V]
    assert_close(steps[:1], ref32.logits([a + nxt])[:, -len(nxt):], "padded row decode vs reference")
    assert_close(steps[1:], ref32.logits([b + nxt])[:, -len(nxt):], "unpadded row decode vs reference")


# -------------------------------------------------------------- checkpoint variants


def test_sharded_checkpoint_loads_the_same(ref32, ref32_sharded, ours):
    """3 shards + index.json give bit-identical logits to the single file."""
    ids = ref32.tokens(65)
    assert np.array_equal(run(ours(ref32_sharded.folder), ids), run(ours(ref32.folder), ids))


def test_bf16_stored_checkpoint(ref32_bf16, ours):
    """A checkpoint stored in bfloat16 (as released), cast to float32 on load, matches
    the float32 reference on the same bf16-rounded weights at float32 tolerance."""
    ids = ref32_bf16.tokens(65)
    assert_close(run(ours(ref32_bf16.folder, dtype=mx.float32), ids), ref32_bf16.logits(ids),
                 "bf16-stored checkpoint, float32 compute")


@pytest.mark.parametrize("case", ["ref32", pytest.param("ref128", marks=pytest.mark.slow)])
def test_bf16_smoke(request, ours, case):
    """Weights cast to bfloat16: finite, mostly the same top-1 as the fp32 reference."""
    ref = request.getfixturevalue(case)
    ids = ref.tokens(200, batch=2)
    got = run(ours(ref.folder, dtype=mx.bfloat16), ids)
    want = ref.logits(ids)
    tol = TOL["bfloat16"]
    assert np.all(np.isfinite(got))
    top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
    rel_rms = float(np.sqrt(((got - want) ** 2).mean() / (want ** 2).mean()))
    assert top1 >= tol["top1"], f"bf16 top-1 agreement {top1:.3f} < {tol['top1']}"
    assert rel_rms <= tol["rel_rms"], f"bf16 relative RMS error {rel_rms:.3f} > {tol['rel_rms']}"


# ------------------------------------------------------------------- planted bugs

PLANTED = ["router_bias_zero", "w1_w3_swap", "per_head_decay", "kv_norm_ones"]


@pytest.mark.parametrize("bug", PLANTED)
def test_planted_bug_is_caught(ref32, bug_variant, ours, bug):
    """With a known bug planted in the checkpoint files, our model's logits miss the
    reference on the original by more than the tolerance: the parity tests above
    would catch that bug in our code. Our model still matches the reference on the
    variant, so the miss is the bug's doing (and our loader reads those tensors)."""
    variant = bug_variant(bug)
    ids = variant.tokens(65, seed=8)
    got = run(ours(variant.folder), ids)
    err = np.abs(got - ref32.logits(ids)).max()
    assert err > TOL["float32"]["max_abs"], f"{bug}: planted bug not visible (max |err| {err:.3g})"
    assert_close(got, variant.logits(ids), f"{bug}: ours vs reference on the variant")


# ------------------------------------------------------------- quantized latent cache (--kv-bits)

# Relative RMS error of the logits against the float32 reference, prefill 50 + 50 then 5 decode
# steps. Measured 0.082 at 8 bits and 0.114 at 4: on these random weights the cost is mostly
# expert choices flipped after the MLA layer (0.5% Gaussian noise on the latents alone gives
# 0.026), so it says little about quality; the demo model's recall accuracy does (closing notes).
# The exactness of the quantized reads is tested in test_long_context.py.
KV_BITS_REL_RMS = {8: 0.12, 4: 0.2}


@pytest.mark.parametrize("kv_bits", [8, 4])
def test_quantized_latent_cache_against_reference(ref128, ours, kv_bits, monkeypatch):
    ref = ref128
    ids = ref.tokens(100 + N_DECODE, batch=2, seed=3)
    prompt, fed = [r[:100] for r in ids], [r[100:] for r in ids]
    model = ours(ref.folder)
    monkeypatch.setattr(model, "make_cache", lambda: type(model).make_cache(model, kv_bits))
    got = decode_ours(model, prompt, fed, [50, 50])
    want = ref.decode(prompt, fed, prefill_chunks=[50, 50])
    assert np.all(np.isfinite(got))
    rel = np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want ** 2))
    assert rel <= KV_BITS_REL_RMS[kv_bits], f"kv_bits {kv_bits}: relative RMS error {rel:.3g}"
    print(f"kv_bits {kv_bits}: relative RMS error vs reference {rel:.4f}")
