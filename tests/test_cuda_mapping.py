"""bench/gpu: the CUDA build of our Metal kernels, checked on the CPU (no GPU here).

bench/gpu/run_kernels.py turns the kernel bodies of metal/*.metal into CUDA (bench/gpu/metal_cuda.h
in place of the emulator's header) and runs them on an NVIDIA GPU; its results live in
bench/gpu/results_h200.json. What can be checked without a GPU is checked here: the sources it
generates carry each body verbatim with MLX's parameter order, its launches (a torch port of
MetalKDA) and float64 references agree with kda_naive when the kernels run on the CPU emulator,
and, where a libnvrtc is at hand ($MCUDA_NVRTC), every generated source compiles.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "gpu"))
import run_kernels as rk  # noqa: E402

from kimi_mlx.kda import kda_naive  # noqa: E402
from kimi_mlx.kda import metal  # noqa: E402


def test_loader_reads_the_same_kernels_as_metal_py():
    """run_kernels reads metal.py's load_sources out of its text (MLX-free): same kernels."""
    fields = lambda srcs: {n: (s.name, s.input_names, s.output_names, s.header, s.body)  # noqa: E731
                           for n, s in srcs.items()}
    assert fields(rk.SOURCES) == fields(metal.SOURCES)
    assert (rk.CHUNK, rk.SEGMENT, rk.DECODE_THREADS, rk.DECODE_ROWS) == (
        metal.CHUNK, metal.SEGMENT, metal.DECODE_THREADS, metal.DECODE_ROWS)


@pytest.mark.parametrize("fused, dtype", [(False, mx.float32), (True, mx.bfloat16)])
def test_cuda_source_wraps_the_body_verbatim(fused, dtype):
    ks = rk.SOURCES["kda_decode"]
    meta = [(4, dtype)] * 3 + [(4, mx.float32), (3, mx.float32), (1, mx.float32), (1, mx.float32),
                               (4, mx.float32), (0, mx.int32)]
    template = [("InT", dtype), ("StT", mx.float32), ("H", 4), ("Dk", 64), ("Dv", 32), ("Fused", fused)]
    src = rk.cuda_source(ks, meta, template, [dtype, mx.float32])
    assert src.text.startswith('#include "metal_cuda.h"') and "metal_emu.h" not in src.text
    assert ks.body in src.text and ks.header in src.text
    wrapper = src.text.split('#line 1 "<generated CUDA wrapper>"')[1]
    params = re.search(r"void mcuda_kda_decode\((.*?)\) \{", wrapper, re.S).group(1)
    names = [p.split()[-1] for p in params.split(",")]
    assert names == list(ks.input_names) + list(ks.output_names)  # MLX's order, attributes computed
    assert "const int32_t T" in params and "&" not in params  # the scalar by value
    assert f"using InT = {'bfloat16_t' if dtype == mx.bfloat16 else 'float'};" in src.text
    assert "mcuda::threadgroup_position_in_grid()" in wrapper


def small_inputs(B=2, T=70, H=2, Dk=32, Dv=32):
    raw = rk.raw_inputs(B, T, H, Dk, Dv, "cpu", 3)
    return raw, rk.plain_inputs(raw)


def test_float64_references_match_kda_naive():
    raw, (q, k, v, g, beta, state) = small_inputs()
    o, s = rk.naive(q, k, v, g, beta, state)
    mo, ms = kda_naive(*(mx.array(x.numpy()) for x in (q, k, v, g, beta, state)))
    assert rk.rel_err(torch.from_numpy(np.array(mo)), o) < 2e-6
    assert rk.rel_err(torch.from_numpy(np.array(ms)), s) < 2e-6
    # the chunk route's pieces: glue + definitions in float64, no kernel involved
    kda = rk.TorchMetalKDA(rk.EmuBackend())
    Aqk, Akk, bc, R, QS, KS, decay, (B, H, N, Dk) = kda.chunk_terms(q, k, v, g, beta)
    ua = kda.ut_args(Akk, bc, R)
    X = rk.ref_ut(*ua["inputs"]).reshape(B, H, N, rk.CHUNK, -1)
    U, OI, S = rk.ref_chunk_state(X[..., :Dk], QS, KS, X[..., Dk:], decay, state)
    oc = (Aqk @ U + OI).reshape(B, H, -1, v.shape[-1])[:, :, : q.shape[1]].transpose(1, 2)
    assert rk.rel_err(oc, o) < 2e-6 and rk.rel_err(S, s) < 2e-6


def test_driver_on_the_cpu_emulator_matches_float64():
    """The GPU run's launch code, with the emulator as its kernels: both routes and Fused."""
    raw, (q, k, v, g, beta, state) = small_inputs()
    ref_o, ref_s = rk.naive(q, k, v, g, beta, state)
    kda = rk.TorchMetalKDA(rk.EmuBackend())
    for o, s in (kda.decode(q, k, v, g, beta, state), kda.prefill(q, k, v, g, beta, state)):
        assert rk.rel_err(o, ref_o) < 1e-5 and rk.rel_err(s, ref_s) < 1e-5
    qr, kr, vv, f, b, A_log, dt_bias, st = raw
    qn, kn, gg, bb = rk.prologue(qr, kr, f, b, A_log, dt_bias)
    fo, fs = rk.naive(qn, kn, vv, gg, bb, st)
    o, s = kda.decode(qr, kr, vv, f, b, st, A_log, dt_bias)
    assert rk.rel_err(o, fo) < 1e-5 and rk.rel_err(s, fs) < 1e-5


def test_results_file_has_every_check_passing():
    """The committed GPU results: nothing failed, and every kernel was run."""
    import json

    path = ROOT / "bench" / "gpu" / "results_h200.json"
    if not path.exists():
        pytest.skip("no GPU results committed")
    data = json.loads(path.read_text())
    assert data["failures"] == []
    kernels = {r["kernel"] for r in data["correctness"]}
    assert {"kda_decode", "kda_decode Fused", "kda_chunk_ut", "kda_chunk_state", "chunk route"} <= kernels


@pytest.mark.skipif(not os.environ.get("MCUDA_NVRTC"), reason="set $MCUDA_NVRTC to a libnvrtc.so to compile")
def test_every_generated_source_compiles_with_nvrtc(tmp_path):
    backend = rk.NvrtcCheckBackend(os.environ["MCUDA_NVRTC"])
    kda = rk.TorchMetalKDA(backend)
    raw, (q, k, v, g, beta, state) = small_inputs(Dk=64, Dv=32)
    kda.decode(q, k, v, g, beta, state)
    kda.decode(raw[0], raw[1], raw[2], raw[3], raw[4], raw[7], raw[5], raw[6])
    kda.prefill(q, k, v, g, beta, state)
    assert len(backend.compiled) == 4 and not backend.failures, backend.failures[:1]
