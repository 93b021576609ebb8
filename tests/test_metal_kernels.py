"""The Metal kernels (metal/*.metal), run on the CPU emulator, against kda_naive.

The kernels get exactly the text mx.fast.metal_kernel gets on a Mac, through the same wrapper
code (kimi_mlx.kda.metal.MetalKDA with the emulator as kernel factory). Outputs start as NaN,
so an element a kernel never writes fails the comparison. Planted errors (a flipped sign, each
barrier removed) must fail it too: the barrier ones under the deterministic "reverse" schedule,
where one thread at a time runs, the highest-numbered first, until it must wait.
"""

from __future__ import annotations

import functools
import re
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from kimi_mlx.kda import kda_naive
from kimi_mlx.kda import metal
from kimi_mlx.kda.metal import MetalKDA, relative_error
from kimi_mlx.kda.prologue import decode_layer_ops
from kimi_mlx.kda_layer import l2_normalize
from metal_emu import emulate

# Relative error ||out - ref|| / ||ref|| allowed, by output dtype. float32: the kernels sum in
# another order than kda_naive; the worst case measured in this file is 3.1e-7 (the Layer
# step, B=1, D=128), so 2e-6 leaves headroom without hiding a bug (every planted one is off by
# >= 5e-2 or NaN). bfloat16: inputs and outputs are rounded to bf16 (2^-8) around fp32 math.
TOL = {mx.float32: 2e-6, mx.bfloat16: 1e-2}
B, H = 2, 2
BARRIER = "threadgroup_barrier(mem_flags::mem_threadgroup);"


@functools.lru_cache(maxsize=None)
def backend(schedule: str = "free") -> MetalKDA:
    return MetalKDA(emulate.kernel_factory(schedule))


@functools.lru_cache(maxsize=None)
def raw_inputs(T: int, Dk: int, Dv: int, seed: int = 0):
    """Layer-side inputs: raw q, k (after conv + SiLU), v, gate pre-activation f, beta logit b,
    A_log, dt_bias, and an initial state. Gates are strong: many channels lose e^-5 per token."""
    rng = np.random.default_rng([T, Dk, Dv, seed])
    n = lambda *s: mx.array(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    return (n(B, T, H, Dk), n(B, T, H, Dk), n(B, T, H, Dv), 2 * n(B, T, H, Dk), n(B, T, H),
            mx.array(rng.uniform(0, 1.5, H).astype(np.float32)), n(H * Dk), 0.5 * n(B, H, Dv, Dk))


@functools.lru_cache(maxsize=None)
def inputs(T: int, Dk: int, Dv: int, dtype=mx.float32, init: bool = True):
    """(q, k, v, g, beta, state) in the package conventions, by the layer's own math."""
    qr, kr, v, f, b, A_log, dt_bias, state = raw_inputs(T, Dk, Dv)
    q = l2_normalize(qr) * Dk**-0.5
    k = l2_normalize(kr)
    g = -mx.exp(A_log.reshape(H, 1)) * nn.softplus(f + dt_bias.reshape(H, Dk))  # as KimiDeltaAttention
    beta = mx.sigmoid(b)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), g, beta, state if init else None


@functools.lru_cache(maxsize=None)
def reference(*key):
    o, s = kda_naive(*inputs(*key))
    mx.eval(o, s)
    return o, s


def check(out, key, tol=None):
    """Output and final state against kda_naive; returns the two relative errors."""
    ref = reference(*key)
    dtype = key[3] if len(key) > 3 else mx.float32
    errs = relative_error(out[0], ref[0]), relative_error(out[1], ref[1])
    assert out[0].shape == ref[0].shape and out[0].dtype == ref[0].dtype and out[1].dtype == mx.float32
    tol = tol or TOL[dtype]
    assert errs[0] <= tol and errs[1] <= tol, errs  # NaN fails too
    return errs


