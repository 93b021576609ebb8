"""A MoE router's expert choice (sigmoid scores, top-k with the correction bias, renormalised
weights) as ONE GPU kernel, metal/moe_route.metal, beside its reference in MLX ops.

    route(logits [..., E] fp32, bias [E] fp32, top_k, renormalize, scale)
        -> (ids [..., k] uint32, weights [..., k] fp32)
    route(..., shared=True)   (the shared expert as expert E, weight 1: kimi_mlx/fused.py)
        -> (rows [..., 2k+2] uint32 = (ids, E, ids + E + 1, 2E + 1), weights [..., k+1] fp32)

`moe.route` is the reference (the math of the checkpoint's router, 6 kernels per MoE layer and
decode step: a decode step is launch-bound, bench/gpu/NOTES.md); `route_kernel` is the same
math in one launch, on Metal (mx.fast.metal_kernel) and CUDA (mx.fast.cuda_kernel with
metal/cuda_compat.h) from one source, and on the CPU emulator in tests. The expert SET is the
reference's (its order may differ: argpartition's is arbitrary; the MoE sums over the k slots);
a tie between the k-th and the next expert keeps the lower index.

Which runs: the kernel mode of kimi_mlx.kda.metal (one switch for all our kernels:
set_kernel_mode() > $KIMI_MLX_KERNELS > auto). auto: the kernel where the default device is a GPU
and its self-check (against moe.route, once per process and configuration) passed, else the
reference with one warning; "metal": the kernel or an error; "ops": the reference. The kernel
has no gradient: training forces "ops" (kimi_mlx/demo/train.py). Call `route_ready` outside
mx.compile traces first (the self-check evaluates arrays; kimi_mlx/decode.py does).
"""

from __future__ import annotations

import hashlib
import warnings

import mlx.core as mx
import numpy as np

from .kda.metal import CUDA_COMPAT, METAL_DIR, _failure, get_kernel_mode, gpu_backend, kernel_factory, load_sources

MAX_EXPERTS = 4096  # experts a threadgroup of <= 1024 threads covers (4 per thread)
# The self-check's tolerance on the weights (float32 both sides; the GPU's exp may differ by ulps).
CHECK_TOL = 1e-5


@mx.compile
def route_ops(logits: mx.array, bias: mx.array, top_k: int, renormalize: bool, scale: float):
    """The reference: logits [..., E] -> (expert ids [..., k] uint32, weights [..., k] fp32).

    Compiled (the ints are trace constants): the elementwise steps fuse, ~10 kernels fewer per
    MoE layer and token."""
    scores = mx.sigmoid(logits.astype(mx.float32))  # [..., E]
    choice = scores + bias.astype(mx.float32)
    ids = mx.stop_gradient(mx.argpartition(-choice, kth=top_k - 1, axis=-1)[..., :top_k])
    weights = mx.take_along_axis(scores, ids, axis=-1)  # [..., k]
    if renormalize:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return ids, weights * scale


def with_shared(ids: mx.array, weights: mx.array, num_experts: int):
    """(ids [..., k], weights [..., k]) -> the shared=True form: rows [..., 2k+2] of the stacked
    gate/up weights (ids, E, ids + E + 1, 2E + 1) and weights [..., k+1] (weights, 1)."""
    E = num_experts
    one = mx.ones((*ids.shape[:-1], 1), mx.uint32)
    ids = mx.concatenate([ids.astype(mx.uint32), E * one], axis=-1)  # [..., k+1]
    rows = mx.concatenate([ids, ids + (E + 1)], axis=-1)
    return rows, mx.concatenate([weights, one.astype(weights.dtype)], axis=-1)


def _load():
    try:
        return load_sources(METAL_DIR / "moe_route.metal")["moe_route"], None
    except (OSError, ValueError, KeyError) as e:
        return None, f"kernel source unreadable ({e})"


SOURCE, _SOURCE_ERROR = _load()


