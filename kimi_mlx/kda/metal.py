"""KDA on our own Metal kernels (metal/kda_decode.metal, metal/kda_chunk.metal).

Conventions are stated once in kimi_mlx/kda/__init__.py. `kda_metal` has the signature and
returns of every other path; `kda_metal_step` also does the layer's per-token prologue.

Which parts are kernels, and why:
  * `kda_decode`: the recurrence with the state in registers, one threadgroup per (b, h, 32
    rows of Dv), 4 lanes per row. Decode is bandwidth-bound (the 2 MB fp32 state of a layer is
    read and written once per token); the fused variant also computes q/k norms, gate and beta,
    which in MLX ops are ~15 dispatches per layer of a few KB each: at decode, dispatch costs
    dominate them.
  * Prefill, the chunkwise WY/UT form of chunked.py. Its bulk is matmuls batched over every
    chunk at once (decay grams, A_qk U): MLX's matmuls are the best tool there, so they stay.
    Two pieces are sequential and become kernels:
      - `kda_chunk_ut`: the unit lower-triangular solve of each chunk by forward substitution,
        one thread per column: ~C^2 (Dk + Dv) / 2 multiply-adds per chunk and one dispatch,
        where chunked.py inverts (~C^3 / 3, ~30 small matmuls) and then multiplies.
      - `kda_chunk_state`: the pass that carries the fp32 state from chunk to chunk, the state
        in threadgroup memory. In MLX ops it is a Python loop of 7 ops per chunk that streams
        the 2 MB state through memory 5 times per chunk (bench/bench_kda_roofline.py).
Which route runs: kda_decode, for every T. The chunk route (`MetalKDA.prefill`) is NOT wired:
no measurement has shown it faster (the roofline, bench/bench_kda_roofline.py, has it moving ~9x
the bytes of the recurrent kernel per 64 tokens at batch 1; the recurrent kernel is bound by its
T sequential steps instead). Its kernels stay, tested on the CPU emulator and timed as CUDA by
bench/gpu/run_kernels.py, as the candidate; wire it (and self-check it) once a Mac or GPU
measurement shows it winning. Until then the runtime never runs or self-checks it.
Every kernel is run in the test suite on the CPU (tests/metal_emu) against kda_naive. On a
Mac, each kernel configuration is checked once per process against kda_naive on a small input
before first use; if it fails or does not compile, one warning and the ops path.

Which path runs: `set_kernel_mode()` > $KIMI_MLX_KERNELS > "auto".
  auto   kernels where Metal is available and the self-check passed, else the ops path
  metal  kernels or an error (never a silent fallback: for benchmarks and debugging)
  ops    never the kernels
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..precision import fp32_matmul, relative_error
from .chunked import _decay_gram, _to_chunks, kda_chunked
from .naive import kda_naive
from .prologue import prologue
from ..switch import PathSwitch


def _metal_dir() -> Path:
    """The repo's metal/ (checkouts, editable installs), else the kimi_mlx/metal/ a wheel installs
    (pyproject.toml maps it there)."""
    here = Path(__file__).resolve()
    candidates = (here.parents[2] / "metal", here.parents[1] / "metal")
    return next((d for d in candidates if (d / "kda_decode.metal").is_file()), candidates[0])


METAL_DIR = _metal_dir()
ENV_VAR = "KIMI_MLX_KERNELS"
MODES = ("auto", "metal", "ops")
_switch = PathSwitch("kernel mode", ENV_VAR, MODES)  # registers ENV_VAR for check_environment
CHUNK = 64  # chunk length of the prefill form
SEGMENT = 64 * CHUNK  # prefill tokens per round of chunk kernels: bounds the per-chunk buffers
DECODE_THREADS, DECODE_ROWS = 128, 32  # threads and Dv rows per threadgroup: template args of both kernels
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
        return {**load_sources(METAL_DIR / "kda_decode.metal"), **load_sources(METAL_DIR / "kda_chunk.metal")}, None
    except (OSError, ValueError) as e:  # e.g. installed without the metal/ folder
        return {}, f"kernel sources unreadable ({e})"


SOURCES, _SOURCE_ERROR = _load_all()  # read once, at import


def supports(Dk: int, Dv: int) -> bool:
    """Head sizes the kernels handle: 4 lanes per state row, 32 rows per threadgroup, and the
    chunk kernel's state tile (32 x (Dk + 1) floats) plus U (64 x 32) within 32 KB."""
    return Dk % 4 == 0 and Dv % 32 == 0 and 4 <= Dk <= 128


