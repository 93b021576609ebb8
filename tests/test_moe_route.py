"""The MoE route kernel (metal/moe_route.metal) on the CPU emulator against route_ops, its
reference in MLX ops: expert sets, weights, ties, NaN, planted bugs, and the dispatch (modes,
self-check, fallback, the MoE layer on the kernel)."""

import warnings

import mlx.core as mx
import numpy as np
import pytest
from metal_emu import emulate

from kimi_mlx import moe_route
from kimi_mlx.config import ModelArgs
from kimi_mlx.kda import metal
from kimi_mlx.moe import SparseMoE
from kimi_mlx.moe_route import RouteKernel, compare_routes, route_ops

TOL_FP32 = 1e-5  # weights: float32 both sides; the kernel's exp is the C library's here


def kernel(schedule="free", edit=None) -> RouteKernel:
    return RouteKernel(emulate.kernel_factory(schedule, edit=edit), backend="emulator")


def logits_and_bias(N, E, seed=0):
    rng = np.random.default_rng(seed)
    return (mx.array(rng.standard_normal((N, E)).astype(np.float32)),
            mx.array((0.3 * rng.standard_normal(E)).astype(np.float32)))


# E not a multiple of 32 (idle lanes), E = 256 (the real router), E past 1024 (two experts a
# thread); k = 1, the real 8, k = E (every expert); both renormalisations.
@pytest.mark.parametrize("N, E, k, renormalize", [(1, 16, 8, True), (5, 40, 3, False), (3, 256, 8, True),
                                                  (2, 1100, 5, True), (4, 8, 8, True), (3, 33, 1, False)])
def test_route_kernel_equals_route_ops(N, E, k, renormalize):
    logits, bias = logits_and_bias(N, E, seed=E)
    out = kernel()(logits, bias, k, renormalize, 2.446)
    assert out[0].dtype == mx.uint32 and out[1].dtype == mx.float32
    assert compare_routes(out, route_ops(logits, bias, k, renormalize, 2.446), TOL_FP32, "test") is None


def test_route_kernel_leading_shape_and_batch_order():
    logits, bias = logits_and_bias(6, 24)
    ids, w = kernel()(logits.reshape(2, 3, 24), bias, 4, True, 1.0)
    assert ids.shape == w.shape == (2, 3, 4)
    assert compare_routes((ids, w), route_ops(logits, bias, 4, True, 1.0), TOL_FP32, "test") is None


def test_route_kernel_ties_take_the_lowest_index_and_nan_stays_in_range():
    E = 48
    ids, w = kernel()(mx.full((1, E), 0.7), mx.zeros((E,)), 5, True, 1.0)
    assert sorted(np.array(ids)[0].tolist()) == [0, 1, 2, 3, 4]
    assert np.allclose(np.array(w), 0.2, rtol=1e-6)  # equal scores, renormalised
    bias = mx.zeros((E,)).at[40].add(1.0)  # the bias picks expert 40 first, its score weighs
    ids, _ = kernel()(mx.full((1, E), 0.7), bias, 2, True, 1.0)
    assert sorted(np.array(ids)[0].tolist()) == [0, 40]
    nan = mx.array(np.full((2, E), np.nan, np.float32))
    ids, _ = kernel()(nan, mx.zeros((E,)), 8, True, 1.0)
    assert ((np.array(ids) >= 0) & (np.array(ids) < E)).all()


@pytest.mark.parametrize("old, new", [
    ("v > win_value", "v < win_value"),                 # the SIMD groups' winner: the smallest
    ("choice[j] > value", "choice[j] < value"),         # a thread's own best: its smallest
    ("w / (total + 1e-20f)", "w / (total + 1.0f)"),      # the renormalisation
    ("const float c = s + float(bias[e]);", "const float c = s;"),  # the correction bias ignored
])
def test_route_kernel_planted_bugs_are_caught(old, new):
    source = moe_route.SOURCE.body
    assert source.count(old) == 1, "the planted line moved: update this test"
    broken = kernel(edit=lambda name, src: src.replace(old, new))
    assert broken.self_check(1100, 8, True) is not None  # two experts a thread: a thread's own best matters
    assert kernel().self_check(1100, 8, True) is None


