"""Run our Metal KDA kernels' bodies (metal/*.metal, unchanged) as CUDA on an NVIDIA GPU, check
them against a float64 recurrence and time them against the bytes they must move.

    python bench/gpu/run_kernels.py                    # on a CUDA machine: CuPy (NVRTC) + torch
    python bench/gpu/run_kernels.py --quick            # test shapes + a short real-shape run
    python bench/gpu/run_kernels.py --backend emu --quick   # same driver, kernels on the CPU
                                                       # emulator (tests/metal_emu): for checking
                                                       # this script where there is no GPU
    python bench/gpu/run_kernels.py --compile-only --nvrtc /path/libnvrtc.so.12
                                                       # syntax-check every generated source

How a kernel becomes CUDA: the body and header come from the .metal files through
kimi_mlx/kda/metal.py's own `load_sources` (read out of that file with `ast`, since importing
the package needs MLX); the function around the body is written by the CPU emulator's code
(tests/metal_emu/emulate.py, `EmuKernel._cpp`: MLX's parameter order, template arguments as
constants). Only its launcher is swapped: bench/gpu/metal_cuda.h replaces metal_emu.h, and a
__global__ wrapper computes the Metal attributes from the CUDA indices. Where MLX is missing
(the GPU machine), a stand-in `mlx.core` with just the dtype objects lets emulate.py import.

The launch code is a torch port of kimi_mlx.kda.metal.MetalKDA (same grids, templates, inputs);
the chunk route's MLX glue (decay grams, cumulative decays, o = A_qk U + OI) is done here in
float64, so what is measured is the kernels. Truth: the recurrence of kimi_mlx/kda/naive.py in
float64 (torch, on the GPU). Each fp32 row also shows `fp32 loop`: the same naive recurrence
done in fp32 torch, i.e. what fp32 arithmetic alone costs against float64.

Prints a table of correctness, then timings (CUDA graphs of back-to-back launches, median),
and writes JSON to $OUT (or --out). Not a test.
"""

from __future__ import annotations

import __future__
import argparse
import ast
import ctypes
import hashlib
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HBM_BW = 4.8e12  # H200 HBM3e, bytes/s
FP32_PEAK = 67e12  # H200 (H100 SXM compute) fp32 non-tensor, FLOP/s
B_TEST, H_TEST = 2, 4
TEST_T = (1, 63, 64, 65, 300)
TEST_DIMS = ((32, 32), (64, 64), (128, 128), (64, 128), (128, 32))
REAL_H, REAL_D = 32, 128  # Kimi-Linear KDA: 32 heads x 128
# Relative error ||out - ref|| / ||ref|| allowed against the float64 recurrence, by the dtype the
# output is rounded to and the kernel's compile mode.
TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float32 fast-math": 1e-4}


# ---------------------------------------------------------------------------------------------
# The emulator's code and metal.py's loader, without MLX if need be
# ---------------------------------------------------------------------------------------------

def _install_mlx_standin() -> None:
    """A minimal `mlx.core` (dtype objects, Dtype, array) so tests/metal_emu/emulate.py imports
    where MLX is not installed. Its source-writing code only uses these as dictionary keys."""
    core = types.ModuleType("mlx.core")

    class Dtype:
        def __init__(self, name: str):
            self.name = name

        def __repr__(self) -> str:
            return f"mlx.core.{self.name}"

    for name in ("float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint64", "uint32",
                 "uint16", "uint8", "bool_"):
        setattr(core, name, Dtype(name))
    core.Dtype = Dtype
    core.array = type("array", (), {})
    core.__stand_in__ = True
    pkg = types.ModuleType("mlx")
    pkg.__path__ = []
    pkg.core = core
    sys.modules["mlx"], sys.modules["mlx.core"] = pkg, core


if os.environ.get("MCUDA_STUB_MLX") == "1":
    _install_mlx_standin()
else:
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        _install_mlx_standin()

sys.path.insert(0, str(ROOT / "tests"))
from metal_emu import emulate  # noqa: E402

mx = emulate.mx
MX_STANDIN = getattr(mx, "__stand_in__", False)


def _load_metal_py() -> dict:
    """load_sources / _load_all / KernelSource / supports / _metal_dir and the launch constants of
    kimi_mlx/kda/metal.py, executed from that file's own text (importing the module needs MLX)."""
    path = ROOT / "kimi_mlx" / "kda" / "metal.py"
    tree = ast.parse(path.read_text(), str(path))
    names = {"METAL_DIR", "CHUNK", "SEGMENT", "DECODE_THREADS", "DECODE_ROWS", "_MARK"}
    funcs = {"KernelSource", "load_sources", "_load_all", "supports", "_metal_dir"}
    keep = []
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = [t for tgt in node.targets for t in (tgt.elts if isinstance(tgt, ast.Tuple) else [tgt])]
            if targets and all(isinstance(t, ast.Name) and t.id in names for t in targets):
                keep.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in funcs:
            keep.append(node)
    mod = types.ModuleType("_kimi_mlx_kda_metal_loader")  # dataclass looks its module up
    mod.__file__ = str(path)
    sys.modules[mod.__name__] = mod
    ns = mod.__dict__
    ns.update(re=re, Path=Path, dataclass=dataclass)
    code = compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, ns)
    missing = (names | funcs) - set(ns)
    if missing:
        raise RuntimeError(f"{path}: not found: {sorted(missing)}")
    return ns


METAL = _load_metal_py()
SOURCES, _err = METAL["_load_all"]()
if _err:
    raise SystemExit(f"run_kernels: {_err}")
CHUNK, SEGMENT = METAL["CHUNK"], METAL["SEGMENT"]
DECODE_THREADS, DECODE_ROWS = METAL["DECODE_THREADS"], METAL["DECODE_ROWS"]

TORCH_TO_MX = {torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16,
               torch.int32: mx.int32, torch.int64: mx.int64, torch.uint8: mx.uint8, torch.int8: mx.int8,
               torch.int16: mx.int16, torch.bool: mx.bool_}
MX_TO_TORCH = {v: k for k, v in TORCH_TO_MX.items()}


# ---------------------------------------------------------------------------------------------
# CUDA source of one kernel instance
# ---------------------------------------------------------------------------------------------

GENERATED_LAUNCHER = '#line 1 "<generated launcher>"'
ATTRIBUTES = {name for name, _ in emulate.METAL_ATTRIBUTES}


@dataclass
class CudaSource:
    name: str        # the __global__ function
    text: str
    slots: list      # what each parameter of the __global__ function holds (emulate's slot names)


