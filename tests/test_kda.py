"""Every fast KDA path against the naive recurrence (never one fast path against another).

Sizes are awkward on purpose (T around the chunk of 64), gates are strong (channels losing
e^-5 .. e^-27 per token) or weak, with and without an initial state; outputs and the final
state are compared by relative error ||out - ref|| / ||ref||.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np
import pytest

from kimi_mlx.kda import (
    KDA_PATHS,
    get_kda_path,
    kda_chunked,
    kda_mx_fast,
    kda_naive,
    kda_step,
    kda_update,
    set_kda_path,
)
from kimi_mlx.kda import dispatch
from kimi_mlx.errors import KimiError

# Relative error allowed, keyed by output dtype; the fp32 state is always held to float32.
# float32: every path does fp32 math, only in another order. Against a float64 recurrence the
# naive and chunked paths both land at 1e-7..3e-7 for T <= 1000; the worst path-vs-naive error
# in this file is 3.6e-7 (chunked, T=63, D=128), gradients 2e-7. 2e-6 leaves ~5x headroom
# for other summation orders without hiding a real bug (the planted one below is 5e-2).
# bfloat16: outputs are rounded to bf16 (2^-8 per element) after fp32 math.
TOL = {mx.float32: 2e-6, mx.bfloat16: 1e-2}

B, H = 2, 2
PATHS = {"chunked": kda_chunked, "mx_fast": kda_mx_fast, "auto": kda_update}


@pytest.fixture(autouse=True)
def _no_forced_path(monkeypatch):
    """Each test starts with auto dispatch: no env var, nothing set."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    set_kda_path(None)
    yield
    set_kda_path(None)


@functools.lru_cache(maxsize=None)
def make_inputs(T: int, D: int, gates: str, init: bool, dtype=mx.float32, seed: int = 0):
    """q, k, v, g, beta, state in the package conventions (q, k normalised, q scaled)."""
    rng = np.random.default_rng([T, D, seed, gates == "strong", init])
    q = rng.standard_normal((B, T, H, D))
    k = rng.standard_normal((B, T, H, D))
    q = q / np.linalg.norm(q, axis=-1, keepdims=True) * D**-0.5
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, H, D))
    if gates == "strong":  # softplus(3x) e^u: many channels lose e^-5 or more per token
        g = -np.logaddexp(0, 3 * rng.standard_normal((B, T, H, D))) * np.exp(rng.uniform(size=(B, T, H, D)))
    else:
        g = -0.05 * rng.uniform(size=(B, T, H, D))
    beta = 1 / (1 + np.exp(-rng.standard_normal((B, T, H))))
    state = 0.5 * rng.standard_normal((B, H, D, D)) if init else None
    f32 = mx.float32
    arrays = [mx.array(x, dtype=dtype) for x in (q, k, v)]
    arrays += [mx.array(g, dtype=f32), mx.array(beta, dtype=f32)]
    arrays.append(None if state is None else mx.array(state, dtype=f32))
    return tuple(arrays)


@functools.lru_cache(maxsize=None)
def reference(*key):
    o, s = kda_naive(*make_inputs(*key))
    mx.eval(o, s)
    return o, s


def rel_err(out: mx.array, ref: mx.array) -> float:
    out, ref = out.astype(mx.float32), ref.astype(mx.float32)
    return (mx.linalg.norm((out - ref).flatten()) / mx.linalg.norm(ref.flatten())).item()


def check_against_naive(fn, key):
    """Run fn on the inputs of `key`, compare o and state with kda_naive; return the errors."""
    args = make_inputs(*key)
    o_ref, s_ref = reference(*key)
    o, s = fn(*args)
    assert o.shape == o_ref.shape and o.dtype == o_ref.dtype
    assert s.shape == s_ref.shape and s.dtype == mx.float32
    assert mx.isfinite(o).all().item() and mx.isfinite(s).all().item(), "unwritten or non-finite"
    err_o, err_s = rel_err(o, o_ref), rel_err(s, s_ref)
    assert err_o <= TOL[o_ref.dtype], f"output rel err {err_o:.2e}"
    assert err_s <= TOL[mx.float32], f"state rel err {err_s:.2e}"
    return err_o, err_s