@pytest.mark.parametrize("N, E, k", [(1, 256, 8), (3, 40, 3), (2, 8, 8)])
def test_route_kernel_with_the_shared_expert_equals_the_reference(N, E, k):
    """shared=True: rows (ids, E, ids + E + 1, 2E + 1) of the stacked gate/up weights, weights (w, 1)."""
    logits, bias = logits_and_bias(N, E, seed=E)
    rows, w = kernel()(logits, bias, k, True, 2.5, shared=True)
    ref_rows, ref_w = moe_route.with_shared(*route_ops(logits, bias, k, True, 2.5), E)
    assert rows.shape == (N, 2 * k + 2) and w.shape == (N, k + 1) and rows.dtype == mx.uint32
    assert compare_routes((rows[:, :k], w[:, :k]), (ref_rows[:, :k], ref_w[:, :k]), TOL_FP32, "shared") is None
    r, rr = np.array(rows), np.array(ref_rows)
    assert (r[:, k] == E).all() and (r[:, -1] == 2 * E + 1).all() and (np.array(w)[:, k] == 1).all()
    assert (np.sort(r[:, k + 1:-1], axis=1) == np.sort(rr[:, k + 1:-1], axis=1)).all()  # ids + E + 1
    assert (r[:, k + 1:-1] == r[:, :k] + E + 1).all()  # each up row is its gate row's expert


@pytest.mark.parametrize("old, new", [
    ("ids[n * (2 * K + 2) + K + 1 + t] = id + uint(E + 1);", "ids[n * (2 * K + 2) + K + 1 + t] = id + uint(E);"),
    ("weights[n * (K + 1) + K] = 1.0f;", "weights[n * (K + 1) + K] = scale[0];"),
])
def test_route_kernel_shared_layout_bugs_are_caught(old, new):
    assert moe_route.SOURCE.body.count(old) == 1, "the planted line moved: update this test"
    broken = kernel(edit=lambda name, src: src.replace(old, new))
    assert broken.self_check(64, 8, True) is not None
    assert kernel().self_check(64, 8, True) is None


def test_route_kernel_planted_missing_barrier_is_caught():
    barrier = "threadgroup_barrier(mem_flags::mem_threadgroup);"
    assert moe_route.SOURCE.body.count(barrier) == 2, "a barrier was added or removed: update this test"
    for i in range(2):  # each one: without it a thread reads the winners before they are written
        def drop(name, src, i=i):
            head, *rest = src.split(barrier)
            return head + "".join((barrier if j != i else "") + part for j, part in enumerate(rest))
        assert kernel("reverse", edit=drop).self_check(96, 8, True) is not None


# --- dispatch ------------------------------------------------------------------------------

@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.delenv(metal.ENV_VAR, raising=False)
    metal.set_kernel_mode(None)
    yield lambda k: moe_route._use_backend(k, available=True)
    metal.set_kernel_mode(None)
    moe_route._use_backend(None)


def test_route_dispatch_runs_the_kernel_after_its_self_check(emulated, monkeypatch):
    calls = []
    k = kernel()
    real = k.__call__
    monkeypatch.setattr(RouteKernel, "__call__", lambda self, *a, **kw: (calls.append(1), real(*a, **kw))[1])
    emulated(k)
    logits, bias = logits_and_bias(3, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        assert moe_route.route_ready(64, 8, True)
        out = moe_route.route(logits, bias, 8, True, 2.0)
    assert calls and compare_routes(out, route_ops(logits, bias, 8, True, 2.0), TOL_FP32, "test") is None
    calls.clear()
    metal.set_kernel_mode("ops")
    moe_route.route(logits, bias, 8, True, 2.0)
    assert not calls and not moe_route.route_ready(64, 8, True)


def test_route_dispatch_falls_back_with_one_warning_or_raises_when_forced(emulated):
    emulated(kernel(edit=lambda name, src: src.replace("v > win_value", "v < win_value")))
    logits, bias = logits_and_bias(2, 64)
    with pytest.warns(RuntimeWarning, match="self-check failed"):
        out = moe_route.route(logits, bias, 8, True, 1.0)
    assert compare_routes(out, route_ops(logits, bias, 8, True, 1.0), 0.0, "test") is None  # the reference ran
    metal.set_kernel_mode("metal")
    with pytest.raises(RuntimeError, match="kernels forced"):
        moe_route.route(logits, bias, 8, True, 1.0)


def test_route_on_the_cpu_is_the_reference_without_a_warning():
    moe_route._use_backend(None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not moe_route.route_ready(64, 8, True)


def test_moe_layer_on_the_route_kernel_equals_the_reference(emulated):
    from tiny import TINY_CONFIG

    args = ModelArgs.from_dict({**TINY_CONFIG, "num_experts": 40, "num_experts_per_token": 6})
    mx.random.seed(3)
    moe = SparseMoE(args)
    moe.e_score_correction_bias = 0.1 * mx.random.normal((40,))
    x = mx.random.normal((2, 5, args.hidden_size))
    metal.set_kernel_mode("ops")
    ref = moe(x)
    metal.set_kernel_mode(None)
    emulated(kernel())
    assert moe_route.route_ready(40, 6, args.moe_renormalize)
    out = moe(x)
    assert (mx.linalg.norm(out - ref) / mx.linalg.norm(ref)).item() <= TOL_FP32
