"""Our .metal kernels on MLX's CUDA backend, checked on the CPU (no GPU here).

What the CUDA route adds to the Metal one is small and checked here: the choice of backend by
the DEFAULT device; the kernel factory (mx.fast.cuda_kernel gets metal/cuda_compat.h + the .metal
header, and the body verbatim); that every Metal name the bodies use is mapped by the header;
and, where nvcc is at hand, that each kernel configuration compiles as the CUDA translation unit
MLX 0.32 writes (mlx/backend/cuda/custom_kernel.cpp: the header, then a __global__ function in
namespace mlx::core::cu with one pointer per input and output and the template arguments as
constants, then the body). The math of the same bodies runs on the CPU emulator in
test_metal_kernels.py; here the emulator also stands in behind a mocked mx.fast.cuda_kernel, so
the whole CUDA dispatch (default device -> factory -> self-check -> kernels) runs end to end.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings

import mlx.core as mx
import numpy as np
import pytest
from metal_emu import emulate
from tiny import TINY_CONFIG, tiny_model

from kimi_mlx import decode as decode_mod
from kimi_mlx.cache import KDACache
from kimi_mlx.kda import dispatch, metal, set_kda_path
from kimi_mlx.precision import relative_error

# MLX's type names in the CUDA signature (custom_kernel.cpp, dtype_to_cuda_type).
CUDA_TYPES = {mx.float32: "float", mx.bfloat16: "__nv_bfloat16", mx.float16: "__half", mx.int32: "int32_t", mx.uint32: "uint32_t"}
# The CUDA translation unit MLX writes begins with its own prelude; this stands in for
# mlx/backend/cuda/device/utils.cuh (the part of it the bodies rely on: the half types).
PRELUDE = "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cooperative_groups.h>\n"


def mlx_cuda_source(name: str, ks: metal.KernelSource, in_dtypes, out_dtypes, template) -> str:
    """The translation unit mx.fast.cuda_kernel compiles for this kernel instance (MLX 0.32)."""
    lines = [PRELUDE + metal.CUDA_COMPAT + ks.header, "namespace mlx::core::cu {",
             "namespace cg = cooperative_groups;", f"__global__ void custom_kernel_{name}("]
    params = [f"    const {CUDA_TYPES[d]}* {n}" for n, d in zip(ks.input_names, in_dtypes)]
    params += [f"    {CUDA_TYPES[d]}* {n}" for n, d in zip(ks.output_names, out_dtypes)]
    lines.append(",\n".join(params) + ") {")
    for n, v in template:
        if isinstance(v, bool):
            lines.append(f"  constexpr bool {n} = {'true' if v else 'false'};")
        elif isinstance(v, int):
            lines.append(f"  constexpr int {n} = {v};")
        else:
            lines.append(f"  using {n} = {CUDA_TYPES[v]};")
    return "\n".join(lines) + "\n" + ks.body + "\n}\n} // namespace mlx::core::cu\n"


class Recorder:
    """A stand-in for mx.fast.cuda_kernel: records what it is given and runs the kernel on the
    CPU emulator (the Metal text, i.e. the header without cuda_compat.h in front)."""

    def __init__(self):
        self.calls = []  # (name, header, source)
        self.launches = []  # (name, template, grid, threadgroup)

    def __call__(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 shared_memory=0):
        self.calls.append((name, header, source))
        assert header.startswith(metal.CUDA_COMPAT)
        kern = emulate.EmuKernel(name, input_names, output_names, source, header[len(metal.CUDA_COMPAT):])

        def launch(**kw):
            self.launches.append((name, kw.get("template"), kw["grid"], kw["threadgroup"]))
            return kern(**kw)

        return launch


@pytest.fixture
def fake_cuda(monkeypatch):
    """The default device a GPU without Metal (so MLX's CUDA backend), mx.fast.cuda_kernel the
    Recorder; the real dispatch otherwise (no _use_backend override)."""
    rec = Recorder()
    monkeypatch.delenv(metal.ENV_VAR, raising=False)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(mx.fast, "cuda_kernel", rec)
    metal._use_backend(None)
    metal._backends.clear()
    yield rec
    metal._use_backend(None)
    metal._backends.clear()
    metal.set_kernel_mode(None)


def test_backend_is_the_default_devices(monkeypatch):
    """Chosen by mx.default_device(), not by what is installed: a CPU default means no kernels
    even where Metal exists; a GPU default is Metal's when Metal is available, else CUDA's."""
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "default_device", lambda: mx.cpu)
    assert metal.gpu_backend() is None
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    assert metal.gpu_backend() == "metal"
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    assert metal.gpu_backend() == "cuda"
    assert metal.kernel_factory("cuda") is metal.cuda_kernel
    assert metal.kernel_factory("metal") is mx.fast.metal_kernel


def test_cuda_route_end_to_end(fake_cuda, monkeypatch):
    """On a (pretend) CUDA default device: auto picks our kernels for one token after the
    self-check, built by cuda_kernel with the mapping header and the body verbatim."""
    shape = (2, 32, 32, mx.float32, mx.float32)
    assert dispatch.get_kda_path(1, shape) == "metal"
    assert dispatch.get_kda_path(200, shape) == "metal"  # KERNEL_MAX_T["cuda"]: every T (measured)
    monkeypatch.setitem(dispatch.KERNEL_MAX_T, "cuda", 1)
    assert dispatch.get_kda_path(200, shape) == "chunked"  # past the limit: the ops path
    assert metal.kernel_backend() == "cuda"
    assert metal._checked == {("cuda", *shape): None}
    for name, header, source in fake_cuda.calls:
        base = name.split("__")[0]
        ks = metal.SOURCES[base]
        assert header == metal.CUDA_COMPAT + ks.header and source == ks.body
        assert re.fullmatch(rf"{base}__[0-9a-f]{{10}}_(f32|bf16|f16|i32)+", name)
    assert {n.split("__")[0] for n, _, _ in fake_cuda.calls} == {"kda_decode"}
    assert dispatch.layer_kernel_ready(2, 32, 32, 4, mx.bfloat16)
    # The launch is the Metal one: grid in threads, one threadgroup per (b, h, rows).
    name, template, grid, tg = fake_cuda.launches[-1]
    assert dict(template)["Layer"] and grid == (4 * 32, 1, 2 * 2) and tg == (4 * 32, 1, 1)


def test_cuda_self_check_failure_warns_once_and_uses_ops(fake_cuda, monkeypatch):
    """A kernel that does not compile on CUDA (here: the factory raises) costs one warning and
    the ops path in auto mode, an error when the kernels are forced."""

    def broken(**kw):
        raise RuntimeError("Failed to compile kernel: (pretend NVRTC error)")

    monkeypatch.setattr(mx.fast, "cuda_kernel", broken)
    with pytest.warns(RuntimeWarning, match="self-check failed on cuda: kernel failed .*NVRTC"):
        assert dispatch.get_kda_path(1, (2, 32, 32, mx.float32, mx.float32)) == "naive"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the path for one token is not ours now
        assert not dispatch.layer_kernel_ready(2, 32, 32, 4, mx.float32)
    metal.set_kernel_mode("metal")
    with pytest.raises(RuntimeError, match="kernels forced"):
        metal.kda_metal(*[mx.zeros(s) for s in ((1, 1, 2, 32),) * 3], mx.zeros((1, 1, 2, 32)), mx.zeros((1, 1, 2)))


def test_instance_names_separate_input_dtypes(monkeypatch):
    """MLX caches a compiled kernel by name + template arguments only: q/k dtype changes the
    signature but no template argument, so it must change the name."""
    rec = Recorder()
    monkeypatch.setattr(mx.fast, "cuda_kernel", rec)
    kern = metal.MetalKDA(metal.cuda_kernel, backend="cuda")
    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.standard_normal((1, 2, 2, 32)).astype(np.float32)) for _ in range(3))
    g, beta, s = -mx.abs(q), mx.full((1, 2, 2), 0.5), mx.zeros((1, 2, 32, 32))
    kern.decode(q, k, v, g, beta, s)
    kern.decode(q.astype(mx.bfloat16), k.astype(mx.bfloat16), v, g, beta, s)
    names = [n for n, _, _ in rec.calls]
    assert len(names) == 2 and names[0] != names[1] and names[0].split("_")[-1] != names[1].split("_")[-1]


def test_every_metal_name_the_bodies_use_is_mapped():
    """Each Metal thread attribute a body names is a macro of cuda_compat.h (CUDA's signature has
    none), and so are threadgroup memory, the barrier and the SIMD functions the bodies call."""
    header = metal.CUDA_COMPAT
    for ks in _all_sources().values():
        text = ks.header + ks.body
        for attr, _ in emulate.METAL_ATTRIBUTES:
            if re.search(rf"\b{attr}\b", text):
                assert re.search(rf"^#define {attr}\b", header, re.M), f"{ks.name}: {attr} not mapped"
        for fn in set(re.findall(r"\b(simd_\w+|threadgroup_barrier|simdgroup_barrier)\s*\(", text)):
            assert re.search(rf"\b{fn}\s*\(", header), f"{ks.name}: {fn} not mapped"
        assert "KDA_FUNC" in header and not re.search(r"^\s*inline\b", ks.header, re.M), \
            "helper functions must carry KDA_FUNC (__device__ in CUDA)"
        for word in ("device", "constant", "thread"):  # would break CUDA's own __device__ (see the header)
            assert not re.search(rf"\b{word}\b", re.sub(r"//.*", "", text)), f"{ks.name} uses `{word}`"


def _all_sources():
    """Every kernel of metal/*.metal: the KDA kernels and the MoE route kernel."""
    from kimi_mlx import moe_route

    return {**metal.SOURCES, "moe_route": moe_route.SOURCE}


def _configs():
    f32, bf, i32, u32 = mx.float32, mx.bfloat16, mx.int32, mx.uint32
    dec = lambda layer, dt, thr, rows: [  # noqa: E731
        ("InT", dt), ("StT", f32), ("H", 32), ("Dk", 128), ("Dv", 128), ("K", 4 if layer else 1), ("Layer", layer),
        ("Threads", thr), ("Rows", rows)]
    return {
        "kda_decode plain bf16": ("kda_decode", [bf] * 3 + [f32] * 5 + [i32] + [f32] * 7, [bf, f32, bf, bf, bf],
                                  dec(False, bf, metal.DECODE_THREADS, metal.DECODE_ROWS)),
        "kda_decode plain f32": ("kda_decode", [f32] * 8 + [i32] + [f32] * 7, [f32] * 5,
                                 dec(False, f32, metal.DECODE_THREADS, metal.DECODE_ROWS)),
        "kda_decode layer bf16": ("kda_decode", [bf] * 5 + [f32] * 3 + [i32] + [bf] * 6 + [f32], [bf, f32, bf, bf, bf],
                                  dec(True, bf, 512, 128)),
        "moe_route 256 experts top-8": ("moe_route", [f32] * 3, [u32, f32],
                                        [("E", 256), ("K", 8), ("Threads", 256), ("Renorm", True), ("Shared", True)]),
        "moe_route 1100 experts top-5": ("moe_route", [f32] * 3, [u32, f32],
                                         [("E", 1100), ("K", 5), ("Threads", 1024), ("Renorm", False),
                                          ("Shared", False)]),
    }


@pytest.mark.parametrize("config", list(_configs()))
def test_each_kernel_compiles_as_mlx_writes_it(config, tmp_path):
    """nvcc (sm_90, the H200's) compiles every kernel configuration as MLX's CUDA backend would
    build it. Skipped without nvcc (CI); this catches a mapping that only the GPU would reveal."""
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if shutil.os.path.exists("/usr/local/cuda/bin/nvcc")
                                    else None)
    if nvcc is None:
        pytest.skip("nvcc not available")
    kernel, ins, outs, template = _configs()[config]
    src = tmp_path / "k.cu"
    src.write_text(mlx_cuda_source("k", _all_sources()[kernel], ins, outs, template))
    proc = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-ptx", "-o", str(tmp_path / "k.ptx"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --- the layer step wired into the model (emulator as the GPU) -------------------------------

@pytest.fixture
def emulated_kernels(monkeypatch):
    monkeypatch.delenv(metal.ENV_VAR, raising=False)
    metal._use_backend(metal.MetalKDA(emulate.kernel_factory("free")), available=True)
    yield
    metal._use_backend(None)
    set_kda_path(None)


def _greedy(model, prompt, steps: int, kda: str, decode: str = "eager") -> list[mx.array]:
    """Logits of greedy decode steps; eager by default: the emulator runs on the host, so it
    cannot sit inside a compiled trace (the default decode path on a GPU)."""
    set_kda_path(kda)
    decode_mod.set_decode_path(decode)
    try:
        cache = model.make_cache()
        logits = model(prompt, cache=cache)[:, -1:]
        out = []
        for _ in range(steps):
            logits = model(mx.argmax(logits[:, -1], axis=-1)[:, None], cache=cache)
            out.append(logits)
        mx.eval(out)
        return out
    finally:
        set_kda_path(None)
        decode_mod.set_decode_path(None)


def test_model_decode_through_the_layer_kernel_matches_naive(emulated_kernels, monkeypatch):
    """Eager decode, batch 2, prompt of 37 tokens, KDA path forced to our kernels: every KDA layer's
    one-token step runs as the Layer kernel (counted), and the logits match the naive recurrence."""
    model = tiny_model(32)
    prompt = mx.random.randint(3, TINY_CONFIG["vocab_size"], (2, 37), key=mx.random.key(5))
    ref = _greedy(model, prompt, 3, "naive")
    calls = []
    layer = metal.MetalKDA.layer
    monkeypatch.setattr(metal.MetalKDA, "layer", lambda self, *a: (calls.append(a[0].shape), layer(self, *a))[1])
    out = _greedy(model, prompt, 3, "metal")
    n_kda = sum(1 for lyr in model.layers if lyr.is_kda)
    assert len(calls) == 3 * n_kda + 2  # 3 tokens per KDA layer, and the self-check's T=1 and T=3
    for o, r in zip(out, ref):
        assert relative_error(o, r) < 1e-4


def test_compiled_step_function_with_the_kernel_matches_ops(emulated_kernels):
    """decode.py's KDA step with the kernel branch (fused projections, stacked conv weights) equals
    its ops branch; called untraced here (the emulator runs on the host, not inside mx.compile)."""
    model = tiny_model(32)
    layer = next(lyr for lyr in model.layers if lyr.is_kda)
    attn = layer.self_attn
    B, C, K = 2, attn.num_heads * attn.head_dim, attn.q_conv.kernel_size
    key = iter(mx.random.split(mx.random.key(9), 8))
    x = mx.random.normal((B, 1, TINY_CONFIG["hidden_size"]), key=next(key))
    windows = [mx.random.normal((B, K - 1, C), key=next(key)) for _ in range(3)]
    state = 0.3 * mx.random.normal((B, attn.num_heads, attn.head_dim, attn.head_dim), key=next(key))
    fused = decode_mod._fused_arrays([*decode_mod._kda_fusions(layer), decode_mod._mlp_fusion(layer)])
    set_kda_path("metal")
    assert attn.kernel_step_ready(x.dtype)
    outs = [decode_mod._kda_step(layer, kernel)(x, *windows, state, *fused) for kernel in (False, True)]
    for a, b in zip(outs[0][:-1], outs[1][:-1]):
        assert relative_error(b, a) < 1e-5
    assert relative_error(outs[1][-1], outs[0][-1]) < 1e-5
    c = KDACache()  # the eager layer's kernel step gives the same
    c.conv, c.recurrent = list(windows), state
    h = layer.self_attn(layer.input_layernorm(x), None, c)
    assert c.offset == 1 and relative_error(c.recurrent, outs[0][-1]) < 1e-5
    assert h.shape == x.shape


def test_compiled_decode_with_the_kernel_between_traces_matches_naive(emulated_kernels, monkeypatch):
    """decode.KERNEL_IN_TRACE False: a KDA step is a compiled projection trace, the Layer kernel,
    a compiled finish trace (runs on the CPU too, the kernel being outside the traces); the
    logits match the naive recurrence's, and each KDA layer holds exactly those two traces."""
    model = tiny_model(32)
    prompt = mx.random.randint(3, TINY_CONFIG["vocab_size"], (2, 5), key=mx.random.key(6))
    ref = _greedy(model, prompt, 2, "naive")
    monkeypatch.setattr(decode_mod, "KERNEL_IN_TRACE", False)
    out = _greedy(model, prompt, 2, "metal", decode="compiled")
    for o, r in zip(out, ref):
        assert relative_error(o, r) < 1e-4
    kda = next(lyr for lyr in model.layers if lyr.is_kda)
    kinds = {k[0] for k, f in kda.__dict__["_decode_fns"].items() if f is not None}
    assert kinds == {"kda_project", "kda_finish"}


def test_a_trace_that_cannot_hold_the_kernel_falls_back_to_the_split_step(emulated_kernels):
    """If the kernel fails inside the layer's trace (here: the emulator, which runs on the host,
    as a GPU kernel that mx.compile refused would), one warning, then the kernel between two
    traces: still compiled, still the kernel, same logits as the naive recurrence."""
    model = tiny_model(32)
    prompt = mx.random.randint(3, TINY_CONFIG["vocab_size"], (1, 4), key=mx.random.key(7))
    ref = _greedy(model, prompt, 2, "naive")
    decode_mod._warned.clear()
    with pytest.warns(RuntimeWarning, match="compiled decode step failed"):
        out = _greedy(model, prompt, 2, "metal", decode="compiled")
    for o, r in zip(out, ref):
        assert relative_error(o, r) < 1e-4
    kda = next(lyr for lyr in model.layers if lyr.is_kda)
    fns = {k[0]: f for k, f in kda.__dict__["_decode_fns"].items()}
    assert fns["kda_kernel"] is None and fns["kda_project"] is not None and fns["kda_finish"] is not None