def cuda_source(ks, in_meta, template, output_dtypes) -> CudaSource:
    """The CUDA translation unit for kernel `ks` (a metal.py KernelSource) with inputs of
    (ndim, mx dtype) `in_meta`, template arguments and output dtypes, as MLX instantiates it."""
    kern = emulate.EmuKernel(ks.name, ks.input_names, ks.output_names, ks.body, ks.header)
    arrays = [(np.empty((1,) * nd), dt) for nd, dt in in_meta]
    src, slots = kern._cpp(arrays, list(template), list(output_dtypes))
    head, sep, _ = src.partition(GENERATED_LAUNCHER)
    if not sep or '#include "metal_emu.h"' not in head:
        raise RuntimeError("emulate.py's generated source changed shape: update bench/gpu/run_kernels.py")
    head = head.replace('#include "metal_emu.h"', '#include "metal_cuda.h"', 1)
    func = f"custom_kernel_{ks.name}"
    m = re.search(rf"void {func}\(\n    (.*?)\) \{{\n", head, re.S)
    if not m:
        raise RuntimeError(f"no signature of {func} in the generated source")
    params = m.group(1).split(",\n    ")
    buffers, attrs = params[: len(slots)], params[len(slots):]
    for p in attrs:
        if p.split()[-1] not in ATTRIBUTES:
            raise RuntimeError(f"{func}: unexpected parameter {p!r}")
    wparams, args = [], []
    for p in buffers:
        ref = re.fullmatch(r"const (\S+)& (\w+)", p)  # a 0-d input: by value in a __global__
        wparams.append(f"const {ref.group(1)} {ref.group(2)}" if ref else p)
        args.append(p.split()[-1])
    args += [f"mcuda::{p.split()[-1]}()" for p in attrs]
    name = f"mcuda_{ks.name}"
    sep = ",\n    "
    wrapper = "\n".join([
        '#line 1 "<generated CUDA wrapper>"',
        f'extern "C" __global__ void {name}(\n    {sep.join(wparams)}) {{',
        f"  {func}({', '.join(args)});",
        "}",
        "",
    ])
    return CudaSource(name, head + wrapper, slots)


# ---------------------------------------------------------------------------------------------
# Backends: CuPy/NVRTC on the GPU, the CPU emulator, NVRTC compile-only
# ---------------------------------------------------------------------------------------------

def nvrtc_options(fast_math: bool) -> list[str]:
    opts = ["-default-device", "-std=c++17", f"-I{HERE}", *os.environ.get("MCUDA_NVRTC_OPTS", "").split()]
    return opts + (["--use_fast_math"] if fast_math else [])


class CudaBackend:
    kind = "cuda"
    device = "cuda"

    def __init__(self):
        import cupy as cp

        self.cp = cp
        self._mods: dict[str, object] = {}
        self.compile_s = 0.0

    def function(self, src: CudaSource, fast_math: bool):
        key = hashlib.sha256((src.text + str(fast_math)).encode()).hexdigest()
        if key not in self._mods:
            t0 = time.perf_counter()
            mod = self.cp.RawModule(code=src.text, options=tuple(nvrtc_options(fast_math)), backend="nvrtc")
            fn = mod.get_function(src.name)
            self.compile_s += time.perf_counter() - t0
            self._mods[key] = (mod, fn)
        return self._mods[key][1]

    def probe_headers(self) -> bool:
        """Whether metal_cuda.h found cuda_bf16.h here (else its own bfloat/half)."""
        src = CudaSource("mcuda_probe", '#include "metal_cuda.h"\nextern "C" __global__ void mcuda_probe(int* o) {\n'
                         "#ifdef MCUDA_HAVE_CUDA_HEADERS\n  o[0] = 1;\n#else\n  o[0] = 0;\n#endif\n}\n", [])
        out = torch.full((1,), -1, dtype=torch.int32, device="cuda")
        self.launch_fn(self.function(src, False), (1, 1, 1), (1, 1, 1), [out])()
        return bool(out.item() == 1)

    def arg(self, x):
        if isinstance(x, torch.Tensor):
            assert x.is_cuda and x.is_contiguous()
            return self.cp.asarray(x.reshape(-1).view(torch.uint8))  # the pointer is what counts
        return x  # numpy scalar

    def launch_fn(self, fn, blocks, threads, args):
        cargs = tuple(self.arg(a) for a in args)
        return lambda: fn(blocks, threads, cargs)


class NvrtcCheckBackend:
    """Compiles every source with a local libnvrtc (no GPU) and runs nothing: outputs stay NaN."""

    kind = "compile-only"
    device = "cpu"

    def __init__(self, lib: str, arch: str = "compute_90"):
        self.lib = ctypes.CDLL(lib)
        self.arch = arch
        self.compiled: dict[str, str] = {}
        self.failures: list[str] = []
        self.compile_s = 0.0

    def function(self, src: CudaSource, fast_math: bool):
        key = hashlib.sha256((src.text + str(fast_math)).encode()).hexdigest()
        if key in self.compiled:
            return None
        t0 = time.perf_counter()
        prog = ctypes.c_void_p()
        lib = self.lib
        assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.text.encode(), f"{src.name}.cu".encode(), 0, None, None) == 0
        opts = [o.encode() for o in nvrtc_options(fast_math) + [f"-arch={self.arch}"]]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, log)
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
        self.compile_s += time.perf_counter() - t0
        self.compiled[key] = log.value.decode(errors="replace")
        if rc != 0:
            self.failures.append(f"{src.name}: rc {rc}\n{self.compiled[key]}\n--- source ---\n{src.text}")
        return None

    def launch_fn(self, fn, blocks, threads, args):
        return lambda: None


class EmuBackend:
    """The kernels on tests/metal_emu (needs MLX): this driver, checked without a GPU."""

    kind = "emu"
    device = "cpu"
    compile_s = 0.0


