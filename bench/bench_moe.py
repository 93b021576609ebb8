"""Routed experts on CPU: the gather path (mlx-lm's SwitchGLU) against the grouped path
(one matmul per expert), at the bench_model shape (hidden 1024, 64 experts of 256, top-8).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python bench/bench_moe.py

Prints the median time of each path per token count and their ratio; this is what sets
kimi_mlx.experts.CPU_GROUPED_MIN_ROWS_PER_EXPERT. Not a test: timings are never asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_lm.models.switch_layers import SwitchGLU  # noqa: E402

from kimi_mlx.experts import experts_gather, experts_grouped  # noqa: E402
from kimi_mlx.moe import route  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64, 256, 1024])
    ap.add_argument("--bits", type=int, default=None, help="quantize the experts (4 or 8)")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()

    mx.random.seed(0)
    mlp = SwitchGLU(a.hidden, a.inter, a.experts)
    if a.bits:
        nn.quantize(mlp, group_size=64, bits=a.bits)
    gate = nn.Linear(a.hidden, a.experts, bias=False)
    mx.eval(mlp.parameters(), gate.parameters())
    rows = []
    print(f"{'tokens':>7s} {'rows/expert':>11s} {'gather ms':>10s} {'grouped ms':>11s} {'speed-up':>9s}")
    for n in a.tokens:
        x = mx.random.normal((n, a.hidden))
        ids, w = route(gate(x), mx.zeros((a.experts,)), a.top_k, True, 2.446)
        mx.eval(x, ids, w)
        t_gather = median_ms(lambda: experts_gather(mlp, x, ids, w), a.repeats)
        t_grouped = median_ms(lambda: experts_grouped(mlp, x, ids, w), a.repeats)
        per_expert = n * a.top_k / a.experts
        print(f"{n:7d} {per_expert:11.2f} {t_gather:10.2f} {t_grouped:11.2f} {t_gather / t_grouped:9.2f}")
        rows.append({"tokens": n, "rows_per_expert": per_expert, "gather_ms": t_gather, "grouped_ms": t_grouped})
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    name = f"bench_moe{'_q' + str(a.bits) if a.bits else ''}.json"
    (out / name).write_text(json.dumps({"args": vars(a), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
