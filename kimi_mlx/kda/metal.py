"""KDA on our own GPU kernel, metal/kda_decode.metal, written in the Metal Shading Language
and run on BOTH of MLX's GPU backends from the same text:
  * Metal (Apple GPUs): through mx.fast.metal_kernel;
  * CUDA (NVIDIA GPUs, MLX's CUDA backend): through mx.fast.cuda_kernel, with metal/cuda_compat.h
    (the Metal names the bodies use, as CUDA) put before the .metal file's header;
  * the CPU emulator (tests/metal_emu), which the test suite runs every kernel on.
Which backend: the DEFAULT device's (mx.default_device()), not what is installed: on the CPU
device no kernel runs. The path and switch names say "metal" for the kernels' language (and for
compatibility: KIMI_MLX_KDA_PATH=metal, KIMI_MLX_KERNELS=metal); they mean these kernels on
either GPU.

Conventions are stated once in kimi_mlx/kda/__init__.py. `kda_metal` has the signature and
returns of every other path; `kda_decode_layer` is the KDA layer's whole decode step from the
projections to what o_proj reads (kimi_mlx/kda_layer.py and kimi_mlx/decode.py call it).

Which parts are kernels, and why:
  * `kda_decode`: the recurrence with the state in registers, one threadgroup per (b, h, Rows
    rows of Dv), 4 lanes per row. Decode is launch-bound on a GPU (bench/gpu/NOTES.md: ~50
    kernels per layer per token, each a few KB); its Layer variant does a KDA layer's step from
    the raw projections in ONE kernel: the three short convs with their windows, q/k L2 norms,
    q scale, forget gate, beta, the recurrence, the output RMSNorm and sigmoid gate (an eager
    KDA decoder layer step: 18 kernel nodes against 103 in MLX ops, counted by
    bench/gpu/check_kernels_mlx.py; mx.compile fuses some of the ops path's elementwise ones).
  * Prefill (T > 1) runs the same plain kda_decode, T sequential steps in one launch. On the
    H200 (one layer, B=1, bf16; bench/gpu/check_kernels_mlx.py, bench/gpu/NOTES.md run 3) it
    took 4.9 ms at T=4096 against 15.5 ms for chunk kernels around MLX matmuls (since removed;
    the git history has them) and 35.1 ms for chunked ops. Whether auto takes the kernels for
    T > 1 at all is dispatch.KERNEL_MAX_T.
Every kernel is run in the test suite on the CPU (tests/metal_emu) against kda_naive. On a GPU,
each kernel configuration is checked once per process against kda_naive (the layer step against
its ops reference) on a small input before first use; if it fails or does not compile, one
warning and the ops path.

Which path runs: `set_kernel_mode()` > $KIMI_MLX_KERNELS > "auto" (one PathSwitch).
  auto   the kernels where the default device is a GPU and the self-check passed, else ops
  metal  the kernels or an error (never a silent fallback: for benchmarks and debugging)
  ops    never the kernels
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..precision import relative_error
from .chunked import CHUNK, kda_chunked  # CHUNK: the ops fallback chunks from this many tokens
from .naive import kda_naive
from .prologue import decode_layer_ops, prologue
from ..switch import PathSwitch


def _metal_dir() -> Path:
    """The repo's metal/ (checkouts, editable installs), else the kimi_mlx/metal/ a wheel installs
    (pyproject.toml maps it there)."""
    here = Path(__file__).resolve()
    candidates = (here.parents[2] / "metal", here.parents[1] / "metal")
    return next((d for d in candidates if (d / "kda_decode.metal").is_file()), candidates[0])


METAL_DIR = _metal_dir()
CUDA_HEADER = "cuda_compat.h"  # in METAL_DIR: the Metal names the bodies use, as CUDA
ENV_VAR = "KIMI_MLX_KERNELS"
MODES = ("auto", "metal", "ops")
_switch = PathSwitch("kernel mode", ENV_VAR, MODES)  # registers ENV_VAR for check_environment
DECODE_THREADS, DECODE_ROWS = 128, 32  # threads and Dv rows per threadgroup: plain kda_decode's template args
# Relative error the self-check allows against kda_naive, by input dtype: the GPU sums in another
# order (and may compile with fast math); the bugs planted in the tests are off by >= 5e-2.
CHECK_TOL = {mx.float32: 1e-4, mx.float16: 5e-3, mx.bfloat16: 2e-2}


@dataclass(frozen=True)
class KernelSource:
    """One kernel of a .metal file: what mx.fast.metal_kernel gets."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    header: str
    body: str


