"""fp32_matmul's 3-pass split keeps float32 accuracy where the GEMM rounds its inputs to TF32.

No TF32 hardware here: `tf32_matmul` rounds each input to TF32's 10 mantissa bits (round to
nearest even, as the hardware converts) before a float32 product. Truth: float64 numpy.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from kimi_mlx import precision


def _round_tf32(x: mx.array) -> mx.array:
    u = x.view(mx.uint32)
    u = (u + 0xFFF + ((u >> 13) & 1)) & 0xFFFFE000  # round the low 13 bits to nearest even
    return u.view(mx.float32)


def tf32_matmul(a: mx.array, b: mx.array) -> mx.array:
    return _round_tf32(a) @ _round_tf32(b)


def _rel64(out: mx.array, a: np.ndarray, b: np.ndarray) -> float:
    ref = a.astype(np.float64) @ b.astype(np.float64)
    return float(np.linalg.norm(np.array(out, dtype=np.float64) - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("shape", [(64, 64, 64), (3, 65, 130, 33)])
def test_split_matmul_is_fp32_accurate_under_tf32(shape):
    rng = np.random.default_rng(0)
    *batch, m, k, n = shape
    a = rng.standard_normal((*batch, m, k)).astype(np.float32)
    b = (rng.standard_normal((*batch, k, n)) * 1e-3).astype(np.float32)
    plain = _rel64(tf32_matmul(mx.array(a), mx.array(b)), a, b)
    split = _rel64(precision.split_matmul(mx.array(a), mx.array(b), tf32_matmul), a, b)
    assert plain > 1e-4  # the emulation really loses precision, as TF32 GEMMs do
    assert split < 2e-6, f"split product relative error {split:.1e}"


def test_split_halves_are_exact():
    x = mx.array(np.random.default_rng(1).standard_normal(1000).astype(np.float32) * 1e3)
    hi, lo = precision._split(x)
    assert mx.array_equal(hi + lo, x).item()
    assert mx.array_equal(_round_tf32(hi), hi).item()  # hi is representable in TF32


def test_cpu_probe_says_full_fp32():
    if mx.default_device() == mx.cpu:
        assert precision.reduced_fp32_matmul() is False


def test_chunked_kda_and_its_gradients_stay_fp32_under_emulated_tf32(monkeypatch):
    """kda_chunked through fp32_matmul on a 'TF32 GPU' (the probe forced, every product rounding
    its inputs to TF32): mx.grad still matches kda_naive at the float32 tolerance. The
    gradient part failed on the H200 before fp32_matmul had its own vjp (rel. err 5e-4)."""
    import test_kda

    monkeypatch.setitem(precision._reduced, str(mx.default_device()), True)
    split = precision.split_matmul
    monkeypatch.setattr(precision, "split_matmul", lambda a, b, matmul=tf32_matmul: split(a, b, matmul))
    test_kda.test_gradients_match_naive()