CASES = [
    (T, D, gates, init)
    for T in (1, 63, 64, 65)
    for D in (32, 64, 128)
    for gates in ("strong", "weak")
    for init in (False, True)
]
CASES += [(1000, 64, gates, True) for gates in ("strong", "weak")]


def case_id(c):
    T, D, gates, init = c
    return f"B{B}-T{T}-H{H}-D{D}-{gates}-{'state' if init else 'zero'}"


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_path_matches_naive(path, case):
    check_against_naive(PATHS[path], case)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("T", [1, 65])
def test_bfloat16_inputs(path, T):
    check_against_naive(PATHS[path], (T, 64, "strong", True, mx.bfloat16))


@pytest.mark.parametrize("path", list(PATHS))
def test_value_dim_differs_from_key_dim(path):
    """Dv != Dk keeps the [B, H, Dv, Dk] layout apart from its transpose."""
    q, k, v, g, beta, s = make_inputs(65, 64, "strong", True)
    v, s = v[..., :32], s[:, :, :32, :]  # Dv = 32, Dk = 64
    o_ref, s_ref = kda_naive(q, k, v, g, beta, s)
    o, s1 = PATHS[path](q, k, v, g, beta, s)
    assert o.shape == (B, 65, H, 32) and s1.shape == (B, H, 32, 64)
    assert rel_err(o, o_ref) <= TOL[mx.float32] and rel_err(s1, s_ref) <= TOL[mx.float32]


@pytest.mark.parametrize("chunk_size", [16, 32])
def test_other_chunk_sizes(chunk_size):
    check_against_naive(functools.partial(kda_chunked, chunk_size=chunk_size), (65, 32, "strong", True))


def test_decay_underflow_stays_finite():
    """exp(g) underflows to exactly 0 for g < -104: forward and gradient must stay finite."""
    q, k, v, g, beta, s = make_inputs(65, 32, "strong", True)
    g = mx.where(mx.arange(32) % 5 == 0, -150.0, g)  # every 5th channel forgets completely
    o_ref, s_ref = kda_naive(q, k, v, g, beta, s)
    o, s1 = kda_chunked(q, k, v, g, beta, s)
    assert rel_err(o, o_ref) <= TOL[mx.float32] and rel_err(s1, s_ref) <= TOL[mx.float32]
    grads = mx.grad(lambda *a: kda_chunked(*a)[0].sum(), argnums=(0, 1, 2, 3, 4))(q, k, v, g, beta, s)
    assert all(mx.isfinite(x).all().item() for x in grads)


def test_gradients_match_naive():
    """mx.grad through kda_chunked equals mx.grad through kda_naive (a later task trains on it)."""
    q, k, v, g, beta, s = make_inputs(65, 32, "strong", True)
    rng = np.random.default_rng(1)
    w_o = mx.array(rng.standard_normal((B, 65, H, 32)), dtype=mx.float32)
    w_s = mx.array(rng.standard_normal(s.shape), dtype=mx.float32)

    def loss(fn):
        def f(*args):
            o, state = fn(*args)
            return (o * w_o).sum() + (state * w_s).sum()

        return mx.grad(f, argnums=(0, 1, 2, 3, 4, 5))

    ref = loss(kda_naive)(q, k, v, g, beta, s)
    out = loss(kda_chunked)(q, k, v, g, beta, s)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "state"), out, ref):
        assert rel_err(a, b) <= TOL[mx.float32], f"d/d{name}: rel err {rel_err(a, b):.2e}"


def test_chunked_prefill_then_step_decode():
    """Prefill 65 tokens chunked, decode 5 with kda_step: same as one naive pass over 70."""
    q, k, v, g, beta, s = make_inputs(70, 64, "strong", True)
    o_ref, s_ref = kda_naive(q, k, v, g, beta, s)
    o, state = kda_chunked(q[:, :65], k[:, :65], v[:, :65], g[:, :65], beta[:, :65], s)
    outs = [o]
    for t in range(65, 70):
        o_t, state = kda_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        outs.append(o_t[:, None])
    assert rel_err(mx.concatenate(outs, axis=1), o_ref) <= TOL[mx.float32]
    assert rel_err(state, s_ref) <= TOL[mx.float32]