_MARK = re.compile(r"^// @kernel (\w+)\(([\w, ]*)\) -> \(([\w, ]*)\)\s*$", re.M)


def load_sources(path: Path) -> dict[str, KernelSource]:
    """Kernels of a .metal file: the text before the first `// @kernel name(inputs) -> (outputs)`
    line is the header, the lines after each such line (to the next) that kernel's body."""
    text = path.read_text()
    marks = list(_MARK.finditer(text))
    if not marks:
        raise ValueError(f"{path}: no '// @kernel name(inputs) -> (outputs)' line")
    header = text[: marks[0].start()]
    names = lambda s: tuple(n.strip() for n in s.split(",") if n.strip())  # noqa: E731
    out = {}
    for m, nxt in zip(marks, marks[1:] + [None]):
        body = text[m.end() + 1 : nxt.start() if nxt else len(text)]
        out[m.group(1)] = KernelSource(m.group(1), names(m.group(2)), names(m.group(3)), header, body)
    return out


def _load_all() -> tuple[dict[str, KernelSource], str | None]:
    try:
        return load_sources(METAL_DIR / "kda_decode.metal"), None
    except (OSError, ValueError) as e:  # e.g. installed without the metal/ folder
        return {}, f"kernel sources unreadable ({e})"


def _load_cuda_header() -> str | None:
    try:
        return (METAL_DIR / CUDA_HEADER).read_text()
    except OSError:
        return None


SOURCES, _SOURCE_ERROR = _load_all()  # read once, at import
CUDA_COMPAT = _load_cuda_header()


def gpu_backend() -> str | None:
    """The GPU backend of the DEFAULT device: "metal", "cuda", or None when it is the CPU.

    MLX has two GPU backends; a GPU device without Metal is CUDA's."""
    if mx.default_device() == mx.cpu:
        return None
    return "metal" if mx.metal.is_available() else "cuda"


def cuda_kernel(name, input_names, output_names, source, header=""):
    """mx.fast.metal_kernel's interface on MLX's CUDA backend: the .metal header and body, with
    metal/cuda_compat.h before the header."""
    return mx.fast.cuda_kernel(name=name, input_names=input_names, output_names=output_names, source=source,
                               header=CUDA_COMPAT + header)


def kernel_factory(backend: str):
    """The kernel factory of a GPU backend ("metal" or "cuda")."""
    return {"metal": mx.fast.metal_kernel, "cuda": cuda_kernel}[backend]


def supports(Dk: int, Dv: int) -> bool:
    """Head sizes the kernels handle: 4 lanes per state row, 32 rows per threadgroup (the layer
    step: the whole head, <= 1024 threads)."""
    return Dk % 4 == 0 and Dv % 32 == 0 and 4 <= Dk <= 128 and Dv <= 256


# The layer's per-token prologue in MLX ops (what the Layer kda_decode computes): one definition.
prologue_ops = prologue

_DTYPE_TAGS = {mx.float32: "f32", mx.float16: "f16", mx.bfloat16: "bf16", mx.int32: "i32"}


def _unused(dtype) -> mx.array:
    """A 1-element array for a kernel input the variant never reads: made from data (a leaf, no
    fill kernel per call, also inside an mx.compile trace)."""
    return mx.array([0], dtype)


def _dtype_tag(inputs) -> str:
    return "".join(_DTYPE_TAGS.get(x.dtype, "x") for x in inputs)


