"""The CPU Metal emulator itself (tests/metal_emu): SIMD-group semantics, barriers, and that a
bad kernel is reported (out-of-bounds, deadlock, unwritten output) instead of returning garbage.
The kernels are in tests/metal_emu/probe.metal."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from kimi_mlx.kda.metal import load_sources
from metal_emu import emulate

PROBES = load_sources(Path(emulate.__file__).with_name("probe.metal"))


def probe(name: str, schedule: str = "free", **kw):
    s = PROBES[name]
    factory = emulate.kernel_factory(schedule, **kw)
    return factory(s.name, s.input_names, s.output_names, s.body, s.header)


@pytest.mark.parametrize("schedule", ["free", "forward", "reverse", "random"])
def test_metal_emulator_simd_ops_and_barrier(schedule):
    n = 128
    x = np.random.default_rng(0).integers(-50, 50, n).astype(np.float32)  # exact sums
    outs = probe("probe_simd", schedule)(
        inputs=[mx.array(x)], grid=(n, 1, 1), threadgroup=(64, 1, 1),
        output_shapes=[(n,)] * 6, output_dtypes=[mx.float32] * 6,
    )
    got = dict(zip(PROBES["probe_simd"].output_names, (np.array(o) for o in outs)))
    lanes = x.reshape(-1, 32)
    lane = np.arange(32)
    np.testing.assert_array_equal(got["sum"], np.repeat(lanes.sum(1), 32))
    np.testing.assert_array_equal(got["xor1"], lanes[:, lane ^ 1].ravel())
    down = np.where(lane + 3 < 32, np.minimum(lane + 3, 31), lane)  # past the end: own value
    np.testing.assert_array_equal(got["down3"], lanes[:, down].ravel())
    np.testing.assert_array_equal(got["prefix"], (np.cumsum(lanes, 1) - lanes).ravel())
    np.testing.assert_array_equal(got["bcast"], np.repeat(lanes[:, 5], 32))
    np.testing.assert_array_equal(got["tgsum"], np.repeat(x.reshape(-1, 64).sum(1), 64))


def test_metal_emulator_types_scalars_and_bfloat16():
    x = mx.array([0.5, -1.25, 3.0, 7.0, 9.0], dtype=mx.bfloat16)
    (y,) = probe("probe_types")(
        inputs=[x, 4], template=[("OutT", mx.bfloat16)], grid=(32, 1, 1), threadgroup=(32, 1, 1),
        output_shapes=[(32,)], output_dtypes=[mx.bfloat16], init_value=0.0,
    )
    assert y.dtype == mx.bfloat16
    want = np.concatenate([8 * np.array([0.5, -1.25, 3.0, 7.0]) + 11.5, np.zeros(28)])
    np.testing.assert_allclose(np.array(y.astype(mx.float32)), want, rtol=2**-8)


def test_metal_emulator_reports_out_of_bounds():
    with pytest.raises(emulate.EmulatorError, match=r"out-of-bounds access x\[32\]"):
        probe("probe_oob")(inputs=[mx.zeros((32,))], grid=(32, 1, 1), threadgroup=(32, 1, 1),
                           output_shapes=[(32,)], output_dtypes=[mx.float32])


@pytest.mark.parametrize("schedule", ["reverse", "free"])
def test_metal_emulator_reports_divergent_barrier(schedule):
    """Serial schedules see the deadlock at once; the free one through its watchdog."""
    with pytest.raises(emulate.EmulatorError, match="deadlock"):
        probe("probe_divergent", schedule, timeout_s=1.0)(
            inputs=[mx.zeros((32,))], grid=(32, 1, 1), threadgroup=(32, 1, 1),
            output_shapes=[(32,)], output_dtypes=[mx.float32])


def test_metal_emulator_unwritten_output_is_nan():
    (y,) = probe("probe_unwritten")(inputs=[mx.ones((64,))], grid=(64, 1, 1), threadgroup=(32, 1, 1),
                                    output_shapes=[(64,)], output_dtypes=[mx.float32])
    y = np.array(y)
    assert (y[::2] == 1).all() and np.isnan(y[1::2]).all()


def test_metal_emulator_rejects_partial_threadgroups():
    with pytest.raises(emulate.EmulatorError, match="whole number of threadgroups"):
        probe("probe_unwritten")(inputs=[mx.ones((40,))], grid=(40, 1, 1), threadgroup=(32, 1, 1),
                                 output_shapes=[(40,)], output_dtypes=[mx.float32])


def test_metal_emulator_poisons_threadgroup_memory():
    """Unwritten threadgroup memory reads NaN in every threadgroup (Metal leaves it undefined)."""
    (y,) = probe("probe_poison")(inputs=[mx.ones((64,))], template=[("N", 32)], grid=(64, 1, 1),
                                 threadgroup=(32, 1, 1), output_shapes=[(64,)], output_dtypes=[mx.float32])
    assert np.isnan(np.array(y)).all()


def test_metal_emulator_rejects_threadgroup_pointers():
    """`threadgroup` becomes a shared static: a qualified pointer would silently mean something
    else, so the emulator refuses it."""
    with pytest.raises(emulate.EmulatorError, match="only supported on a variable declaration"):
        emulate.metal_kernel("bad", ["x"], ["y"], "  threadgroup float* p = nullptr;\n  y[0] = x[0];")