def _per_head_decay_step(q, k, v, g, beta, state):
    """A planted bug: kda_step with the decay averaged over Dk (per head, like GDN)."""
    g_head = mx.broadcast_to(g.mean(-1, keepdims=True), g.shape)
    return kda_step(q, k, v, g_head, beta, state)


def _buggy_naive(q, k, v, g, beta, state=None):
    outs = []
    for t in range(k.shape[1]):
        o, state = _per_head_decay_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        outs.append(o)
    return mx.stack(outs, axis=1).astype(v.dtype), state


@pytest.mark.parametrize("gates", ["strong", "weak"])
def test_planted_bug_is_caught(gates):
    """The comparison above can fail: per-head decay is caught even with weak gates."""
    with pytest.raises(AssertionError, match="rel err"):
        check_against_naive(_buggy_naive, (65, 32, gates, True))


# --- dispatcher -------------------------------------------------------------------------


def _spy_paths(monkeypatch):
    """Replace every registered path by a recorder of which one ran."""
    called = []
    for name in KDA_PATHS:
        fn = dispatch._PATHS[name]
        spy = lambda *a, _name=name, _fn=fn: (called.append(_name), _fn(*a))[1]  # noqa: E731
        monkeypatch.setitem(dispatch._PATHS, name, spy)
    return called


@pytest.mark.parametrize("name", KDA_PATHS)
def test_env_var_forces_path(monkeypatch, name):
    called = _spy_paths(monkeypatch)
    monkeypatch.setenv(dispatch.ENV_VAR, name)
    assert get_kda_path() == name and get_kda_path(1) == name and get_kda_path(4096) == name
    kda_update(*make_inputs(65, 32, "weak", True))
    assert called == [name]


@pytest.mark.parametrize("name", KDA_PATHS)
def test_set_kda_path_beats_env_and_argument_beats_both(monkeypatch, name):
    called = _spy_paths(monkeypatch)
    other = next(p for p in KDA_PATHS if p != name)
    monkeypatch.setenv(dispatch.ENV_VAR, other)
    set_kda_path(name)
    assert get_kda_path(65) == name
    args = make_inputs(65, 32, "weak", True)
    kda_update(*args)
    kda_update(*args, path=other)
    assert called == [name, other]


def test_auto_choice():
    assert get_kda_path() == "auto"
    for T in (1, 63, 64, 65, 4096):
        assert get_kda_path(T) in KDA_PATHS
    if not mx.metal.is_available():
        # a single recurrent step, no chunk padding: mx.fast on the CPU, the naive step (fused by
        # the compiled decode) on other GPUs
        assert get_kda_path(1) == ("mx_fast" if mx.default_device() == mx.cpu else "naive")
        assert get_kda_path(4096) == "chunked"


def test_bad_path_names(monkeypatch):
    args = make_inputs(1, 32, "weak", False)
    with pytest.raises(ValueError, match="valid: naive, chunked, mx_fast, metal"):
        set_kda_path("metall")
    with pytest.raises(ValueError, match="valid: naive, chunked, mx_fast, metal"):
        kda_update(*args, path="fast")
    monkeypatch.setenv(dispatch.ENV_VAR, "Chunked")
    with pytest.raises(ValueError, match="KIMI_MLX_KDA_PATH"):
        kda_update(*args)


def test_metal_path_with_kernels_off_is_refused(monkeypatch):
    """KIMI_MLX_KDA_PATH=metal with KIMI_MLX_KERNELS=ops used to run the ops path silently."""
    monkeypatch.setenv("KIMI_MLX_KDA_PATH", "metal")
    monkeypatch.setenv("KIMI_MLX_KERNELS", "ops")
    with pytest.raises(KimiError, match="kernel mode 'ops'"):
        get_kda_path(1)
    monkeypatch.setenv("KIMI_MLX_KERNELS", "auto")
    assert get_kda_path(1) == "metal"
