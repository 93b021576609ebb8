"""KDA op speed: naive vs chunked vs mx.fast.gated_delta_update, same inputs, one process.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python bench/bench_kda.py
    python bench/bench_kda.py --seq-lens 1,16,64,256,2048     # where chunked starts to pay

(on Linux the BLAS inside `mlx[cpu]` is ~10x slower than Debian's OpenBLAS, and the chunked
path is mostly matmuls, so say which one ran.) Runs are round-robin over the paths so a
busy machine slows all of them alike. Prints medians after warm-up, as times and as speed
relative to mx.fast, plus each path's relative error against naive; writes JSON to
bench/results/. Not a test: timings are never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_mlx.kda import kda_chunked, kda_mx_fast, kda_naive  # noqa: E402

PATHS = {"naive": kda_naive, "chunked": kda_chunked, "mx_fast": kda_mx_fast}


def make_inputs(B: int, T: int, H: int, D: int, seed: int = 0):
    """Model-like inputs: q, k normalised (q scaled), gates from -exp(A) * softplus(x)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, D))
    k = rng.standard_normal((B, T, H, D))
    q = q / np.linalg.norm(q, axis=-1, keepdims=True) * D**-0.5
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, H, D))
    rate = np.exp(rng.uniform(-2, 1, size=(1, 1, H, 1)))  # exp(A_log), one per head
    g = -rate * np.logaddexp(0, rng.standard_normal((B, T, H, D)) - 2)
    beta = 1 / (1 + np.exp(-rng.standard_normal((B, T, H))))
    arrays = [mx.array(x, dtype=mx.float32) for x in (q, k, v, g, beta)]
    mx.eval(*arrays)
    return arrays


def rel_err(out: mx.array, ref: mx.array) -> float:
    return (mx.linalg.norm((out - ref).flatten()) / mx.linalg.norm(ref.flatten())).item()


def bench_one(B: int, T: int, H: int, D: int, paths: list[str], runs: int, warmup: int) -> dict:
    args = make_inputs(B, T, H, D)
    outs = {}
    for name in paths:  # warm-up, and keep one output for the accuracy column
        for _ in range(warmup):
            outs[name] = PATHS[name](*args)
            mx.eval(*outs[name])
    times = {name: [] for name in paths}
    for _ in range(runs):
        for name in paths:
            start = time.perf_counter()
            mx.eval(*PATHS[name](*args))
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    row = {"B": B, "T": T, "H": H, "D": D, "paths": {}}
    for name in paths:
        entry = {"median_s": med[name], "times_s": times[name]}
        if "mx_fast" in med:
            entry["speed_vs_mx_fast"] = med["mx_fast"] / med[name]
        if "naive" in outs and name != "naive":
            entry["rel_err_o"] = rel_err(outs[name][0], outs["naive"][0])
            entry["rel_err_state"] = rel_err(outs[name][1], outs["naive"][1])
        row["paths"][name] = entry
    return row


def blas_in_use() -> str:
    return "openblas" if "openblas" in os.environ.get("LD_PRELOAD", "") else "mlx-builtin"


def print_table(rows: list[dict]) -> None:
    print(f"{'T':>6} {'path':>8} {'median s':>10} {'vs mx.fast':>11} {'err o':>9} {'err state':>9}")
    for row in rows:
        for name, e in row["paths"].items():
            speed = f"{e['speed_vs_mx_fast']:.2f}x" if "speed_vs_mx_fast" in e else "-"
            err_o = f"{e['rel_err_o']:.1e}" if "rel_err_o" in e else "-"
            err_s = f"{e['rel_err_state']:.1e}" if "rel_err_state" in e else "-"
            print(f"{row['T']:>6} {name:>8} {e['median_s']:>10.4f} {speed:>11} {err_o:>9} {err_s:>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seq-lens", default="2048", help="comma-separated T values")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, help="default: bench/results/bench_kda_<blas>.json")
    a = parser.parse_args()
    paths = a.paths.split(",")
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        parser.error(f"unknown path(s) {unknown}; valid: {', '.join(PATHS)}")

    env = {
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "metal": mx.metal.is_available(),
        "blas": blas_in_use(),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
    }
    print(f"KDA B={a.batch} H={a.heads} Dk=Dv={a.head_dim}; mlx {env['mlx']} on {env['device']}, "
          f"BLAS {env['blas']}; median of {a.runs} after {a.warmup} warm-up")
    seq_lens = [int(T) for T in a.seq_lens.split(",")]
    rows = [bench_one(a.batch, T, a.heads, a.head_dim, paths, a.runs, a.warmup) for T in seq_lens]
    env["loadavg_after"] = os.getloadavg()
    print_table(rows)
    out = a.out or Path(__file__).parent / "results" / f"bench_kda_{env['blas']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