def case_id(T, Dk, Dv, dtype=mx.float32, init=True):
    return f"B{B}-T{T}-H{H}-Dk{Dk}-Dv{Dv}-{str(dtype).split('.')[-1]}" + ("" if init else "-nostate")


def cases(*specs):
    return [pytest.param(*s, id=case_id(*s)) for s in specs]


def test_metal_sources_are_complete():
    """Each .metal file starts with its shapes; every named buffer is used by its kernel body."""
    assert set(metal.SOURCES) == {"kda_decode"}
    for s in metal.SOURCES.values():
        assert s.header.startswith("// kda_"), s.name
        for name in s.input_names + s.output_names:
            assert re.search(rf"\b{name}\b", s.body), f"{s.name}: {name} unused"


# --- every kernel against kda_naive ---------------------------------------------------------

@pytest.mark.parametrize("T, Dk, Dv", cases(
    (1, 32, 32), (1, 128, 128), (63, 64, 64), (64, 32, 32), (65, 128, 128), (300, 32, 32), (65, 64, 32)))
def test_metal_decode_kernel_matches_naive(T, Dk, Dv):
    """kda_decode alone: kda_metal's route for every T."""
    check(backend().decode(*inputs(T, Dk, Dv)), (T, Dk, Dv))


@pytest.mark.parametrize("T, Dk, Dv, dtype, init", cases(
    (1, 64, 64, mx.float32, False), (63, 32, 32, mx.float32, True), (65, 64, 64, mx.bfloat16, True),
    (5, 64, 64, mx.bfloat16, False), (300, 64, 64, mx.bfloat16, True)))
def test_metal_route_matches_naive(T, Dk, Dv, dtype, init, monkeypatch):
    """MetalKDA's own entry point (kda_decode for every T), bf16, no initial state."""
    check(backend()(*inputs(T, Dk, Dv, dtype, init)), (T, Dk, Dv, dtype, init))


@pytest.mark.parametrize("B, T, Dk, Dv, dtype", [
    (2, 1, 32, 32, mx.float32), (1, 1, 128, 128, mx.float32), (2, 3, 64, 64, mx.float32), (2, 1, 64, 32, mx.bfloat16),
    (1, 5, 128, 128, mx.bfloat16)])
def test_metal_layer_step_matches_ops(B, T, Dk, Dv, dtype):
    """The Layer kda_decode (conv, prologue, recurrence, output norm and gate in one kernel)
    against the same steps in MLX ops with kda_naive; T > 1 walks past the conv window."""
    check_layer(backend(), layer_inputs(B, T, 2, Dk, Dv, dtype=dtype), TOL[dtype])


def test_metal_empty_sequence():
    q, k, v, g, beta, state = inputs(1, 32, 32)
    o, s = backend()(q[:, :0], k[:, :0], v[:, :0], g[:, :0], beta[:, :0], state)
    assert o.shape == (B, 0, H, 32) and mx.array_equal(s, state)


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random"])
def test_metal_kernels_pass_every_schedule(schedule):
    """The control for the planted-barrier tests: intact kernels pass serialised too."""
    check(backend(schedule).decode(*inputs(5, 32, 32)), (5, 32, 32))


# --- planted errors must be caught -----------------------------------------------------------

def planted(kernel: str, old: str, new: str, occurrence: int = 0, schedule: str = "free") -> MetalKDA:
    """Kernels with one text substitution in `kernel`'s body (the `occurrence`-th match)."""

    def edit(name, source):
        if name.split("__")[0] != kernel:  # MetalKDA names an instance <kernel>__<digest>_<dtypes>
            return source
        at = -1
        for _ in range(occurrence + 1):
            at = source.find(old, at + 1)
            assert at >= 0, f"{old!r} occurs fewer than {occurrence + 1} times in {kernel}"
        return source[:at] + new + source[at + len(old):]

    return MetalKDA(emulate.kernel_factory(schedule, edit=edit))