def threads_for(num_experts: int) -> int:
    """Threads per threadgroup: one expert each (a multiple of 32), at most 1024."""
    return min(1024, -(-num_experts // 32) * 32)


class RouteKernel:
    """moe_route built by one kernel factory (Metal, CUDA, or the CPU emulator in tests)."""

    def __init__(self, factory=None, backend: str = "metal", source=None):
        self.factory = factory or mx.fast.metal_kernel
        self.source = source or SOURCE
        prefix = CUDA_COMPAT if backend == "cuda" else ""
        # MLX caches a kernel by name (CUDA: on disk too): the source's digest is part of it.
        self.name = "moe_route__" + hashlib.sha256("\0".join([prefix, self.source.header, self.source.body])
                                                  .encode()).hexdigest()[:10]
        self._kernel = None

    def __call__(self, logits: mx.array, bias: mx.array, top_k: int, renormalize: bool, scale: float,
                 shared: bool = False):
        """route's contract (logits [..., E], any leading shape)."""
        if self._kernel is None:
            s = self.source
            self._kernel = self.factory(name=self.name, input_names=list(s.input_names),
                                        output_names=list(s.output_names), source=s.body, header=s.header)
        *lead, E = logits.shape
        N = logits.size // E
        threads = threads_for(E)
        ids, weights = self._kernel(
            inputs=[logits.reshape(N, E).astype(mx.float32), bias.astype(mx.float32),
                    mx.array([scale], mx.float32)],
            template=[("E", E), ("K", top_k), ("Threads", threads), ("Renorm", bool(renormalize)),
                      ("Shared", bool(shared))],
            grid=(threads, N, 1),
            threadgroup=(threads, 1, 1),
            output_shapes=[(N, 2 * top_k + 2), (N, top_k + 1)] if shared else [(N, top_k), (N, top_k)],
            output_dtypes=[mx.uint32, mx.float32],
        )
        return mx.stop_gradient(ids).reshape(*lead, ids.shape[-1]), weights.reshape(*lead, weights.shape[-1])

    def self_check(self, E: int, top_k: int, renormalize: bool) -> str | None:
        """Against route_ops on random logits and bias (7 tokens), then a token whose choices all
        tie (the k lowest indices win). None when all agree, else what differs."""
        rng = np.random.default_rng(0)
        logits = mx.array(rng.standard_normal((7, E)).astype(np.float32))
        bias = mx.array((0.1 * rng.standard_normal(E)).astype(np.float32))
        where = f"E={E}, k={top_k}, renormalize={renormalize}"
        try:
            problem = compare_routes(self(logits, bias, top_k, renormalize, 2.5),
                                     route_ops(logits, bias, top_k, renormalize, 2.5), CHECK_TOL, where)
            if problem:
                return problem
            ids, _ = self(mx.full((1, E), 0.25), mx.zeros((E,)), top_k, renormalize, 1.0)
            if sorted(np.array(ids)[0].tolist()) != list(range(top_k)):
                return f"moe_route broke a tie for {sorted(np.array(ids)[0].tolist())}, not the lowest indices ({where})"
            rows, w = self(logits, bias, top_k, renormalize, 2.5, shared=True)
            ref_rows, ref_w = with_shared(*self(logits, bias, top_k, renormalize, 2.5), E)
            if not (mx.array_equal(rows, ref_rows) and mx.array_equal(w, ref_w)).item():
                return f"moe_route with the shared expert differs from its plain output plus the shared slot ({where})"
        except Exception as e:  # a kernel that does not compile or launch
            return _failure(e)
        return None


def compare_routes(out, ref, tol: float, where: str) -> str | None:
    """None when each token's expert set is the reference's and the weights (matched by expert)
    agree within tol (||w - w_ref|| / ||w_ref|| per token), else what differs."""
    ids, w = (np.array(a).reshape(-1, a.shape[-1]) for a in out)
    rids, rw = (np.array(a).reshape(-1, a.shape[-1]) for a in ref)
    if ids.shape != rids.shape or w.shape != rw.shape:
        return f"moe_route shapes {ids.shape}, {w.shape} != {rids.shape}, {rw.shape} ({where})"
    for i in range(ids.shape[0]):
        a, b = np.argsort(ids[i]), np.argsort(rids[i])
        if not np.array_equal(ids[i][a], rids[i][b]):
            return (f"moe_route chose experts {sorted(ids[i].tolist())} where the reference chose "
                    f"{sorted(rids[i].tolist())} (token {i}, {where})")
        err = np.linalg.norm(w[i][a] - rw[i][b]) / max(np.linalg.norm(rw[i]), 1e-30)
        if not err <= tol:
            return f"moe_route weights differ from the reference (relative error {err:.2e} > {tol:.0e}, {where})"
    return None


# --- which path runs ----------------------------------------------------------------------

_kernels: dict[str, RouteKernel] = {}
_override: tuple[RouteKernel | None, str | None] | None = None  # tests: (kernel, backend name)
_checked: dict[tuple, str | None] = {}
_warned: set[str] = set()


def _use_backend(kernel: RouteKernel | None, available: bool | None = None, name: str = "emulator") -> None:
    """Tests: run `kernel` (e.g. on the CPU emulator) as if the default device were a GPU
    (available=True), or go back to the real dispatch (None, None); forgets the checks."""
    global _override
    _override = None if kernel is None and available is None else (kernel, name if available else None)
    _checked.clear()
    _warned.clear()


def _current() -> tuple[str | None, RouteKernel | None]:
    if _override is not None:
        return _override[1], _override[0]
    name = gpu_backend()
    if name is None or SOURCE is None or (name == "cuda" and CUDA_COMPAT is None):
        return name, None
    if name not in _kernels:
        _kernels[name] = RouteKernel(kernel_factory(name), backend=name)
    return name, _kernels[name]


def route_status(E: int, top_k: int, renormalize: bool) -> str | None:
    """None when the kernel can run this configuration (its self-check passed), else why not."""
    name, kernel = _current()
    if name is None:
        return "the default device is the CPU (the kernel runs on a GPU)"
    if kernel is None:
        return _SOURCE_ERROR or f"{METAL_DIR / 'cuda_compat.h'} unreadable"
    if not 1 <= top_k <= E <= MAX_EXPERTS:
        return f"{top_k} of {E} experts is outside what the kernel handles (1 <= k <= E <= {MAX_EXPERTS})"
    key = (name, E, top_k, bool(renormalize))
    if key not in _checked:
        _checked[key] = kernel.self_check(E, top_k, renormalize)
    problem = _checked[key]
    return None if problem is None else f"self-check failed on {name}: {problem}"


def route_ready(E: int, top_k: int, renormalize: bool) -> bool:
    """True when `route` runs the kernel for this configuration (the self-check runs once and
    evaluates arrays: call outside mx.compile traces). False in "ops" mode and, after one
    warning, when the kernel cannot be used; raises in "metal" mode instead."""
    mode = get_kernel_mode()
    if mode == "ops":
        return False
    problem = route_status(E, top_k, renormalize)
    if problem is None:
        return True
    if mode == "metal":
        raise RuntimeError(f"moe_route: kernels forced (mode 'metal') but {problem}")
    if problem not in _warned:  # once per reason; on the CPU the reference is the plan, no warning
        _warned.add(problem)
        if _current()[0] is not None:
            warnings.warn(f"moe_route: {problem}; using the MLX ops router", RuntimeWarning, stacklevel=3)
    return False


def route(logits: mx.array, bias: mx.array, top_k: int, renormalize: bool, scale: float, shared: bool = False):
    """logits [..., E] -> (expert ids [..., k] uint32, weights [..., k] fp32), or with `shared`
    the rows and weights of with_shared: the kernel when `route_ready`, else route_ops (see the
    module docstring)."""
    if route_ready(logits.shape[-1], top_k, renormalize):
        return _current()[1](logits, bias, top_k, renormalize, scale, shared)
    out = route_ops(logits, bias, top_k, renormalize, scale)
    return with_shared(*out, logits.shape[-1]) if shared else out
