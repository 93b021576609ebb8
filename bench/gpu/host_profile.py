"""Where the host's time goes in one decode step: graph building (Python and mx.compile replay)
against evaluation, ours and mlx-lm's, on the full-size random 4-bit model.

    PYTHONPATH=$PWD python3 bench/gpu/host_profile.py          # on the H200 (MLX CUDA), ~40 s
    python bench/gpu/host_profile.py --tiny                    # dry run on the CPU

A decode step on the H200 costs ~10 us per kernel and a few ms of host work (bench/gpu/NOTES.md);
this prints, per library: the median build time (model call to the lazy argmax), the median
synced step, and for ours the cProfile of 10 builds (top functions by own time). Not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_gpu import FULL_CONFIG, TINY_CONFIG, build_models, count_ops, planted_caches, quantized_config  # noqa: E402


def steps(model, cache, n: int, profile: cProfile.Profile | None = None) -> tuple[float, float]:
    """(median build ms, median synced step ms) over n decode steps after two warm-ups."""
    y = mx.array([[1]])
    build, total = [], []
    for i in range(n + 2):
        if profile is not None and i >= 2:
            profile.enable()
        t0 = time.perf_counter()
        nxt = mx.argmax(model(y, cache=cache)[:, -1], axis=-1)
        t1 = time.perf_counter()
        if profile is not None:
            profile.disable()
        mx.eval(nxt)
        t2 = time.perf_counter()
        if i >= 2:
            build.append(t1 - t0)
            total.append(t2 - t0)
        y = nxt[None]
    return 1e3 * statistics.median(build), 1e3 * statistics.median(total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--context", type=int, default=1024)
    a = ap.parse_args()
    config = quantized_config(TINY_CONFIG if a.tiny else json.loads(FULL_CONFIG.read_text()))
    theirs, ours, _ = build_models(config)
    c_ours, c_theirs = planted_caches(config, a.context, seed=0)
    nodes = count_ops(mx.argmax(ours(mx.array([[1]]), cache=c_ours)[:, -1], axis=-1))
    for name, model, cache in (("ours", ours, c_ours), ("mlx-lm", theirs, c_theirs)):
        b, t = steps(model, cache, 20)
        print(f"{name}: build {b:.2f} ms, synced step {t:.2f} ms", flush=True)
    print(f"ours: {nodes[0]} graph nodes, {nodes[1]} kernels per step")
    prof = cProfile.Profile()
    steps(ours, c_ours, 10, prof)
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
