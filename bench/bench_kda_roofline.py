"""Bytes and FLOPs of the KDA recurrence per decode step and per 64-token prefill chunk, at the
released shape, against the M3 Max roofline (400 GB/s, ~14 TFLOPS fp32).

    python bench/bench_kda_roofline.py            # the counts (any machine)
    python bench/bench_kda_roofline.py --measure  # on a Mac also: both Metal routes, mx.fast and
                                                  # chunked ops timed over a sweep of T

Counted per KDA layer for batch 1, then for the 20 KDA layers. Each stage is one or more
dispatches that stream their inputs and outputs through DRAM once (caches ignored, MLX
elementwise ops unfused): a stage takes max(bytes / 400 GB/s, FLOPs / 14 TFLOPS) at best.
The roofline ignores dispatch latency (some microseconds per dispatch on a Mac), so the
dispatch count is its own column. Rows other than the Metal paths are estimates of the MLX-op
paths for comparison. Prints a table and writes bench/results/bench_kda_roofline.json. Not a
test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The released config (models/Kimi-Linear-48B-A3B-Instruct.config.json): linear_attn_config
# num_heads 32, head_dim 128, 20 kda_layers.
H, DK, DV, LAYERS = 32, 128, 128, 20
C = 64  # chunk length
SEGMENT_CHUNKS = 64  # chunks a batched op covers per dispatch (the ops path's segment)
BW, PEAK = 400e9, 14e12  # M3 Max: memory bandwidth (B/s), fp32 peak (FLOP/s)
F32, BF16 = 4, 2


@dataclass
class Stage:
    name: str
    flops: float
    read: float  # bytes
    written: float
    dispatches: float

    @property
    def seconds(self) -> float:
        return max((self.read + self.written) / BW, self.flops / PEAK)


def decode_paths() -> dict[str, list[Stage]]:
    """One token, one layer. Layer-side tensors (raw q, k, v, f, b) come in bf16. The Layer kernel
    also does the short convs and the output norm + gate, which the other rows leave out."""
    S = H * DV * DK * F32  # the fp32 state, read and written once per token at best
    rec = 7 * H * DV * DK  # per state element: decay 1, kv 2, write 2, output 2
    chan = H * DK
    prologue = Stage("prologue in MLX ops (q/k norm, gate, beta)", 30 * chan, 12 * chan * F32, 12 * chan * F32, 15)
    return {
        "metal: kda_decode (Layer)": [
            # raw q|k|v, their conv windows (K-1 = 3 rows) and weights (K = 4), f, b, gate, norm
            # weight in bf16; A_log, dt_bias fp32; writes y and the new windows.
            Stage("kda_decode Layer: convs, prologue, recurrence, output norm + gate",
                  rec + 20 * chan + 8 * (2 * chan + H * DV) + 6 * H * DV,
                  S + ((3 + 9 + 12) * chan + 2 * H * DV + H + DV) * BF16 + (H + chan) * F32,
                  S + (H * DV + 9 * chan) * BF16, 1),
        ],
        "mx.fast.gated_delta_update": [
            prologue,
            Stage("exp(g), casts to fp32", chan, 3 * chan * F32, 3 * chan * F32, 3),
            Stage("gated_delta_update kernel", rec, S + (3 * chan + H * DV) * F32, S + H * DV * F32, 1),
        ],
        "ops: kda_step (no mx.compile)": [
            prologue,
            # S*exp(g); (S*k).sum: temp + sum; outer product; S + outer; (S*q).sum: temp + sum
            Stage("kda_step, state-sized passes: 2 + 3 + 1 + 3 + 3", rec, 7 * S, 5 * S, 12),
        ],
    }


def prefill_paths() -> dict[str, list[Stage]]:
    """One 64-token chunk, one layer; ops batched over a segment count 1/64 dispatch per chunk."""
    S = H * DV * DK * F32
    W = DK + DV
    per = 1 / SEGMENT_CHUNKS  # dispatches of a batched op, per chunk
    qk = H * C * DK * F32  # one fp32 [C, Dk] tensor over all heads
    vv = H * C * DV * F32
    rr = H * C * W * F32
    aa = H * C * C * F32  # one [C, C] matrix per head
    gram = 2 * (C * (C + 1) // 2) * DK * 2 * H  # A_qk and A_kk, j <= t
    shared = [
        Stage("chunk q, k, v, g, beta; exp(g); cumprods (MLX)", 3 * H * C * DK,
              2 * qk + H * C * DV * BF16 + qk, 4 * qk + vv + 3 * qk, 12 * per),
        Stage("decay grams A_qk, A_kk (MLX, hierarchical)", gram, 3 * qk, 2 * aa, 40 * per),
    ]
    state_loop = 3 * C * DK * DV * 2 * H  # U = U0 - W S^T, OI = QS S^T, S += U^T KS
    return {
        "ops: chunked.py (state loop in Python)": shared + [
            Stage("inverse of the unit triangle + Tinv [k e^G | v] (MLX)",
                  2 * C**3 // 3 * H + C * C * W * 2 * H, aa + 3 * rr, 3 * aa + 2 * rr, 30 * per),
            Stage("per-chunk loop: P = WQ S^T; U; o; S = S d + U^T KS", state_loop + H * C * C * DV * 2,
                  3 * S + 2 * qk + 6 * vv + aa, 2 * S + 5 * vv, 7),
        ],
        "recurrent kernel over the 64 tokens (kda_decode / mx.fast)": [
            Stage("token after token, state in registers (latency-bound: 64 steps)", 7 * H * DV * DK * C,
                  3 * qk + vv + H * C * F32 + 2 * S * per, vv, per),
        ],
    }


def summarise(paths: dict[str, list[Stage]], tokens: int) -> list[dict]:
    rows = []
    for name, stages in paths.items():
        read = sum(s.read for s in stages)
        written = sum(s.written for s in stages)
        flops = sum(s.flops for s in stages)
        secs = sum(s.seconds for s in stages)
        rows.append({
            "path": name,
            "bytes_per_layer": read + written,
            "flops_per_layer": flops,
            "flop_per_byte": flops / (read + written),
            "dispatches_per_layer": sum(s.dispatches for s in stages),
            "roofline_us_per_layer": secs * 1e6,
            "roofline_us_model": secs * 1e6 * LAYERS,
            "roofline_tokens_per_s_model": tokens / (secs * LAYERS),
            "stages": [asdict(s) | {"roofline_us": s.seconds * 1e6} for s in stages],
        })
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    head = f"{'path':58s} {'MB/layer':>9s} {'MFLOP/layer':>12s} {'FLOP/B':>7s} {'disp.':>6s} " \
           f"{'us/layer':>9s} {'us x20':>8s} {'tok/s x20':>10s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['path']:58s} {r['bytes_per_layer'] / 1e6:9.2f} {r['flops_per_layer'] / 1e6:12.1f} "
              f"{r['flop_per_byte']:7.2f} {r['dispatches_per_layer']:6.1f} {r['roofline_us_per_layer']:9.2f} "
              f"{r['roofline_us_model']:8.1f} {r['roofline_tokens_per_s_model']:10.0f}")
        for s in r["stages"]:
            print(f"    {s['name'][:54]:54s} {(s['read'] + s['written']) / 1e6:9.2f} {s['flops'] / 1e6:12.1f} "
                  f"{'':7s} {s['dispatches']:6.2f} {s['roofline_us']:9.2f}")


def median_time(fn, repeats: int) -> float:
    import mlx.core as mx

    mx.eval(fn())  # warm-up (and the kernels' one-time self-check)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(repeats: int, prefill_tokens: list[int]) -> dict | None:
    """On a Mac: the real thing beside its roofline over a sweep of T (our recurrent kernel, the
    chunk kernels were removed: see kimi_mlx/kda/metal.py). None where Metal is unavailable."""
    import mlx.core as mx
    import numpy as np

    if not mx.metal.is_available():
        return None
    from kimi_mlx.kda import kda_chunked, kda_mx_fast
    from kimi_mlx.kda.metal import MetalKDA, prologue_ops

    kern = MetalKDA()
    problem = kern.self_check(H, DK, DV, mx.bfloat16, mx.bfloat16) or kern.self_check_layer(H, DK, DV, 4, mx.bfloat16)
    if problem:
        raise SystemExit(f"the kernels fail their self-check, nothing to time: {problem}")
    rng = np.random.default_rng(0)
    rnd = lambda *s, dt=mx.bfloat16: mx.array(rng.standard_normal(s).astype(np.float32)).astype(dt)  # noqa: E731
    state = 0.1 * rnd(1, H, DV, DK, dt=mx.float32)
    raw = [rnd(1, 1, H, DK), rnd(1, 1, H, DK), rnd(1, 1, H, DV), rnd(1, 1, H, DK), rnd(1, 1, H),
           rnd(H, dt=mx.float32), rnd(H * DK, dt=mx.float32)]  # q, k, v, f, b, A_log, dt_bias
    C3 = 2 * H * DK + H * DV
    layer_args = (rnd(1, 1, C3), [rnd(1, 3, H * DK), rnd(1, 3, H * DK), rnd(1, 3, H * DV)], rnd(C3, 4, 1),
                  raw[3], raw[4], raw[5], raw[6], rnd(1, 1, H, DV), rnd(DV), 1e-5, state)

    def mx_fast_decode():
        q, k, g, beta = prologue_ops(raw[0], raw[1], raw[3], raw[4], raw[5], raw[6])
        return kda_mx_fast(q, k, raw[2], g, beta, state)

    out = {"decode": {"metal_step_s": median_time(lambda: kern.layer(*layer_args), repeats),
                      "mx_fast_with_prologue_s": median_time(mx_fast_decode, repeats)},
           "prefill": []}
    for T in prefill_tokens:
        qr, kr, f = rnd(1, T, H, DK), rnd(1, T, H, DK), rnd(1, T, H, DK)
        q, k, g, beta = prologue_ops(qr, kr, f, rnd(1, T, H), raw[5], raw[6])
        v = rnd(1, T, H, DV)
        paths = {"metal_recurrent": kern.decode, "mx_fast": kda_mx_fast,
                 "chunked_ops": kda_chunked}
        out["prefill"].append({"tokens": T} | {
            f"{name}_s": median_time(lambda fn=fn: fn(q, k, v, g, beta, state), max(3, repeats // 4))
            for name, fn in paths.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", action="store_true", help="on a Mac, also time the paths")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--prefill-tokens", default="64,256,1024,4096", help="comma-separated T sweep")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bench_kda_roofline.json")
    args = ap.parse_args()

    print(f"KDA at H={H}, Dk=Dv={DK}, {LAYERS} layers, batch 1; roofline {BW / 1e9:.0f} GB/s, "
          f"{PEAK / 1e12:.0f} TFLOPS fp32 (M3 Max); ridge {PEAK / BW:.0f} FLOP/B")
    decode = summarise(decode_paths(), tokens=1)
    prefill = summarise(prefill_paths(), tokens=C)
    print_table("Decode: one token", decode)
    print_table(f"Prefill: one chunk of {C} tokens", prefill)
    result = {"shape": {"H": H, "Dk": DK, "Dv": DV, "layers": LAYERS, "chunk": C, "batch": 1},
              "roofline": {"bandwidth_Bps": BW, "peak_flops": PEAK}, "decode": decode, "prefill": prefill}
    if args.measure:
        measured = measure(args.repeats, [int(t) for t in args.prefill_tokens.split(",")])
        if measured is None:
            print("\n--measure: Metal is not available here; nothing timed")
        else:
            result["measured"] = measured
            best = {r["path"]: r["roofline_us_per_layer"] for r in decode}
            d = measured["decode"]
            print(f"\nMeasured decode, one layer: metal Layer step {d['metal_step_s'] * 1e6:.1f} us "
                  f"(roofline {best['metal: kda_decode (Layer)']:.1f} us), mx.fast + prologue (no conv, no output) "
                  f"{d['mx_fast_with_prologue_s'] * 1e6:.1f} us "
                  f"({d['mx_fast_with_prologue_s'] / d['metal_step_s']:.2f}x the metal time)")
            print("Measured prefill, one layer (ms): T, metal recurrent, metal chunk, mx.fast, chunked ops")
            for p in measured["prefill"]:
                print(f"  {p['tokens']:6d} {p['metal_recurrent_s'] * 1e3:9.2f} {p['metal_chunk_s'] * 1e3:9.2f} "
                      f"{p['mx_fast_s'] * 1e3:9.2f} {p['chunked_ops_s'] * 1e3:9.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
