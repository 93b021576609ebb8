"""Full-fp32 matrix products on GPUs that run float32 matmuls at reduced (TF32) precision.

MLX runs float32 GEMMs as TF32 by default where the hardware has it (NVIDIA since Ampere, e.g.
the H200; Apple's M5-class GPUs): inputs keep 10 of their 23 mantissa bits, a 512 x 512 product
is ~3e-4 off. Most of kimi-mlx's matmuls are bf16 or quantized and do not care. These do, and
call `fp32_matmul`: the chunked KDA prefill (its decay grams, the triangular solve by inverse,
the products that carry the fp32 state from chunk to chunk) and an unquantized router (expert
choice at near-ties). The recurrent decode step is elementwise work, never a GEMM.

How: the 3-pass split (as CUTLASS's 3xTF32): a = a_hi + a_lo with a_hi = a with its low 13
mantissa bits cleared (exact in TF32), then a b = a_hi b_hi + (a_hi b_lo + a_lo b_hi), error
~2^-21 relative instead of 2^-11, whatever the GEMM rounds. It runs only where a one-time probe
(a 256 x 256 product against float64 on the default device) shows reduced precision, so the CPU,
Metal before M5, and any process with MLX_ENABLE_TF32=0 keep the plain single matmul.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

PROBE_TOL = 1e-5  # relative error of the probe product: fp32 gives ~1e-7, TF32 ~3e-4
_reduced: dict[str, bool] = {}


def reduced_fp32_matmul() -> bool:
    """Whether float32 matmuls on the default device run at reduced precision (probed once)."""
    key = str(mx.default_device())
    if key not in _reduced:
        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal((256, 256)).astype(np.float32) for _ in range(2))
        got = np.array(mx.array(a) @ mx.array(b), dtype=np.float64)
        ref = a.astype(np.float64) @ b.astype(np.float64)
        _reduced[key] = bool(np.linalg.norm(got - ref) / np.linalg.norm(ref) > PROBE_TOL)
    return _reduced[key]


def _split(x: mx.array) -> tuple[mx.array, mx.array]:
    """x (float32) -> (hi, lo): hi keeps the sign, exponent and top 10 mantissa bits (exact in
    TF32), lo = x - hi (exact in float32)."""
    hi = mx.stop_gradient((x.view(mx.uint32) & 0xFFFFE000).view(mx.float32))  # autodiff flows through lo
    return hi, x - hi


def fp32_matmul(a: mx.array, b: mx.array) -> mx.array:
    """a @ b (any batch shape) at float32 accuracy on every backend; a, b float32. Differentiable:
    the gradients are float32-accurate products too (chunked KDA is trained through)."""
    return _split_product(a, b) if reduced_fp32_matmul() else a @ b


@mx.custom_function
def _split_product(a: mx.array, b: mx.array) -> mx.array:
    return split_matmul(a, b)


@_split_product.vjp
def _split_product_vjp(primals, cotangent, output):
    """d(a b) = (g b^T, a^T g), each a split product, summed over broadcast batch dimensions."""
    a, b = primals
    da = split_matmul(cotangent, mx.swapaxes(b, -1, -2))
    db = split_matmul(mx.swapaxes(a, -1, -2), cotangent)
    return _unbroadcast(da, a.shape), _unbroadcast(db, b.shape)


def _unbroadcast(g: mx.array, shape: tuple) -> mx.array:
    """Sum g over the leading dimensions that broadcasting added or expanded to reach `shape`."""
    extra = g.ndim - len(shape)
    if extra:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


def split_matmul(a: mx.array, b: mx.array, matmul=mx.matmul) -> mx.array:
    """a @ b as three products of TF32-exact halves (the small lo @ lo term, ~2^-20, is dropped).
    `matmul` is the GEMM used (tests pass one that rounds its inputs as TF32 hardware does)."""
    ah, al = _split(a)
    bh, bl = _split(b)
    return matmul(ah, bh) + (matmul(ah, bl) + matmul(al, bh))


def relative_error(out: mx.array, ref: mx.array) -> float:
    """||out - ref|| / ||ref|| in fp32 (NaN if out has NaN): the project's one relative-error
    measure (self-checks, doctor; tests keep tolerance tables against it)."""
    out, ref = out.astype(mx.float32).flatten(), ref.astype(mx.float32).flatten()
    return (mx.linalg.norm(out - ref) / mx.maximum(mx.linalg.norm(ref), 1e-30)).item()
