"""The MoE route kernel (metal/moe_route.metal) on a real GPU: does it pass its self-check inside
MLX, and what does it buy per decode token?

    PYTHONPATH=$PWD python3 bench/gpu/route_check.py          # on the H200 (MLX CUDA)
    python bench/gpu/route_check.py --tiny                    # dry run on the CPU (no kernel there)

Full-size random 4-bit model (bench/bench_gpu.py's builder), 1k-token planted context. Decode
tok/s (median of --runs, our generate loop, 32 tokens) with the route kernel (auto) and with the
ops router (moe_route.route_ready patched to False, decode traces rebuilt), then mlx-lm's; and
the kernels of one decode step each (bench_gpu.count_ops). Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_gpu import (FULL_CONFIG, TINY_CONFIG, build_models, count_ops, decode_run, planted_caches,  # noqa: E402
                       quantized_config)

from kimi_mlx import moe_route  # noqa: E402
from kimi_mlx.config import ModelArgs  # noqa: E402


def forget_traces(model) -> None:
    for layer in model.layers:
        layer.__dict__.pop("_decode_fns", None)
        layer.__dict__.pop("_decode_traced", None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    t0 = time.perf_counter()
    config = quantized_config({**TINY_CONFIG, "num_experts": 16, "num_experts_per_token": 8} if a.tiny
                              else json.loads(FULL_CONFIG.read_text()))
    args = ModelArgs.from_dict(config)
    theirs, ours, _ = build_models(config)
    E, k, renorm = args.num_experts, args.num_experts_per_token, args.moe_renormalize
    print(f"device {mx.default_device()}; route kernel status for {k} of {E}: "
          f"{moe_route.route_status(E, k, renorm) or 'passed its self-check'}", flush=True)
    context, tokens = (64, 8) if a.tiny else (1024, 32)
    rows = {}
    real_ready = moe_route.route_ready
    for name, ready in (("kernel", real_ready), ("ops router", lambda *_: False)):
        moe_route.route_ready = ready
        import kimi_mlx.decode as decode_mod

        decode_mod.route_ready = ready
        forget_traces(ours)
        try:
            c_ours, _ = planted_caches(config, context, seed=0)
            decode_run("ours", ours, c_ours, tokens)  # traces
            runs = [decode_run("ours", ours, planted_caches(config, context, seed=r)[0], tokens) for r in range(a.runs)]
            c_ours, _ = planted_caches(config, context, seed=0)
            logits = ours(mx.array([[1]]), cache=c_ours)
            _, kernels = count_ops(mx.argmax(logits[:, -1], axis=-1))
            rows[name] = (statistics.median(runs), kernels)
        finally:
            moe_route.route_ready = real_ready
            decode_mod.route_ready = real_ready
        print(f"ours ({name}): {rows[name][0]:.1f} tok/s, {rows[name][1]} kernels per token", flush=True)
    runs = [decode_run("theirs", theirs, planted_caches(config, context, seed=r)[1], tokens) for r in range(a.runs)]
    theirs_tps = statistics.median(runs)
    print(f"mlx-lm: {theirs_tps:.1f} tok/s", flush=True)
    print(f"\n| decode at {context} | tok/s | kernels/token | vs mlx-lm |\n| --- | --- | --- | --- |")
    for name, (tps, kern) in rows.items():
        print(f"| ours, {name} | {tps:.1f} | {kern} | {tps / theirs_tps:.2f}x |")
    print(f"| mlx-lm | {theirs_tps:.1f} | | |\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
