"""`kimi-mlx doctor`: what this machine runs and whether our kernels can be trusted on it.

Prints a block a user can paste into a bug report: device, versions, memory, the KDA path chosen
per phase, each kernel's self-check against the naive recurrence and, on Metal, its speed
against the ops path and `mx.fast.gated_delta_update`.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version

import mlx.core as mx

from .decode import get_decode_path
from .experts import get_expert_path
from .kda import get_kda_path, kda_chunked, kda_mx_fast, kda_naive
from .kda import metal as kda_metal_mod
from .precision import reduced_fp32_matmul, relative_error

REAL_SHAPE = (32, 128, 128)  # KDA heads, Dk, Dv of Kimi-Linear-48B-A3B
PREFILL_T = 2048  # tokens of the timed prefill


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def total_memory_gb() -> float | None:
    try:
        if sys.platform == "darwin":
            out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, check=True)
            return int(out.stdout) / 2**30
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def _inputs(T: int, H: int, D: int, seed: int = 0):
    """Random KDA inputs in the convention of kimi_mlx.kda (normalised q, k; log-space gates)."""
    k1, k2, k3, k4, k5 = mx.random.split(mx.random.key(seed), 5)
    q = mx.random.normal((1, T, H, D), key=k1)
    k = mx.random.normal((1, T, H, D), key=k2)
    q = q * mx.rsqrt((q * q).sum(-1, keepdims=True)) * D**-0.5
    k = k * mx.rsqrt((k * k).sum(-1, keepdims=True))
    v = mx.random.normal((1, T, H, D), key=k3)
    g = -mx.exp(mx.random.normal((1, T, H, D), key=k4) - 2)
    beta = mx.sigmoid(mx.random.normal((1, T, H), key=k5))
    return q, k, v, g, beta




def check_ops_paths(T: int = 70, H: int = 2, D: int = 64) -> list[str]:
    """The ops paths against the naive recurrence on a small input (runs everywhere)."""
    args = _inputs(T, H, D)
    ref, _ = kda_naive(*args)
    lines = []
    for name, fn in (("chunked", kda_chunked), ("mx_fast", kda_mx_fast)):
        err = relative_error(fn(*args)[0], ref)
        lines.append(f"  {name:8s} vs naive: relative error {err:.1e} {'ok' if err < 1e-4 else 'FAILED'}")
    return lines


def _median_ms(fn, args, repeats: int = 5) -> float:
    mx.eval(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def kernel_report() -> list[str]:
    """Self-check per kernel configuration and speed, where the default device is a GPU (Metal
    or CUDA: the same kernel sources); nothing to check or time on the CPU device."""
    H, Dk, Dv = REAL_SHAPE
    lines = [f"kernel mode: {kda_metal_mod.get_kernel_mode()} (KIMI_MLX_KERNELS=auto|metal|ops)"]
    backend = kda_metal_mod.kernel_backend()
    if backend is None:
        lines.append("the default device is the CPU: the MLX ops paths are in use (chunked prefill, mx.fast decode)")
        return lines
    for dtype in (mx.float32, mx.bfloat16):
        problem = kda_metal_mod.kernel_status(H, Dk, Dv, dtype, dtype)
        lines.append(f"  kda kernels ({backend}) H={H} D={Dk} {dtype}: "
                     + ("self-check passed" if problem is None else problem))
        problem = kda_metal_mod.layer_status(H, Dk, Dv, 4, dtype)
        lines.append(f"  kda layer step kernel ({backend}) H={H} D={Dk} {dtype}: "
                     + ("self-check passed" if problem is None else problem))
    from . import moe_route  # the MoE router kernel (the released model: top-8 of 256 experts)

    problem = moe_route.route_status(256, 8, True)
    lines.append(f"  moe route kernel ({backend}) top-8 of 256: " + ("self-check passed" if problem is None else problem))
    if kda_metal_mod.kernel_status(H, Dk, Dv) is None:
        for T, label in ((1, "decode step"), (PREFILL_T, f"prefill {PREFILL_T}")):
            args = _inputs(T, H, Dk)
            ops = kda_chunked if T > 1 else kda_naive
            t_k = _median_ms(kda_metal_mod.kda_metal, args)
            t_o = _median_ms(ops, args)
            t_f = _median_ms(kda_mx_fast, args)
            lines.append(f"  {label}: kernels {t_k:.3f} ms | ops {t_o:.3f} ms ({t_o / t_k:.2f}x) | "
                         f"mx.fast {t_f:.3f} ms ({t_f / t_k:.2f}x)")
    return lines


def gpu_line() -> str:
    """The GPU MLX runs on: its name, backend and memory, and whether its float32 matmuls are
    reduced-precision (TF32), for which kimi-mlx keeps its fp32 paths exact (kimi_mlx/precision.py)."""
    if not mx.is_available(mx.gpu):
        return "gpu: none (MLX's CPU backend; on Linux + NVIDIA: pip install 'kimi-mlx[cuda]')"
    backend = "Metal" if mx.metal.is_available() else "CUDA" if mx.cuda.is_available() else "GPU"
    try:
        info = mx.device_info(mx.gpu)
    except (TypeError, RuntimeError):  # older MLX: device_info() has no device argument
        info = mx.device_info()
    name = info.get("device_name") or info.get("architecture") or "unknown"
    arch = info.get("architecture")
    mem = info.get("total_memory") or info.get("memory_size")
    reduced = reduced_fp32_matmul_on(mx.gpu)
    return (f"gpu: {name} ({backend}{', ' + arch if arch and arch != name else ''}"
            f"{f', {mem / 2**30:.1f} GiB' if mem else ''}); float32 matmuls "
            + ("reduced (TF32): kimi-mlx's fp32 paths use 3-pass products" if reduced else "full fp32"))


def reduced_fp32_matmul_on(device) -> bool:
    """precision.reduced_fp32_matmul's probe, run on `device`."""
    old = mx.default_device()
    mx.set_default_device(device)
    try:
        return reduced_fp32_matmul()
    finally:
        mx.set_default_device(old)


def report() -> str:
    mem = total_memory_gb()
    lines = [
        f"kimi-mlx {_version('kimi-mlx')} | mlx {mx.__version__} | mlx-lm {_version('mlx-lm')} | "
        f"python {platform.python_version()}",
        f"platform {platform.platform()} | device {mx.default_device()} | "
        f"metal {'yes' if mx.metal.is_available() else 'no'}",
        gpu_line(),
        f"memory {mem:.1f} GiB" if mem is not None else "memory unknown",
        f"decode steps: {get_decode_path()} (KIMI_MLX_DECODE=compiled|eager; auto: compiled on a GPU)",
        f"KDA path: decode {get_kda_path(1, (*REAL_SHAPE, mx.bfloat16, mx.bfloat16))}, "
        f"prefill {get_kda_path(2048, (*REAL_SHAPE, mx.bfloat16, mx.bfloat16))} "
        "(KIMI_MLX_KDA_PATH=naive|chunked|mx_fast|metal)",
        f"MoE experts: {get_expert_path()} (KIMI_MLX_EXPERT_PATH=gather|grouped|direct; auto: grouped for "
        "CPU prefill of float experts, else direct)",
        "ops paths:",
        *check_ops_paths(),
        *kernel_report(),
    ]
    return "\n".join(lines)