# The layer's per-token prologue in MLX ops (what Fused kda_decode computes): one definition.
prologue_ops = prologue


class MetalKDA:
    """The KDA kernels, built by one kernel factory: `mx.fast.metal_kernel` on a Mac, the CPU
    emulator (tests/metal_emu/emulate.py) in tests. Same wrapper code either way."""

    def __init__(self, factory=None, sources: dict[str, KernelSource] | None = None):
        factory = factory or mx.fast.metal_kernel
        self.kernels = {
            s.name: factory(name=s.name, input_names=list(s.input_names), output_names=list(s.output_names),
                            source=s.body, header=s.header)
            for s in (sources or SOURCES).values()
        }

    def decode(self, q, k, v, g, beta, state, A_log=None, dt_bias=None):
        """kda_decode over T tokens; Fused when A_log is given (then q, k raw, g = f, beta = logit)."""
        B, T, H, Dk = k.shape
        Dv = v.shape[-1]
        fused = A_log is not None
        unused = mx.zeros((1,), mx.float32)  # never read by the plain kernel
        y, state = self.kernels["kda_decode"](
            inputs=[q, k, v, g, beta, A_log if fused else unused, dt_bias if fused else unused, state, T],
            template=[("InT", v.dtype), ("StT", mx.float32), ("H", H), ("Dk", Dk), ("Dv", Dv), ("Fused", fused),
                      ("Threads", DECODE_THREADS), ("Rows", DECODE_ROWS)],
            grid=(DECODE_THREADS, Dv // DECODE_ROWS, B * H),
            threadgroup=(DECODE_THREADS, 1, 1),
            output_shapes=[(B, T, H, Dv), (B, H, Dv, Dk)],
            output_dtypes=[v.dtype, mx.float32],
        )
        return y, state

    def _chunk_segment(self, q, k, v, g, beta, state):
        """One segment of prefill through the chunk kernels; returns (o [B, T, H, Dv] f32, state)."""
        B, T, H, Dk = k.shape
        Dv, C, f32 = v.shape[-1], CHUNK, mx.float32
        qc, kc, vc, gc, bc = (_to_chunks(x, C) for x in (q, k, v, g, beta))  # [B, H, N, C, ...]
        N, M, W = qc.shape[2], B * H * qc.shape[2], Dk + Dv
        a = mx.exp(gc)
        A = _decay_gram(mx.stack([qc, kc], axis=-3), kc, a)  # [B, H, N, 2, C, C]
        since = mx.cumprod(a, axis=-2)  # decay from the chunk start, [B, H, N, C, Dk]
        until = mx.cumprod(a, axis=-2, reverse=True, inclusive=False)  # to the chunk end
        R = mx.concatenate([kc * since, vc], axis=-1)  # [B, H, N, C, Dk + Dv]
        nt = min(256, -(-W // 32) * 32)
        (X,) = self.kernels["kda_chunk_ut"](
            inputs=[A[..., 1, :, :].reshape(M, C, C), bc.reshape(M, C), R.reshape(M, C, W)],
            template=[("C", C), ("W", W)],
            grid=(nt, 1, M),
            threadgroup=(nt, 1, 1),
            output_shapes=[(M, C, W)],
            output_dtypes=[f32],
        )
        X = X.reshape(B, H, N, C, W)
        U, OI, state = self.kernels["kda_chunk_state"](
            inputs=[X[..., :Dk], qc * since, kc * until, X[..., Dk:], since[..., -1, :], state, N],
            template=[("C", C), ("Dk", Dk), ("Dv", Dv), ("Threads", DECODE_THREADS), ("Rows", DECODE_ROWS)],
            grid=(DECODE_THREADS, Dv // DECODE_ROWS, B * H),
            threadgroup=(DECODE_THREADS, 1, 1),
            output_shapes=[(B, H, N, C, Dv), (B, H, N, C, Dv), (B, H, Dv, Dk)],
            output_dtypes=[f32, f32, f32],
        )
        o = fp32_matmul(A[..., 0, :, :], U) + OI  # in-chunk part + what the start state gives, [B, H, N, C, Dv]
        o = o.reshape(B, H, N * C, Dv)[:, :, :T]
        return mx.swapaxes(o, 1, 2), state

    def prefill(self, q, k, v, g, beta, state):
        """The chunk route (kda_chunk_ut + kda_chunk_state around MLX ops), SEGMENT tokens a round."""
        outs = []
        for s in range(0, k.shape[1], SEGMENT):
            part = slice(s, min(k.shape[1], s + SEGMENT))
            o, state = self._chunk_segment(q[:, part], k[:, part], v[:, part], g[:, part], beta[:, part], state)
            outs.append(o)
        o = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)
        return o.astype(v.dtype), state

    def __call__(self, q, k, v, g, beta, state=None):
        """kda_metal's contract; the kernels must support (Dk, Dv) (see `supports`)."""
        B, T, H, Dk = k.shape
        Dv = v.shape[-1]
        state = mx.zeros((B, H, Dv, Dk), mx.float32) if state is None else state.astype(mx.float32)
        if T == 0:
            return mx.zeros((B, 0, H, Dv), dtype=v.dtype), state
        return self.decode(q, k, v, g, beta, state)  # the only wired route (module docstring)

    def step(self, q, k, v, f, b, A_log, dt_bias, state=None):
        """kda_metal_step's contract (fused prologue), any T."""
        B, T, H, Dk = k.shape
        Dv = v.shape[-1]
        state = mx.zeros((B, H, Dv, Dk), mx.float32) if state is None else state.astype(mx.float32)
        if T == 0:
            return mx.zeros((B, 0, H, Dv), dtype=v.dtype), state
        return self.decode(q, k, v, f, b, state, A_log.reshape(H), dt_bias.reshape(H * Dk))

    def self_check(self, H: int, Dk: int, Dv: int, qk_dtype, v_dtype) -> str | None:
        """Each kernel configuration against kda_naive on a small random input (kda_decode at 3
        and 69 tokens, and the fused step; q, k (and the step's f, b) in qk_dtype, v in v_dtype, which with the
        sizes pick the compiled instance). Returns None when all agree, else what went wrong."""
        rng = np.random.default_rng(0)
        tol = max(CHECK_TOL.get(qk_dtype, 2e-2), CHECK_TOL.get(v_dtype, 2e-2))
        rnd = lambda *s: mx.array(rng.standard_normal(s).astype(np.float32))  # noqa: E731
        try:
            for T in (3, CHUNK + 5):
                qr, kr, v, f = rnd(1, T, H, Dk), rnd(1, T, H, Dk), rnd(1, T, H, Dv), rnd(1, T, H, Dk)
                b, A_log, dt_bias, state = rnd(1, T, H), 0.5 * rnd(H), rnd(H * Dk), 0.5 * rnd(1, H, Dv, Dk)
                q, k, g, beta = prologue_ops(qr, kr, f, b, A_log, dt_bias)
                q, k, v = q.astype(qk_dtype), k.astype(qk_dtype), v.astype(v_dtype)
                ref = kda_naive(q, k, v, g, beta, state)
                runs = {"kda_metal": self.decode(q, k, v, g, beta, state)}  # the route kda_metal runs
                if T < CHUNK:
                    qs, ks, fs, bs = (x.astype(qk_dtype) for x in (qr, kr, f, b))
                    runs["kda_metal_step"] = self.step(qs, ks, v, fs, bs, A_log, dt_bias, state)
                for what, out in runs.items():
                    for name, x, r in (("output", out[0], ref[0]), ("state", out[1], ref[1])):
                        err = relative_error(x, r)
                        if not err <= tol:  # NaN fails too
                            return (f"{what} {name} differs from kda_naive (relative error {err:.2e} > {tol:.0e} "
                                    f"at T={T}, H={H}, Dk={Dk}, Dv={Dv}, q/k {qk_dtype}, v {v_dtype})")
        except Exception as e:  # a kernel that does not compile or launch
            return f"kernel failed ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
        return None




# --- which path runs ----------------------------------------------------------------------

_backend: MetalKDA | None = None
_backend_available: bool | None = None  # None: ask mx.metal
_checked: dict[tuple, str | None] = {}
_warned: set[str] = set()


def set_kernel_mode(mode: str | None) -> None:
    """Force "ops", "metal" or "auto" for this process; None goes back to $KIMI_MLX_KERNELS."""
    _switch.force(mode, "set_kernel_mode")


def get_kernel_mode() -> str:
    """set_kernel_mode() > $KIMI_MLX_KERNELS > "auto" (the one PathSwitch mechanism)."""
    return _switch.forced() or "auto"


def _use_backend(backend: MetalKDA | None, available: bool | None = None) -> None:
    """Swap the kernels (tests: the CPU emulator) and forget every self-check result."""
    global _backend, _backend_available
    _backend, _backend_available = backend, available
    _checked.clear()
    _warned.clear()


def _problem(H: int, Dk: int, Dv: int, qk_dtype, v_dtype) -> str | None:
    """Why the kernels cannot be used for this configuration, or None when they can."""
    global _backend
    available = mx.metal.is_available() if _backend_available is None else _backend_available
    if not available:
        return "Metal is not available on this machine"
    if _SOURCE_ERROR and _backend is None:
        return _SOURCE_ERROR
    if not supports(Dk, Dv):
        return f"head dims Dk={Dk}, Dv={Dv} are not supported by the kernels"
    if _backend is None:
        _backend = MetalKDA()
    key = (H, Dk, Dv, qk_dtype, v_dtype)
    if key not in _checked:  # once per process and configuration
        _checked[key] = _backend.self_check(*key)
    problem = _checked[key]
    return None if problem is None else f"self-check failed: {problem}"


def kernel_status(H: int, Dk: int, Dv: int, qk_dtype=mx.float32, v_dtype=mx.float32) -> str | None:
    """None when the kernels passed their self-check for this configuration, else why not
    (for `kimi-mlx doctor`; runs the self-check once, like kda_metal, but never warns)."""
    return _problem(H, Dk, Dv, qk_dtype, v_dtype)


def metal_ready(H: int, Dk: int, Dv: int, qk_dtype=mx.float32, v_dtype=mx.float32) -> bool:
    """True when kda_metal would run the kernels for these sizes (runs the self-check once).

    For the dispatcher's auto choice: False in "ops" mode, and (after one warning) when the
    kernels cannot be used; raises in "metal" mode instead of returning False."""
    return _kernels(H, Dk, Dv, qk_dtype, v_dtype, "kda_metal") is not None


def _kernels(H, Dk, Dv, qk_dtype, v_dtype, what) -> MetalKDA | None:
    mode = get_kernel_mode()
    if mode == "ops":
        return None
    problem = _problem(H, Dk, Dv, qk_dtype, v_dtype)
    if problem is None:
        return _backend
    if mode == "metal":
        raise RuntimeError(f"{what}: kernels forced (mode 'metal') but {problem}")
    if problem not in _warned:
        _warned.add(problem)
        warnings.warn(f"{what}: {problem}; using the MLX ops path", RuntimeWarning, stacklevel=3)
    return None


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
    """KDA over T tokens on the Metal kernels (the ops path where they cannot run).

    Shapes:
        q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g: [B, T, H, Dk]; beta: [B, T, H]
        state: [B, H, Dv, Dk] float32 or None (zeros)
    Returns (o [B, T, H, Dv] in v.dtype, state [B, H, Dv, Dk] float32).
    """
    _, _, H, Dk = k.shape
    kernels = _kernels(H, Dk, v.shape[-1], q.dtype, v.dtype, "kda_metal")
    return (kernels or _ops)(q, k, v, g, beta, state)


def kda_metal_step(q, k, v, f, b, A_log, dt_bias, state=None):
    """KDA with the layer's per-token prologue fused in (meant for decode, any T works).

    Shapes:
        q, k: [B, T, H, Dk] after conv + SiLU, NOT normalised; v: [B, T, H, Dv]
        f: [B, T, H, Dk] gate pre-activation f_b(f_a(x)) without dt_bias; b: [B, T, H] beta logits
        A_log: H values (any shape); dt_bias: [H * Dk]; state: [B, H, Dv, Dk] float32 or None
    Computes q, k L2-normalised (q scaled by Dk^-0.5), g = -exp(A_log) softplus(f + dt_bias),
    beta = sigmoid(b), then the recurrence. Returns (o [B, T, H, Dv] in v.dtype, state).
    """
    _, _, H, Dk = k.shape
    kernels = _kernels(H, Dk, v.shape[-1], q.dtype, v.dtype, "kda_metal_step")
    if kernels is not None:
        return kernels.step(q, k, v, f, b, A_log, dt_bias, state)
    qn, kn, g, beta = prologue_ops(q, k, f, b, A_log, dt_bias)
    return _ops(qn, kn, v, g, beta, state)