def layer_inputs(B=2, T=1, H=2, Dk=32, Dv=32, K=4, dtype=mx.float32, seed=0):
    """kda_decode_layer's inputs (kimi_mlx/kda/metal.py), random; gates strong as in raw_inputs."""
    rng = np.random.default_rng([B, T, H, Dk, Dv, seed])
    n = lambda *s: mx.array(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    C, Cv = H * Dk, H * Dv
    act = lambda x: x.astype(dtype)  # noqa: E731
    return (act(n(B, T, 2 * C + Cv)), [act(n(B, K - 1, C)), act(n(B, K - 1, C)), act(n(B, K - 1, Cv))],
            act(0.5 * n(2 * C + Cv, K, 1)), act(2 * n(B, T, H, Dk)), act(n(B, T, H)),
            mx.array(rng.uniform(0, 1.5, H).astype(np.float32)), n(H * Dk), act(n(B, T, H, Dv)),
            act(1 + 0.1 * n(Dv)), 1e-5, 0.5 * n(B, H, Dv, Dk))


def check_layer(kernels: MetalKDA, args, tol: float):
    """The Layer kernel against decode_layer_ops (the layer's math in MLX ops, kda_naive inside):
    output, state, and the new conv windows (copies: exactly equal)."""
    y, windows, state = kernels.layer(*args)
    ry, rwin, rstate = decode_layer_ops(*args)
    assert y.shape == ry.shape and y.dtype == ry.dtype and state.dtype == mx.float32
    errs = relative_error(y, ry), relative_error(state, rstate)
    assert errs[0] <= tol and errs[1] <= tol, errs
    for w, r in zip(windows, rwin):
        assert w.shape == r.shape and w.dtype == r.dtype and mx.array_equal(w, r).item()
    return errs


def assert_caught(kernels: MetalKDA, route: str = ""):
    """The comparison with the reference fails (or the emulator reports the fault): the plain
    kda_decode over 5 tokens, or with route "layer" the Layer variant over 3."""
    try:
        if route == "layer":
            with pytest.raises(AssertionError):
                check_layer(kernels, layer_inputs(T=3), TOL[mx.float32])
            return
        out = kernels.decode(*inputs(5, 32, 32))
    except emulate.EmulatorError:
        return
    with pytest.raises(AssertionError):
        check(out, (5, 32, 32))


def test_metal_planted_sign_flip_is_caught():
    assert_caught(planted("kda_decode", "- kv * rk", "+ kv * rk"))


@pytest.mark.parametrize("old, new", [
    ("acc[s] += x * static_cast<float>(conv_w[ch * K + j])", "acc[s] += x * static_cast<float>(conv_w[ch * K + K - 1 - j])"),
    ("i < K - 1 ? static_cast<float>(wv", "i < K - 2 ? static_cast<float>(wv"),
    ("no / float(Dv)", "no / float(Dk + 1)"),
    ("/ (1.0f + exp(-gt))", "/ (1.0f + exp(gt))"),
    ("const int src = T + i;", "const int src = T + i - 1;"),
])
def test_metal_layer_planted_bugs_are_caught(old, new):
    """The Layer variant's own parts: conv taps, the v window, the norm, the gate, the new windows."""
    assert_caught(planted("kda_decode", old, new), "layer")


@pytest.mark.parametrize("occurrence, route", [(0, ""), (0, "layer"), (1, "layer")])
def test_metal_planted_missing_barrier_is_caught(occurrence, route):
    """Every barrier in kda_decode is needed, and its absence shows deterministically (the
    second is the Layer variant's, before the output norm)."""
    assert metal.SOURCES["kda_decode"].body.count(BARRIER) == 2, "a barrier was added or removed: update this test's list"
    assert_caught(planted("kda_decode", BARRIER, "", occurrence, schedule="reverse"), route)


# --- kda_metal: modes, self-check, fallback -------------------------------------------------

@pytest.fixture
def emulated(monkeypatch):
    """kda_metal backed by the emulator, as if on a Mac; restores the real backend afterwards."""
    monkeypatch.delenv(metal.ENV_VAR, raising=False)
    metal.set_kernel_mode(None)
    yield lambda kernels: metal._use_backend(kernels, available=True)
    metal.set_kernel_mode(None)
    metal._use_backend(None)


def test_metal_api_runs_kernels_after_self_check(emulated):
    emulated(backend())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        assert metal.metal_ready(H, 32, 32)
        check(metal.kda_metal(*inputs(1, 32, 32)), (1, 32, 32))
        check(metal.kda_metal(*inputs(65, 32, 32)), (65, 32, 32))
    assert metal._checked == {("emulator", H, 32, 32, mx.float32, mx.float32): None}


def test_metal_api_falls_back_once_when_self_check_fails(emulated):
    emulated(planted("kda_decode", "- kv * rk", "+ kv * rk"))
    with pytest.warns(RuntimeWarning, match="self-check failed on emulator: kda_metal output differs"):
        out = metal.kda_metal(*inputs(5, 32, 32))
    check(out, (5, 32, 32))  # the ops path's answer
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process, checked once
        assert not metal.metal_ready(H, 32, 32)
        check(metal.kda_metal(*inputs(65, 32, 32)), (65, 32, 32))


def test_metal_api_mode_metal_raises_instead_of_falling_back(emulated):
    emulated(planted("kda_decode", "- kv * rk", "+ kv * rk"))
    metal.set_kernel_mode("metal")
    with pytest.raises(RuntimeError, match="kernels forced .* self-check failed"):
        metal.kda_metal(*inputs(5, 32, 32))


def test_metal_api_mode_ops_never_builds_kernels(emulated, monkeypatch):
    emulated(None)
    monkeypatch.setattr(metal, "MetalKDA", None)  # would fail if anything tried to build kernels
    monkeypatch.setenv(metal.ENV_VAR, "ops")
    assert metal.get_kernel_mode() == "ops" and not metal.metal_ready(H, 32, 32)
    check(metal.kda_metal(*inputs(65, 32, 32)), (65, 32, 32))
    metal.set_kernel_mode("auto")  # the API switch beats the env var
    assert metal.get_kernel_mode() == "auto"
    monkeypatch.setenv(metal.ENV_VAR, "gpu")
    metal.set_kernel_mode(None)
    with pytest.raises(ValueError, match="KIMI_MLX_KERNELS"):
        metal.get_kernel_mode()
    with pytest.raises(ValueError, match="unknown kernel mode"):
        metal.set_kernel_mode("fast")


def test_metal_api_on_the_cpu_device_uses_ops(monkeypatch):
    """The default device the CPU: auto warns once and runs the ops path; mode metal raises. The
    kernels are picked by the default device, not by what exists."""
    monkeypatch.delenv(metal.ENV_VAR, raising=False)
    monkeypatch.setattr(mx, "default_device", lambda: mx.cpu)  # (so also in the suite's GPU mode)
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)  # even where Metal exists
    metal._use_backend(None)
    assert metal.gpu_backend() is None
    try:
        with pytest.warns(RuntimeWarning, match="default device is the CPU"):
            check(metal.kda_metal(*inputs(5, 32, 32)), (5, 32, 32))
        metal.set_kernel_mode("metal")
        with pytest.raises(RuntimeError, match="default device is the CPU"):
            metal.kda_metal(*inputs(5, 32, 32))
    finally:
        metal.set_kernel_mode(None)
        metal._use_backend(None)


def test_metal_unsupported_head_dims_use_ops(emulated):
    emulated(backend())
    assert not metal.supports(100, 48)
    with pytest.warns(RuntimeWarning, match="not supported"):
        q, k, v, g, beta, _ = inputs(3, 32, 32)
        o, _ = metal.kda_metal(q, k, v[..., :16], g, beta)
    assert o.shape == (B, 3, H, 16)