class MetalKDA:
    """The KDA kernels, built by one kernel factory: `mx.fast.metal_kernel` on Metal,
    `cuda_kernel` (above) on CUDA, the CPU emulator (tests/metal_emu/emulate.py) in tests. Same
    wrapper code either way.

    Each kernel instance gets a name of its own: the kernel's, a digest of its source and the
    input dtypes. MLX caches a compiled kernel by name and template arguments only (the CUDA
    backend also on disk, across processes and versions of this package), while input dtypes
    change the generated signature."""

    def __init__(self, factory=None, sources: dict[str, KernelSource] | None = None, backend: str = "metal"):
        self.factory = factory or mx.fast.metal_kernel
        self.sources = sources or SOURCES
        self.backend = backend  # "metal", "cuda", or e.g. "emulator" (tests)
        # What the factory puts before the header, part of the digest.
        self.header_prefix = CUDA_COMPAT if backend == "cuda" else ""
        self._kernels: dict[tuple, object] = {}

    def _run(self, name: str, inputs: list, **launch):
        key = (name, _dtype_tag(inputs))
        if key not in self._kernels:
            s = self.sources[name]
            digest = hashlib.sha256("\0".join([self.header_prefix, s.header, s.body]).encode()).hexdigest()[:10]
            self._kernels[key] = self.factory(name=f"{name}__{digest}_{key[1]}", input_names=list(s.input_names),
                                              output_names=list(s.output_names), source=s.body, header=s.header)
        return self._kernels[key](inputs=inputs, **launch)

    def decode(self, q, k, v, g, beta, state):
        """kda_decode over T tokens (the plain variant): kda_metal's route for every T."""
        B, T, H, Dk = k.shape
        Dv = v.shape[-1]
        one = _unused(mx.float32)  # stands for every buffer this variant never reads
        y, state, *_ = self._run(
            "kda_decode",
            [q, k, v, g, beta, one, one, state, mx.array([T], mx.int32), one, one, one, one, one, one, one],
            template=[("InT", v.dtype), ("StT", mx.float32), ("H", H), ("Dk", Dk), ("Dv", Dv), ("K", 1),
                      ("Layer", False), ("Threads", DECODE_THREADS), ("Rows", DECODE_ROWS)],
            grid=(DECODE_THREADS, Dv // DECODE_ROWS, B * H),
            threadgroup=(DECODE_THREADS, 1, 1),
            output_shapes=[(B, T, H, Dv), (B, H, Dv, Dk), (1,), (1,), (1,)],
            output_dtypes=[v.dtype, mx.float32, v.dtype, v.dtype, v.dtype],
        )
        return y, state

    def layer(self, qkv, windows, conv_w, f, b, A_log, dt_bias, gate, norm_w, eps, state):
        """The Layer kda_decode: kda_decode_layer's contract (see there), the kernels' side."""
        B, T, W = qkv.shape
        H, Dk, Dv, K = f.shape[-2], f.shape[-1], gate.shape[-1], conv_w.shape[1]
        dt = qkv.dtype
        state = mx.zeros((B, H, Dv, Dk), mx.float32) if state is None else state.astype(mx.float32)
        y, state, wq, wk, wv = self._run(
            "kda_decode",
            [qkv, _unused(dt), _unused(dt), f, b, A_log.reshape(H), dt_bias.reshape(H * Dk), state,
             mx.array([T], mx.int32), conv_w.reshape(W, K), *windows, gate, norm_w, mx.array([eps], mx.float32)],
            template=[("InT", dt), ("StT", mx.float32), ("H", H), ("Dk", Dk), ("Dv", Dv), ("K", K),
                      ("Layer", True), ("Threads", 4 * Dv), ("Rows", Dv)],
            grid=(4 * Dv, 1, B * H),
            threadgroup=(4 * Dv, 1, 1),
            output_shapes=[(B, T, H, Dv), (B, H, Dv, Dk), *(w.shape for w in windows)],
            output_dtypes=[dt, mx.float32, dt, dt, dt],
        )
        return y, [wq, wk, wv], state

    def __call__(self, q, k, v, g, beta, state=None):
        """kda_metal's contract; the kernels must support (Dk, Dv) (see `supports`)."""
        B, T, H, Dk = k.shape
        Dv = v.shape[-1]
        state = mx.zeros((B, H, Dv, Dk), mx.float32) if state is None else state.astype(mx.float32)
        if T == 0:
            return mx.zeros((B, 0, H, Dv), dtype=v.dtype), state
        return self.decode(q, k, v, g, beta, state)

    def self_check(self, H: int, Dk: int, Dv: int, qk_dtype, v_dtype) -> str | None:
        """Each kernel configuration kda_metal runs, against kda_naive on a small random input
        (batch 2; 3 and CHUNK + 5 tokens; q, k in qk_dtype, v in v_dtype, which with the sizes
        pick the compiled instance). Returns None when all agree, else what went wrong."""
        rng = np.random.default_rng(0)
        tol = max(CHECK_TOL.get(qk_dtype, 2e-2), CHECK_TOL.get(v_dtype, 2e-2))
        rnd = lambda *s: mx.array(rng.standard_normal(s).astype(np.float32))  # noqa: E731
        try:
            for T in (3, CHUNK + 5):
                qr, kr, v, f = rnd(2, T, H, Dk), rnd(2, T, H, Dk), rnd(2, T, H, Dv), rnd(2, T, H, Dk)
                b, A_log, dt_bias, state = rnd(2, T, H), 0.5 * rnd(H), rnd(H * Dk), 0.5 * rnd(2, H, Dv, Dk)
                q, k, g, beta = prologue_ops(qr, kr, f, b, A_log, dt_bias)
                q, k, v = q.astype(qk_dtype), k.astype(qk_dtype), v.astype(v_dtype)
                problem = _compare("kda_metal", self(q, k, v, g, beta, state), kda_naive(q, k, v, g, beta, state),
                                   tol, f"T={T}, H={H}, Dk={Dk}, Dv={Dv}, q/k {qk_dtype}, v {v_dtype}")
                if problem:
                    return problem
        except Exception as e:  # a kernel that does not compile or launch
            return _failure(e)
        return None

    def self_check_layer(self, H: int, Dk: int, Dv: int, K: int, dtype) -> str | None:
        """The Layer kda_decode against decode_layer_ops (kimi_mlx/kda/prologue.py: the layer's
        own math) on a small random input: batch 2, one token and three (the window crossed)."""
        rng = np.random.default_rng(1)
        tol = CHECK_TOL.get(dtype, 2e-2)
        rnd = lambda *s: mx.array(rng.standard_normal(s).astype(np.float32)).astype(dtype)  # noqa: E731
        C, Cv = H * Dk, H * Dv
        try:
            for T in (1, 3):
                args = (rnd(2, T, 2 * C + Cv), [rnd(2, K - 1, C), rnd(2, K - 1, C), rnd(2, K - 1, Cv)],
                        0.5 * rnd(2 * C + Cv, K, 1), rnd(2, T, H, Dk), rnd(2, T, H), 0.5 * rnd(H).astype(mx.float32),
                        rnd(H * Dk).astype(mx.float32), rnd(2, T, H, Dv), 1 + 0.1 * rnd(Dv), 1e-5,
                        0.5 * rnd(2, H, Dv, Dk).astype(mx.float32))
                y, windows, state = self.layer(*args)
                ry, rwin, rstate = decode_layer_ops(*args)
                where = f"T={T}, H={H}, Dk={Dk}, Dv={Dv}, K={K}, {dtype}"
                problem = (_compare("kda_decode_layer", (y, state), (ry, rstate), tol, where)
                           or (None if all(mx.array_equal(a, r).item() for a, r in zip(windows, rwin))
                               else f"kda_decode_layer conv windows differ from the ops step's ({where})"))
                if problem:
                    return problem
        except Exception as e:
            return _failure(e)
        return None


def _compare(what: str, out, ref, tol: float, where: str) -> str | None:
    for name, x, r in (("output", out[0], ref[0]), ("state", out[1], ref[1])):
        err = relative_error(x, r)
        if not err <= tol:  # NaN fails too
            return f"{what} {name} differs from the reference (relative error {err:.2e} > {tol:.0e} at {where})"
    return None


def _failure(e: Exception) -> str:
    return f"kernel failed ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"


# --- which path runs ----------------------------------------------------------------------

_backends: dict[str, MetalKDA] = {}  # by GPU backend, built on first use
_override: tuple[MetalKDA | None, str | None] | None = None  # tests: (kernels, backend name)
_checked: dict[tuple, str | None] = {}
_warned: set[str] = set()


def set_kernel_mode(mode: str | None) -> None:
    """Force "ops", "metal" or "auto" for this process; None goes back to $KIMI_MLX_KERNELS."""
    _switch.force(mode, "set_kernel_mode")


def get_kernel_mode() -> str:
    """set_kernel_mode() > $KIMI_MLX_KERNELS > "auto" (the one PathSwitch mechanism)."""
    return _switch.forced() or "auto"


def _use_backend(backend: MetalKDA | None, available: bool | None = None, name: str = "emulator") -> None:
    """Tests: run `backend` (e.g. the CPU emulator) as if the default device were a GPU
    (available=True), as if it were the CPU (False), or go back to the real dispatch (backend
    None, available None); forgets every self-check result."""
    global _override
    _override = None if backend is None and available is None else (backend, name if available else None)
    _checked.clear()
    _warned.clear()


def _current() -> tuple[str | None, MetalKDA | None]:
    """(GPU backend name or None, its kernels or None when unreadable)."""
    if _override is not None:
        return _override[1], _override[0]
    name = gpu_backend()
    if name is None or _SOURCE_ERROR or (name == "cuda" and CUDA_COMPAT is None):
        return name, None
    if name not in _backends:
        _backends[name] = MetalKDA(kernel_factory(name), backend=name)
    return name, _backends[name]


def _problem(key: tuple, Dk: int, Dv: int, check) -> str | None:
    """Why the kernels cannot be used for this configuration, or None when they can."""
    name, kernels = _current()
    if name is None:
        return "the default device is the CPU (the kernels run on a GPU)"
    if kernels is None:
        return _SOURCE_ERROR or f"{METAL_DIR / CUDA_HEADER} unreadable"
    if not supports(Dk, Dv):
        return f"head dims Dk={Dk}, Dv={Dv} are not supported by the kernels"
    full = (name, *key)
    if full not in _checked:  # once per process, backend and configuration
        _checked[full] = check(kernels)
    problem = _checked[full]
    return None if problem is None else f"self-check failed on {name}: {problem}"


def kernel_status(H: int, Dk: int, Dv: int, qk_dtype=mx.float32, v_dtype=mx.float32) -> str | None:
    """None when the kernels passed their self-check for this configuration, else why not
    (for `kimi-mlx doctor`; runs the self-check once, like kda_metal, but never warns)."""
    return _problem((H, Dk, Dv, qk_dtype, v_dtype), Dk, Dv, lambda kern: kern.self_check(H, Dk, Dv, qk_dtype, v_dtype))


def layer_status(H: int, Dk: int, Dv: int, K: int, dtype) -> str | None:
    """kernel_status of the Layer kda_decode (kda_decode_layer) for this activation dtype."""
    return _problem(("layer", H, Dk, Dv, K, dtype), Dk, Dv, lambda kern: kern.self_check_layer(H, Dk, Dv, K, dtype))


def kernel_backend() -> str | None:
    """Where the kernels would run now: "metal", "cuda" (the default device's GPU backend), or
    None on the CPU device (tests may stand the emulator in: "emulator")."""
    return _current()[0]


def metal_ready(H: int, Dk: int, Dv: int, qk_dtype=mx.float32, v_dtype=mx.float32) -> bool:
    """True when kda_metal would run the kernels for these sizes (runs the self-check once).

    For the dispatcher's auto choice: False in "ops" mode, and (after one warning) when the
    kernels cannot be used; raises in "metal" mode instead of returning False."""
    return _kernels(H, Dk, Dv, qk_dtype, v_dtype, "kda_metal") is not None


def layer_ready(H: int, Dk: int, Dv: int, K: int, dtype) -> bool:
    """True when kda_decode_layer runs the kernel for these sizes and activation dtype (its
    self-check runs once; evaluates arrays, so call it outside mx.compile traces). False in
    "ops" mode and (after one warning) when the kernel cannot be used; raises in "metal" mode."""
    mode = get_kernel_mode()
    if mode == "ops":
        return False
    return _decide(layer_status(H, Dk, Dv, K, dtype), mode, "kda_decode_layer") is not None


def _decide(problem: str | None, mode: str, what: str):
    if problem is None:
        return _current()[1]
    if mode == "metal":
        raise RuntimeError(f"{what}: kernels forced (mode 'metal') but {problem}")
    if problem not in _warned:
        _warned.add(problem)
        warnings.warn(f"{what}: {problem}; using the MLX ops path", RuntimeWarning, stacklevel=4)
    return None


def _kernels(H, Dk, Dv, qk_dtype, v_dtype, what) -> MetalKDA | None:
    mode = get_kernel_mode()
    if mode == "ops":
        return None
    key = (H, Dk, Dv, qk_dtype, v_dtype)
    problem = _problem(key, Dk, Dv, lambda kern: kern.self_check(*key))
    return _decide(problem, mode, what)


def _ops(q, k, v, g, beta, state):
    """The fallback: pure MLX ops (chunked for prefill, the recurrence for short inputs)."""
    return (kda_chunked if k.shape[1] >= CHUNK else kda_naive)(q, k, v, g, beta, state)


def kda_metal(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """KDA over T tokens on the kernels (the ops path where they cannot run).

    Shapes:
        q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g: [B, T, H, Dk]; beta: [B, T, H]
        state: [B, H, Dv, Dk] float32 or None (zeros)
    Returns (o [B, T, H, Dv] in v.dtype, state [B, H, Dv, Dk] float32).
    """
    _, _, H, Dk = k.shape
    kernels = _kernels(H, Dk, v.shape[-1], q.dtype, v.dtype, "kda_metal")
    return (kernels or _ops)(q, k, v, g, beta, state)


def kda_decode_layer(qkv, windows, conv_w, f, b, A_log, dt_bias, gate, norm_w, eps, state):
    """A KDA layer's step from its projections to what o_proj reads, in ONE kernel when
    `layer_ready` (checked by the caller, outside any trace), else in MLX ops
    (prologue.decode_layer_ops, the reference of the same signature).

    Shapes (C = H Dk, Cv = H Dv, K the conv width):
        qkv: [B, T, 2C + Cv] the q, k, v projections side by side (before the conv)
        windows: 3 arrays [B, K-1, C], [B, K-1, C], [B, K-1, Cv] (the convs' last inputs)
        conv_w: [2C + Cv, K, 1] the three convs' weights stacked; f: [B, T, H, Dk] gate
        pre-activation (f_b output, without dt_bias); b: [B, T, H] beta logits; A_log: H values;
        dt_bias: [H * Dk]; gate: [B, T, H, Dv] output gate pre-activation; norm_w: [Dv], eps: float
        (the output RMSNorm); state: [B, H, Dv, Dk] float32 or None
    Returns (y [B, T, H, Dv] in qkv.dtype: RMSNorm(o) * sigmoid(gate), new windows, state).
    """
    H, Dk, Dv, K = f.shape[-2], f.shape[-1], gate.shape[-1], conv_w.shape[1]
    if get_kernel_mode() != "ops" and layer_ready(H, Dk, Dv, K, qkv.dtype):
        return _current()[1].layer(qkv, windows, conv_w, f, b, A_log, dt_bias, gate, norm_w, eps, state)
    return decode_layer_ops(qkv, windows, conv_w, f, b, A_log, dt_bias, gate, norm_w, eps, state)