class Kernel:
    """One kernel of metal/*.metal with mx.fast.metal_kernel's call signature, on torch tensors."""

    def __init__(self, ks, backend, fast_math: bool = False):
        self.ks, self.backend, self.fast_math = ks, backend, fast_math

    @staticmethod
    def _input(x, device):
        if isinstance(x, bool):
            x = torch.tensor(x, dtype=torch.bool)
        elif isinstance(x, int):
            x = torch.tensor(x, dtype=torch.int32)
        elif isinstance(x, float):
            x = torch.tensor(x, dtype=torch.float32)
        return x.to(device).contiguous()  # MLX's ensure_row_contiguous

    def prepare(self, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes, init_value=None):
        """(launch, outputs): launch() runs the kernel once, writing into outputs (torch)."""
        dev = self.backend.device
        ins = [self._input(x, dev) for x in inputs]
        outs = []
        for shape, dt in zip(output_shapes, output_dtypes):
            tdt = MX_TO_TORCH[dt]
            if init_value is None:  # NaN: an element the kernel never writes shows
                o = torch.full((math.prod(shape) * torch.empty((), dtype=tdt).element_size(),), 255,
                               dtype=torch.uint8, device=dev).view(tdt).reshape(shape)
            else:
                o = torch.full(tuple(shape), init_value, dtype=tdt, device=dev)
            outs.append(o)
        if self.backend.kind == "emu":
            return self._prepare_emu(ins, template, grid, threadgroup, output_shapes, output_dtypes, init_value, outs)

        for d in range(3):
            if grid[d] % threadgroup[d]:
                raise ValueError(f"{self.ks.name}: grid {grid} is not a whole number of threadgroups {threadgroup}")
        blocks = tuple(g // t for g, t in zip(grid, threadgroup))
        if blocks[1] > 65535 or blocks[2] > 65535:
            raise ValueError(f"{self.ks.name}: {blocks} threadgroups: CUDA allows at most 65535 in y and z")
        meta = [(x.ndim, TORCH_TO_MX[x.dtype]) for x in ins]
        src = cuda_source(self.ks, meta, template, output_dtypes)
        fn = self.backend.function(src, self.fast_math)
        args = []
        for slot in src.slots:
            kind, i = slot.split(":")
            i = int(i)
            if kind == "out":
                args.append(outs[i])
            elif kind == "in":
                x = ins[i]
                if x.ndim == 0:  # by value
                    np_dt = {torch.int32: np.int32, torch.float32: np.float32, torch.int64: np.int64,
                             torch.bool: np.bool_}[x.dtype]
                    args.append(np_dt(x.item()))
                else:
                    args.append(x)
            elif kind == "shape":
                args.append(torch.tensor(ins[i].shape, dtype=torch.int32, device=dev))
            elif kind == "strides":
                args.append(torch.tensor(ins[i].stride(), dtype=torch.int64, device=dev))
            elif kind == "ndim":
                args.append(np.int32(ins[i].ndim))
        launch = self.backend.launch_fn(fn, blocks, tuple(threadgroup), args)
        return launch, outs

    def _prepare_emu(self, ins, template, grid, threadgroup, output_shapes, output_dtypes, init_value, outs):
        kern = emulate.EmuKernel(self.ks.name, self.ks.input_names, self.ks.output_names, self.ks.body,
                                 self.ks.header)

        def to_mx(x):
            if x.ndim == 0:
                return x.item() if x.dtype != torch.float32 else mx.array(x.item(), dtype=mx.float32)
            if x.dtype == torch.bfloat16:
                return mx.array(x.view(torch.int16).numpy().view(np.uint16)).view(mx.bfloat16)
            return mx.array(x.numpy())

        def launch():
            res = kern(inputs=[to_mx(x) for x in ins], template=list(template), grid=tuple(grid),
                       threadgroup=tuple(threadgroup), output_shapes=[tuple(s) for s in output_shapes],
                       output_dtypes=list(output_dtypes), init_value=init_value)
            for o, r in zip(outs, res):
                if o.dtype == torch.bfloat16:
                    o.copy_(torch.from_numpy(np.array(r.view(mx.uint16)).view(np.int16)).view(torch.bfloat16))
                else:
                    o.copy_(torch.from_numpy(np.array(r)))

        return launch, outs

    def __call__(self, **kw):
        launch, outs = self.prepare(**kw)
        launch()
        return outs


# ---------------------------------------------------------------------------------------------
# MetalKDA's launches (kimi_mlx/kda/metal.py), torch glue in float64
# ---------------------------------------------------------------------------------------------

def to_chunks(x: torch.Tensor, C: int, dtype) -> torch.Tensor:
    """[B, T, H, ...] -> [B, H, N, C, ...], zero-padded (as chunked._to_chunks)."""
    B, T, H = x.shape[:3]
    n = -(-T // C)
    x = x.to(dtype)
    if n * C != T:
        x = torch.cat([x, x.new_zeros((B, n * C - T, *x.shape[2:]))], dim=1)
    x = x.reshape(B, n, C, H, *x.shape[3:])
    return x.movedim(3, 1)


def decay_gram(X: torch.Tensor, K: torch.Tensor, G: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """A[m, t, j] = sum_c X[m, t, c] K[m, j, c] exp(G[m, t, c] - G[m, j, c]) for j <= t, else 0
    (float64, the pair tensor formed a batch of chunks at a time). X, K, G: [M, C, D]."""
    M, C, _ = X.shape
    lower = torch.ones(C, C, dtype=torch.bool, device=X.device).tril()
    out = torch.empty(M, C, C, dtype=X.dtype, device=X.device)
    for s in range(0, M, batch):
        sl = slice(s, s + batch)
        D = G[sl, :, None, :] - G[sl, None, :, :]  # [m, t, j, c], <= 0 where j <= t
        E = torch.where(lower[None, :, :, None], torch.exp(D.clamp(max=0)), torch.zeros((), dtype=D.dtype, device=D.device))
        out[sl] = torch.einsum("mtc,mjc,mtjc->mtj", X[sl], K[sl], E)
    return out


class TorchMetalKDA:
    """kimi_mlx.kda.metal.MetalKDA's launches on the CUDA (or emulated) kernels."""

    def __init__(self, backend, fast_math: bool = False, sources: dict | None = None):
        self.backend = backend
        self.kernels = {name: Kernel(ks, backend, fast_math) for name, ks in (sources or SOURCES).items()}

    def decode_args(self, q, k, v, g, beta, state, A_log=None, dt_bias=None):
        B, T, H, Dk = k.shape
        Dv = v.shape[-1]
        fused = A_log is not None
        unused = torch.zeros((1,), dtype=torch.float32, device=k.device)
        return dict(
            inputs=[q, k, v, g, beta, A_log if fused else unused, dt_bias if fused else unused, state, T],
            template=[("InT", TORCH_TO_MX[v.dtype]), ("StT", mx.float32), ("H", H), ("Dk", Dk), ("Dv", Dv),
                      ("Fused", fused), ("Threads", DECODE_THREADS), ("Rows", DECODE_ROWS)],
            grid=(DECODE_THREADS, Dv // DECODE_ROWS, B * H),
            threadgroup=(DECODE_THREADS, 1, 1),
            output_shapes=[(B, T, H, Dv), (B, H, Dv, Dk)],
            output_dtypes=[TORCH_TO_MX[v.dtype], mx.float32],
        )

    def decode(self, *a, **kw):
        y, state = self.kernels["kda_decode"](**self.decode_args(*a, **kw))
        return y, state

    def chunk_terms(self, q, k, v, g, beta):
        """The MLX-side inputs of one segment, float64: (Aqk, Akk, beta, R, QS, KS, decay)."""
        f64, C = torch.float64, CHUNK
        qc, kc, vc, gc, bc = (to_chunks(x, C, f64) for x in (q, k, v, g, beta))  # [B, H, N, C, ...]
        B, H, N = qc.shape[:3]
        Dk = kc.shape[-1]
        G = torch.cumsum(gc, dim=-2)
        flat = lambda x: x.reshape(B * H * N, C, x.shape[-1])  # noqa: E731
        Aqk = decay_gram(flat(qc), flat(kc), flat(G)).reshape(B, H, N, C, C)
        Akk = decay_gram(flat(kc), flat(kc), flat(G)).reshape(B, H, N, C, C)
        since = torch.exp(G)  # decay from the chunk start (inclusive)
        until = torch.exp(G[..., -1:, :] - G)  # to the chunk end, exclusive of t
        R = torch.cat([kc * since, vc], dim=-1)
        return Aqk, Akk, bc, R, qc * since, kc * until, since[..., -1, :], (B, H, N, Dk)

    def ut_args(self, Akk, bc, R):
        C = CHUNK
        B, H, N = R.shape[:3]
        W, M = R.shape[-1], B * H * N
        nt = min(256, -(-W // 32) * 32)
        f32 = torch.float32
        return dict(
            inputs=[Akk.reshape(M, C, C).to(f32), bc.reshape(M, C).to(f32), R.reshape(M, C, W).to(f32)],
            template=[("C", C), ("W", W)], grid=(nt, 1, M), threadgroup=(nt, 1, 1),
            output_shapes=[(M, C, W)], output_dtypes=[mx.float32])

    def state_args(self, Wk, QS, KS, U0, decay, state):
        B, H, N, C, Dk = Wk.shape
        Dv = U0.shape[-1]
        f32 = torch.float32
        return dict(
            inputs=[Wk.to(f32), QS.to(f32), KS.to(f32), U0.to(f32), decay.to(f32), state, N],
            template=[("C", C), ("Dk", Dk), ("Dv", Dv), ("Threads", DECODE_THREADS), ("Rows", DECODE_ROWS)],
            grid=(DECODE_THREADS, Dv // DECODE_ROWS, B * H), threadgroup=(DECODE_THREADS, 1, 1),
            output_shapes=[(B, H, N, C, Dv)] * 2 + [(B, H, Dv, Dk)],
            output_dtypes=[mx.float32] * 3)

    def prefill(self, q, k, v, g, beta, state, unit_errors: list | None = None):
        """The chunk route, SEGMENT tokens a round; appends each segment's kernel-alone errors
        (kda_chunk_ut vs a float64 triangular solve, kda_chunk_state vs a float64 chunk loop,
        both on the kernel's own fp32 inputs) to unit_errors. Returns (o float64, state)."""
        B, T, H, _ = k.shape
        outs = []
        for s in range(0, T, SEGMENT):
            p = slice(s, min(T, s + SEGMENT))
            Aqk, Akk, bc, R, QS, KS, decay, (B, H, N, Dk) = self.chunk_terms(q[:, p], k[:, p], v[:, p], g[:, p], beta[:, p])
            ua = self.ut_args(Akk, bc, R)
            (X,) = self.kernels["kda_chunk_ut"](**ua)
            X = X.reshape(B, H, N, CHUNK, -1)
            sa = self.state_args(X[..., :Dk], QS, KS, X[..., Dk:], decay, state)
            U, OI, new_state = self.kernels["kda_chunk_state"](**sa)
            if unit_errors is not None:
                ex = ref_ut(*ua["inputs"])
                eu, eo, es = ref_chunk_state(*sa["inputs"][:6])
                unit_errors.append({"kda_chunk_ut X": rel_err(X.reshape(ex.shape), ex),
                                    "kda_chunk_state U": rel_err(U, eu), "kda_chunk_state OI": rel_err(OI, eo),
                                    "kda_chunk_state state": rel_err(new_state, es)})
            state = new_state
            o = Aqk @ U.to(torch.float64) + OI.to(torch.float64)
            outs.append(o.reshape(B, H, N * CHUNK, -1)[:, :, : p.stop - p.start])
        o = torch.cat(outs, dim=2).transpose(1, 2)
        return o, state


# ---------------------------------------------------------------------------------------------
# Float64 truth
# ---------------------------------------------------------------------------------------------

def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN if out has NaN or Inf)."""
    out, ref = out.to(torch.float64).reshape(-1), ref.to(torch.float64).reshape(-1)
    if not torch.isfinite(out).all():
        return float("nan")
    return (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-300)).item()


def naive(q, k, v, g, beta, state, dtype=torch.float64):
    """kimi_mlx/kda/naive.py's recurrence, token by token, in `dtype`."""
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    S = state.to(dtype).clone()
    B, T, H, Dk = k.shape
    a = torch.exp(g)
    out = torch.empty(B, T, H, v.shape[-1], dtype=dtype, device=k.device)
    for t in range(T):
        S.mul_(a[:, t, :, None, :])  # decay each Dk channel
        kv = (S @ k[:, t, :, :, None])[..., 0]  # [B, H, Dv]
        delta = beta[:, t, :, None] * (v[:, t] - kv)
        S.add_(delta[..., :, None] * k[:, t, :, None, :])
        out[:, t] = (S @ q[:, t, :, :, None])[..., 0]
    return out, S


def prologue(qr, kr, f, b, A_log, dt_bias, dtype=torch.float64):
    """The layer's per-token prologue (what Fused kda_decode computes): q, k L2-normalised (eps
    1e-6 on the sum of squares), q scaled by Dk^-0.5, g = -exp(A_log) softplus(f + dt_bias),
    beta = sigmoid(b)."""
    qr, kr, f, b, A_log, dt_bias = (x.to(dtype) for x in (qr, kr, f, b, A_log, dt_bias))
    H, Dk = kr.shape[2], kr.shape[3]
    norm = lambda x: x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)  # noqa: E731
    x = f + dt_bias.reshape(H, Dk)
    softplus = torch.clamp(x, min=0) + torch.log1p(torch.exp(-x.abs()))
    g = -torch.exp(A_log.reshape(H, 1)) * softplus
    return norm(qr) * Dk**-0.5, norm(kr), g, torch.sigmoid(b)


def ref_ut(A, beta, R):
    """X = (I + diag(beta) strict_lower(A))^-1 diag(beta) R, float64."""
    A, beta, R = (x.to(torch.float64) for x in (A, beta, R))
    C = A.shape[-1]
    L = torch.eye(C, dtype=A.dtype, device=A.device) + beta[..., :, None] * torch.tril(A, diagonal=-1)
    return torch.linalg.solve_triangular(L, beta[..., None] * R, upper=False, unitriangular=True)


def ref_chunk_state(Wk, QS, KS, U0, decay, state):
    """kda_chunk_state's definition chunk by chunk in float64: (U, OI, state)."""
    Wk, QS, KS, U0, decay, S = (x.to(torch.float64) for x in (Wk, QS, KS, U0, decay, state))
    U, OI = torch.empty_like(U0), torch.empty_like(U0)
    for n in range(Wk.shape[2]):
        St = S.transpose(-1, -2)
        U[:, :, n] = U0[:, :, n] - Wk[:, :, n] @ St
        OI[:, :, n] = QS[:, :, n] @ St
        S = S * decay[:, :, n, None, :] + U[:, :, n].transpose(-1, -2) @ KS[:, :, n]
    return U, OI, S


# ---------------------------------------------------------------------------------------------
# Inputs, as tests/test_metal_kernels.py draws them (strong gates: many channels lose e^-5 a token)
# ---------------------------------------------------------------------------------------------

def nanmax(xs) -> float:
    xs = list(xs)
    return float("nan") if any(x != x for x in xs) else max(xs)


def raw_inputs(B, T, H, Dk, Dv, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    n = lambda *s: torch.randn(*s, generator=gen, device=device, dtype=torch.float32)  # noqa: E731
    qr, kr, v, f, b = n(B, T, H, Dk), n(B, T, H, Dk), n(B, T, H, Dv), 2 * n(B, T, H, Dk), n(B, T, H)
    A_log = 1.5 * torch.rand(H, generator=gen, device=device, dtype=torch.float32)
    return qr, kr, v, f, b, A_log, n(H * Dk), 0.5 * n(B, H, Dv, Dk)


def plain_inputs(raw, qkv_dtype=torch.float32):
    """(q, k, v, g, beta, state) in the package conventions: the float64 prologue, rounded."""
    qr, kr, v, f, b, A_log, dt_bias, state = raw
    q, k, g, beta = prologue(qr, kr, f, b, A_log, dt_bias)
    f32 = torch.float32
    return q.to(qkv_dtype), k.to(qkv_dtype), v.to(qkv_dtype), g.to(f32), beta.to(f32), state


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------

class Report:
    def __init__(self, out_dir: Path | None, meta: dict):
        self.rows, self.timings, self.failures, self.planted = [], [], [], []
        self.out_dir, self.meta = out_dir, meta

    def add(self, kernel, shape, mode, errs: dict, tol, extra=None):
        worst = max(errs.values()) if errs and all(e == e for e in errs.values()) else float("nan")
        ok = worst <= tol  # NaN fails
        row = {"kernel": kernel, "shape": shape, "mode": mode, "errors": errs, "max_rel_err": worst, "tol": tol,
               "pass": bool(ok), **(extra or {})}
        self.rows.append(row)
        mark = "ok  " if ok else "FAIL"
        detail = " ".join(f"{k}={v:.2e}" for k, v in errs.items())
        print(f"  {mark} {kernel:<16} {shape:<28} {mode:<18} {detail}", flush=True)
        if not ok:
            self.failures.append(row)

    def error(self, what, exc):
        msg = f"{what}: {type(exc).__name__}: {exc}"
        print("  ERROR " + msg, flush=True)
        traceback.print_exc()
        self.failures.append({"kernel": what, "error": msg})
        self.rows.append({"kernel": what, "error": msg, "pass": False})

    def save(self):
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        data = {"meta": self.meta, "tolerances": TOL, "correctness": self.rows, "timing": self.timings,
                "planted": self.planted, "failures": self.failures}
        name = {"cuda": "results_h200.json", "emu": "results_cpu_emulator.json"}.get(self.meta["backend"],
                                                                                      "results_compile_check.json")
        (self.out_dir / name).write_text(json.dumps(data, indent=1, default=str))


def shape_id(B, T, H, Dk, Dv):
    return f"B{B} T{T} H{H} Dk{Dk} Dv{Dv}"


def check_shape(rep: Report, kda: TorchMetalKDA, fast: TorchMetalKDA | None, B, T, H, Dk, Dv, dev, *,
                decode=True, fused=True, bf16=True, chunk=True, fused_bf16=False, baseline=True):
    """Every requested kernel/mode at one shape against the float64 recurrence."""
    sid = shape_id(B, T, H, Dk, Dv)
    seed = (((B * 1000 + T) * 1000 + H) * 1000 + Dk) * 1000 + Dv
    raw = raw_inputs(B, T, H, Dk, Dv, dev, seed)
    q, k, v, g, beta, state = plain_inputs(raw)
    t0 = time.perf_counter()
    ref_o, ref_s = naive(q, k, v, g, beta, state)
    extra = {}
    if baseline:
        bo, bs = naive(q, k, v, g, beta, state, dtype=torch.float32)
        extra = {"fp32_loop_err": max(rel_err(bo, ref_o), rel_err(bs, ref_s))}
    extra["ref_s"] = round(time.perf_counter() - t0, 3)
    variants = [("float32", kda)] + ([("float32 fast-math", fast)] if fast is not None else [])
    for mode, backend in variants:
        if decode:
            try:
                y, s = backend.decode(q, k, v, g, beta, state)
                rep.add("kda_decode", sid, mode, {"o": rel_err(y, ref_o), "state": rel_err(s, ref_s)}, TOL[mode], extra)
            except Exception as e:  # noqa: BLE001
                rep.error(f"kda_decode {sid} {mode}", e)
        if chunk:
            try:
                units: list[dict] = []
                o, s = backend.prefill(q, k, v, g, beta, state, units)
                rep.add("chunk route", sid, mode, {"o": rel_err(o, ref_o), "state": rel_err(s, ref_s)}, TOL[mode], extra)
                ut = {"X": nanmax(u["kda_chunk_ut X"] for u in units)}
                st = {w: nanmax(u[f"kda_chunk_state {w}"] for u in units) for w in ("U", "OI", "state")}
                rep.add("kda_chunk_ut", sid, mode + " (unit)", ut, TOL[mode])
                rep.add("kda_chunk_state", sid, mode + " (unit)", st, TOL[mode])
            except Exception as e:  # noqa: BLE001
                rep.error(f"chunk route {sid} {mode}", e)
    if fused:
        try:
            qn, kn, gg, bb = prologue(raw[0], raw[1], raw[3], raw[4], raw[5], raw[6])
            fo, fs = naive(qn, kn, raw[2], gg, bb, raw[7])
            qr, kr, vv, f, b, A_log, dt_bias, st = raw
            y, s = kda.decode(qr, kr, vv, f, b, st, A_log, dt_bias)
            rep.add("kda_decode Fused", sid, "float32", {"o": rel_err(y, fo), "state": rel_err(s, fs)}, TOL["float32"])
        except Exception as e:  # noqa: BLE001
            rep.error(f"kda_decode Fused {sid}", e)
    if bf16:
        try:
            bq, bk, bv, bg, bb, bst = plain_inputs(raw, torch.bfloat16)
            ro, rs = naive(bq, bk, bv, bg, bb, bst)
            y, s = kda.decode(bq, bk, bv, bg, bb, bst)
            rep.add("kda_decode", sid, "bfloat16", {"o": rel_err(y, ro), "state": rel_err(s, rs)}, TOL["bfloat16"])
        except Exception as e:  # noqa: BLE001
            rep.error(f"kda_decode bf16 {sid}", e)
    if fused_bf16:
        try:
            qr, kr, vv, f, b, A_log, dt_bias, st = raw
            bf = torch.bfloat16
            qr, kr, vv, f, b = (x.to(bf) for x in (qr, kr, vv, f, b))
            qn, kn, gg, bb = prologue(qr, kr, f, b, A_log, dt_bias)
            fo, fs = naive(qn, kn, vv, gg, bb, st)
            y, s = kda.decode(qr, kr, vv, f, b, st, A_log, dt_bias)
            rep.add("kda_decode Fused", sid, "bfloat16", {"o": rel_err(y, fo), "state": rel_err(s, fs)}, TOL["bfloat16"])
        except Exception as e:  # noqa: BLE001
            rep.error(f"kda_decode Fused bf16 {sid}", e)
    rep.save()


# --- timing ------------------------------------------------------------------------------------

def time_launch(launch, backend, target_ms: float = 3.0, reps: int = 9) -> dict:
    """Median seconds per launch: CUDA graphs of back-to-back launches (no CPU gaps), timed by
    CUDA events, after warm-up. Falls back to a plain launch loop if graph capture fails."""
    cp = backend.cp
    launch()
    torch.cuda.synchronize()
    s, e = cp.cuda.Event(), cp.cuda.Event()
    s.record()
    launch()
    e.record()
    e.synchronize()
    one = cp.cuda.get_elapsed_time(s, e)  # ms
    inner = int(max(1, min(500, target_ms / max(one, 1e-3))))
    method = "graph"
    try:
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            for _ in range(inner):
                launch()
            graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()

        def run():
            s.record(stream)
            graph.launch(stream)
            e.record(stream)
            e.synchronize()
            return cp.cuda.get_elapsed_time(s, e)
    except Exception:  # noqa: BLE001
        method = "loop"

        def run():
            s.record()
            for _ in range(inner):
                launch()
            e.record()
            e.synchronize()
            return cp.cuda.get_elapsed_time(s, e)
    run()
    times = [run() / inner * 1e-3 for _ in range(reps)]
    return {"median_s": statistics.median(times), "min_s": min(times), "launches_per_sample": inner,
            "samples": reps, "method": method}


def decode_cost(B, T, H, Dk, Dv, in_bytes, fused):
    """Compulsory bytes (each tensor once: state in and out, q k g v beta y) and FLOPs."""
    state = B * H * Dv * Dk * 4
    per_tok = B * H * (2 * Dk * in_bytes + Dk * (in_bytes if fused else 4) + Dv * in_bytes + 4 + Dv * in_bytes)
    flops = 7 * B * H * Dv * Dk * T + (20 * B * H * Dk * T if fused else 0)
    return 2 * state + T * per_tok, flops


def ut_cost(M, C, W):
    return M * (C * (C - 1) // 2 * 4 + C * 4 + 2 * C * W * 4), M * W * C * (C - 1)


def state_cost(B, H, N, C, Dk, Dv):
    M = B * H * N
    byts = M * (3 * C * Dk * 4 + C * Dv * 4 + Dk * 4 + 2 * C * Dv * 4) + 2 * B * H * Dv * Dk * 4
    return byts, M * (6 * C * Dk * Dv + Dk * Dv)


def add_timing(rep: Report, backend, name, shape, launch, byts, flops, extra=None):
    try:
        t = time_launch(launch, backend)
    except Exception as e:  # noqa: BLE001
        rep.error(f"timing {name} {shape}", e)
        return
    sec = t["median_s"]
    row = {"kernel": name, "shape": shape, **t, "bytes": byts, "flops": flops, "GB_per_s": byts / sec / 1e9,
           "bw_fraction": byts / sec / HBM_BW, "TFLOP_per_s": flops / sec / 1e12, **(extra or {})}
    rep.timings.append(row)
    print(f"  {name:<22} {shape:<34} {sec * 1e6:10.1f} us  {byts / sec / 1e9:8.1f} GB/s "
          f"({100 * byts / sec / HBM_BW:5.1f}% of HBM)  {flops / sec / 1e12:6.2f} TFLOP/s", flush=True)
    rep.save()


def run_timings(rep: Report, kda: TorchMetalKDA, quick: bool):
    H, D, dev = REAL_H, REAL_D, "cuda"
    bf = torch.bfloat16
    batches = (1, 8, 64, 256) if not quick else (1, 64)
    for B in batches:  # decode, one token: the state read and written once
        raw = raw_inputs(B, 1, H, D, D, dev, 7)
        q, k, v, g, beta, state = plain_inputs(raw)
        launch, _ = kda.kernels["kda_decode"].prepare(**kda.decode_args(q, k, v, g, beta, state))
        add_timing(rep, kda.backend, "kda_decode f32", shape_id(B, 1, H, D, D), launch,
                   *decode_cost(B, 1, H, D, D, 4, False))
        qr, kr, vv, f, b, A_log, dt_bias, st = raw
        launch, _ = kda.kernels["kda_decode"].prepare(**kda.decode_args(
            qr.to(bf), kr.to(bf), vv.to(bf), f.to(bf), b.to(bf), st, A_log, dt_bias))
        add_timing(rep, kda.backend, "kda_decode Fused bf16", shape_id(B, 1, H, D, D), launch,
                   *decode_cost(B, 1, H, D, D, 2, True))
    for T in ((64, 4096) if not quick else (64,)):  # the recurrent route over many tokens
        q, k, v, g, beta, state = plain_inputs(raw_inputs(1, T, H, D, D, dev, 8))
        launch, _ = kda.kernels["kda_decode"].prepare(**kda.decode_args(q, k, v, g, beta, state))
        add_timing(rep, kda.backend, "kda_decode f32", shape_id(1, T, H, D, D), launch,
                   *decode_cost(1, T, H, D, D, 4, False))
    for B in ((1, 8) if not quick else (1,)):  # one segment (SEGMENT tokens) of the chunk route
        T = SEGMENT
        q, k, v, g, beta, state = plain_inputs(raw_inputs(B, T, H, D, D, dev, 9))
        Aqk, Akk, bc, R, QS, KS, decay, (_, _, N, Dk) = kda.chunk_terms(q, k, v, g, beta)
        del Aqk
        ua = kda.ut_args(Akk, bc, R)
        launch, (X,) = kda.kernels["kda_chunk_ut"].prepare(**ua)
        M, W = B * H * N, 2 * D
        add_timing(rep, kda.backend, "kda_chunk_ut", shape_id(B, T, H, D, D) + f" M{M}", launch, *ut_cost(M, CHUNK, W))
        launch()
        X = X.reshape(B, H, N, CHUNK, -1)
        launch, _ = kda.kernels["kda_chunk_state"].prepare(**kda.state_args(X[..., :Dk], QS, KS, X[..., Dk:], decay, state))
        add_timing(rep, kda.backend, "kda_chunk_state", shape_id(B, T, H, D, D) + f" N{N}", launch,
                   *state_cost(B, H, N, CHUNK, D, D))
        del Akk, R, QS, KS, X
        torch.cuda.empty_cache()


def print_tables(rep: Report):
    """Test shapes summarised per kernel and mode (worst case), the released shape row by row."""
    ok = lambda r: "ok" if r["pass"] else "FAIL"  # noqa: E731
    rows = [r for r in rep.rows if "error" not in r]
    test = [r for r in rows if f" H{H_TEST} " in r["shape"] and r["shape"].startswith(f"B{B_TEST} ")]
    real = [r for r in rows if r not in test]
    print(f"\n=== correctness vs the float64 recurrence: test shapes B={B_TEST} H={H_TEST}, T in {TEST_T}, "
          f"(Dk, Dv) in {TEST_DIMS} (worst case) ===")
    print(f"{'kernel':<17}{'mode':<25}{'checks':>7}{'max rel err':>13}{'tol':>8}  worst shape{'':<18}result")
    groups: dict = {}
    for r in test:
        groups.setdefault((r["kernel"], r["mode"]), []).append(r)
    for (kernel, mode), rs in groups.items():
        worst = max(rs, key=lambda r: r["max_rel_err"] if r["max_rel_err"] == r["max_rel_err"] else float("inf"))
        print(f"{kernel:<17}{mode:<25}{len(rs):>7}{worst['max_rel_err']:>13.2e}{worst['tol']:>8.0e}  "
              f"{worst['shape']:<29}{'ok' if all(r['pass'] for r in rs) else 'FAIL'}")
    print(f"\n=== correctness at the released shape (H={REAL_H}, Dk=Dv={REAL_D}) ===")
    print(f"{'kernel':<17}{'shape':<29}{'mode':<25}{'max rel err':>12}{'tol':>8}{'fp32 loop':>11}  result")
    for r in real:
        base = r.get("fp32_loop_err")
        print(f"{r['kernel']:<17}{r['shape']:<29}{r['mode']:<25}{r['max_rel_err']:>12.2e}{r['tol']:>8.0e}"
              f"{(f'{base:.2e}' if base is not None else ''):>11}  {ok(r)}")
    for r in rep.rows:
        if "error" in r:
            print(f"ERROR {r['error'][:200]}")
    if rep.timings:
        print(f"\n=== timing on {rep.meta.get('gpu', '?')}: median per launch; % of {HBM_BW / 1e12:.1f} TB/s HBM ===")
        print(f"{'kernel':<23}{'shape':<35}{'time':>11}{'GB/s':>9}{'% HBM':>8}{'TFLOP/s':>9}")
        for t in rep.timings:
            print(f"{t['kernel']:<23}{t['shape']:<35}{t['median_s'] * 1e6:>9.1f}us{t['GB_per_s']:>9.1f}"
                  f"{100 * t['bw_fraction']:>7.1f}%{t['TFLOP_per_s']:>9.2f}")
    if rep.planted:
        print("\n=== planted errors: is each caught? (removed barriers are races: the GPU may not show them) ===")
        for r in rep.planted:
            errs = r.get("errors", [])
            print(f"{r['kernel']:<17}{r['plant']:<44} caught={r.get('caught')}  max err "
                  f"{nanmax(errs) if errs else float('nan'):.2e}")
    n_fail = len(rep.failures)
    print(f"\n{len(rep.rows)} checks, {n_fail} failed" + (": " + "; ".join(
        f"{f.get('kernel')} {f.get('shape', '')} {f.get('mode', '')} {f.get('error', f.get('max_rel_err'))}"
        for f in rep.failures) if n_fail else ""))


BARRIER = "threadgroup_barrier(mem_flags::mem_threadgroup);"
PLANTS = [  # (kernel, old text, new text, occurrence): as tests/test_metal_kernels.py plants them
    ("kda_decode", "- kv * rk", "+ kv * rk", 0),
    ("kda_chunk_ut", "acc -= L[t][j] * x[j]", "acc += L[t][j] * x[j]", 0),
    ("kda_chunk_state", "U0[at] - pw", "U0[at] + pw", 0),
    ("kda_decode", BARRIER, "", 0),
    ("kda_chunk_ut", BARRIER, "", 0),
    ("kda_chunk_state", BARRIER, "", 0),
    ("kda_chunk_state", BARRIER, "", 1),
    ("kda_chunk_state", BARRIER, "", 2),
]


def planted_checks(rep: Report, backend, B=B_TEST, T=300, H=H_TEST, Dk=64, Dv=64, repeats=5):
    """The harness must catch wrong kernels on the GPU too: each planted change (a sign flip,
    each barrier removed) is run `repeats` times; caught = some run's error exceeds the tolerance.
    A removed barrier is a race whose outcome depends on timing, so a real GPU may not show it."""
    import dataclasses

    raw = raw_inputs(B, T, H, Dk, Dv, backend.device, 11)
    q, k, v, g, beta, state = plain_inputs(raw)
    ref_o, ref_s = naive(q, k, v, g, beta, state)
    for kernel, old, new, occ in PLANTS:
        body = SOURCES[kernel].body
        at = -1
        for _ in range(occ + 1):
            at = body.find(old, at + 1)
        if at < 0:
            rep.planted.append({"kernel": kernel, "plant": f"{old!r} #{occ}", "error": "text not found"})
            continue
        srcs = dict(SOURCES)
        srcs[kernel] = dataclasses.replace(SOURCES[kernel], body=body[:at] + new + body[at + len(old):])
        kda = TorchMetalKDA(backend, sources=srcs)
        errs = []
        try:
            for _ in range(repeats):
                o, s = (kda.decode(q, k, v, g, beta, state) if kernel == "kda_decode"
                        else kda.prefill(q, k, v, g, beta, state))
                errs.append(max(rel_err(o, ref_o), rel_err(s, ref_s)))
        except Exception as e:  # noqa: BLE001
            errs.append(float("nan"))
            print(f"  planted {kernel}: {type(e).__name__}: {e}")
        caught = any(not (e <= TOL["float32"]) for e in errs)
        what = "barrier removed" if old == BARRIER else f"{old!r} -> {new!r}"
        row = {"kernel": kernel, "plant": f"{what} (#{occ})", "errors": errs, "caught": caught,
               "shape": shape_id(B, T, H, Dk, Dv)}
        rep.planted.append(row)
        print(f"  planted {kernel:<16} {row['plant']:<40} caught={caught} errs={[f'{e:.1e}' for e in errs]}", flush=True)
    rep.save()


def real_check(rep: Report, kda: TorchMetalKDA, T: int, B: int = 1):
    """The released shape: every route against the float64 recurrence."""
    t0 = time.perf_counter()
    with torch.no_grad():
        check_shape(rep, kda, None, B, T, REAL_H, REAL_D, REAL_D, "cuda", fused=T <= 4096, bf16=T <= 4096,
                    fused_bf16=T == 1, chunk=True)
    print(f"  (T={T}: {time.perf_counter() - t0:.1f} s)", flush=True)
    torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("cuda", "emu"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="fewer shapes; real shape up to T=4096")
    ap.add_argument("--compile-only", action="store_true", help="generate and NVRTC-compile every source")
    ap.add_argument("--nvrtc", default=os.environ.get("MCUDA_NVRTC", "libnvrtc.so"))
    ap.add_argument("--long-t", type=int, default=65536, help="longest real-shape T")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--planted", action="store_true", help="also run planted wrong kernels (must be caught)")
    ap.add_argument("--no-fast-math", action="store_true")
    ap.add_argument("--dump", type=Path, help="write each generated .cu here")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    args = ap.parse_args(argv)

    if args.compile_only:
        backend = NvrtcCheckBackend(args.nvrtc)
    elif args.backend == "emu":
        if MX_STANDIN:
            raise SystemExit("--backend emu needs MLX (the emulator converts through mx arrays)")
        backend = EmuBackend()
    else:
        backend = CudaBackend()
    dev = backend.device
    meta = {"backend": backend.kind, "torch": torch.__version__, "python": platform.python_version(),
            "mlx": "stand-in" if MX_STANDIN else getattr(mx, "__version__", "?"), "argv": sys.argv[1:],
            "hbm_bytes_per_s": HBM_BW, "fp32_flops": FP32_PEAK, "chunk": CHUNK, "segment": SEGMENT}
    if backend.kind == "cuda":
        import cupy as cp

        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 baseline loop: true fp32 matmuls
        try:
            props = cp.cuda.runtime.getDeviceProperties(0)
            meta.update(gpu=props["name"].decode(), cupy=cp.__version__, sm=f"{props['major']}{props['minor']}",
                        cuda_runtime=cp.cuda.runtime.runtimeGetVersion(), nvrtc=cp.cuda.nvrtc.getVersion())
        except Exception as e:  # noqa: BLE001
            meta["props_error"] = repr(e)
        meta["metal_cuda_h_uses_cuda_headers"] = backend.probe_headers()
    rep = Report(args.out, meta)
    print(f"run_kernels: backend {backend.kind}, {meta.get('gpu', dev)}, torch {torch.__version__}", flush=True)
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
    kda = TorchMetalKDA(backend)
    fast = None if (args.no_fast_math or backend.kind == "emu") else TorchMetalKDA(backend, fast_math=True)
    if args.dump:
        orig = backend.function

        def dumping(src, fm):
            (args.dump / f"{src.name}-{hashlib.sha1(src.text.encode()).hexdigest()[:8]}{'-fast' if fm else ''}.cu").write_text(src.text)
            return orig(src, fm)

        backend.function = dumping
    t_start = time.perf_counter()

    print("\n--- test shapes (B=2, H=4) ---", flush=True)
    if backend.kind == "emu":
        shapes = [(1, 32, 32), (63, 64, 64), (65, 32, 32), (65, 64, 128), (130, 128, 32), (64, 128, 128)]
    elif args.quick:
        shapes = [(T, Dk, Dv) for T in TEST_T for Dk, Dv in TEST_DIMS if T in (1, 65, 300) or Dk == Dv == 64]
    else:
        shapes = [(T, Dk, Dv) for T in TEST_T for Dk, Dv in TEST_DIMS]
    for T, Dk, Dv in shapes:
        with torch.no_grad():
            check_shape(rep, kda, fast if T == 300 else None, B_TEST, T, H_TEST, Dk, Dv, dev,
                        fused_bf16=T in (1, 65))

    if backend.kind == "cuda":
        print("\n--- real shape (H=32, Dk=Dv=128) ---", flush=True)
        real_check(rep, kda, 1)
        real_check(rep, kda, 1, B=64)
        real_check(rep, kda, 4096)
        if not args.no_timing:
            print("\n--- timing ---", flush=True)
            with torch.no_grad():
                run_timings(rep, kda, args.quick)
        if not args.quick and args.long_t > 4096:
            real_check(rep, kda, args.long_t)
    if args.planted:
        print("\n--- planted errors (must be caught) ---", flush=True)
        with torch.no_grad():
            planted_checks(rep, backend)
    rep.meta["compile_s"] = round(backend.compile_s, 2)
    rep.meta["total_s"] = round(time.perf_counter() - t_start, 1)
    rep.save()
    if args.compile_only:
        print(f"\ncompiled {len(backend.compiled)} sources with NVRTC ({backend.compile_s:.1f} s), "
              f"{len(backend.failures)} failed")
        for f in backend.failures[:3]:
            print(f)
        return 1 if backend.failures else 0
    print_tables(rep)
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
