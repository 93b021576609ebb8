"""Issue 16's GPU measurement in one call: the model on 1 GPU against 2 ranks (tensor, pipeline).

    PYTHONPATH=$PWD python3 bench/gpu/parallel_x2.py --budget 540     # nvidia-h200-x2 (MLX CUDA, NCCL)
    python bench/gpu/parallel_x2.py --tiny --backend ring             # dry run on the CPU (ring on localhost)

Runs bench/bench_parallel.py three times, one after the other, each under its share of the
budget: one process on GPU 0 (CUDA_VISIBLE_DEVICES=0), then `mlx.launch --backend nccl -n 2`
(rank r on GPU r) in tensor mode, then in pipeline mode. Each run builds the released
architecture with random 4-bit weights (split before evaluation: a rank only holds its share)
and measures prefill tok/s over --prompt tokens and decode tok/s over --decode tokens. Writes
each run's JSON and log under $OUT (or --out), then prints the table last, with the ratios to
one GPU and issue 16's targets (per-rank weights <= 55% of one, decode >= 1.3x, prefill >= 1.6x).
Not a test: timings are never asserted. A run that fails or times out is a row saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "bench_parallel.py"
LAUNCH = [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]
TARGETS = {"weights": 0.55, "decode": 1.3, "prefill": 1.6}


def run(name: str, cmd: list[str], env: dict, out: Path, timeout: float) -> dict | None:
    """One bench run; its JSON (rank 0's last stdout line) or None, with the log in out/name.log."""
    t0 = time.monotonic()
    log = out / f"{name}.log"
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True,
                             start_new_session=True)  # its own process group: mlx.launch's ranks die with it
        try:
            stdout, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            stdout, _ = p.communicate()
            f.write(f"\n[parallel_x2] timed out after {timeout:.0f} s\n")
        f.write(stdout)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    print(f"[{name}] rc={p.returncode} {time.monotonic() - t0:.0f} s: {lines[-1] if lines else 'no result'}",
          flush=True)
    if p.returncode != 0 or not lines:
        return None
    result = json.loads(lines[-1])
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


def table(results: dict[str, dict | None]) -> str:
    one = results.get("one")
    rows = [f"{'run':<10}{'ranks':>6}{'prefill tok/s':>15}{'decode tok/s':>14}{'weights GiB/rank':>18}"
            f"{'peak GiB/rank':>15}  vs one GPU (targets: weights <= 55%, decode >= 1.3x, prefill >= 1.6x)"]
    for name, r in results.items():
        if r is None:
            rows.append(f"{name:<10}{'':>6}  failed or timed out (see {name}.log)")
            continue
        w, peak = max(r["weights_gib_per_rank"]), max(r["peak_gib_per_rank"])
        vs = ""
        if one is not None and name != "one":
            ratios = {"weights": w / max(one["weights_gib_per_rank"][0], 1e-9),
                      "decode": r["decode_tok_s"] / max(one["decode_tok_s"], 1e-9),
                      "prefill": r["prefill_tok_s"] / max(one["prefill_tok_s"], 1e-9)}
            ok = {"weights": ratios["weights"] <= TARGETS["weights"], "decode": ratios["decode"] >= TARGETS["decode"],
                  "prefill": ratios["prefill"] >= TARGETS["prefill"]}
            vs = (f"weights {ratios['weights']:.1%} {'ok' if ok['weights'] else 'MISS'}, "
                  f"decode {ratios['decode']:.2f}x {'ok' if ok['decode'] else 'MISS'}, "
                  f"prefill {ratios['prefill']:.2f}x {'ok' if ok['prefill'] else 'MISS'}")
        rows.append(f"{name:<10}{r['ranks']:>6}{r['prefill_tok_s']:>15.1f}{r['decode_tok_s']:>14.2f}{w:>18.3f}"
                    f"{peak:>15.3f}  {vs}")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="bench_parallel's tiny model (CPU dry run)")
    ap.add_argument("--backend", default="nccl", help="mlx.launch backend: nccl (GPUs) or ring (CPU dry run)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all three runs")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (bench_parallel's default: 4096)")
    ap.add_argument("--decode", type=int, default=None, help="decoded tokens (bench_parallel's default: 128)")
    ap.add_argument("--modes", default="tensor,pipeline", help="the 2-rank modes to run, in order")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = Path(a.out or os.environ.get("OUT") or ROOT / "bench" / "gpu" / "parallel_x2_out")
    out.mkdir(parents=True, exist_ok=True)
    args = (["--tiny"] if a.tiny else []) + (["--prompt", str(a.prompt)] if a.prompt else []) + \
        (["--decode", str(a.decode)] if a.decode else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OUT", None)  # bench_parallel would write its own copy there: results go through --out here
    modes = [m for m in a.modes.split(",") if m]
    end = time.monotonic() + a.budget
    results: dict[str, dict | None] = {}
    plan = [("one", [sys.executable, str(BENCH), *args], {**env, "CUDA_VISIBLE_DEVICES": "0"})]
    port = 47000 + os.getpid() % 1000
    for i, mode in enumerate(modes):
        launch = LAUNCH + ["--backend", a.backend, "-n", "2", "--env", f"KIMI_MLX_PARALLEL={mode}"]
        if a.backend == "ring":
            launch += ["-p", str(port + 10 * i)]
        plan.append((mode, [*launch, "--", sys.executable, str(BENCH), *args], {**env, "KIMI_MLX_PARALLEL": mode}))
    for i, (name, cmd, run_env) in enumerate(plan):
        share = (end - time.monotonic()) / (len(plan) - i)  # what is left, split over the runs left
        if share < 10:
            results[name] = None
            continue
        results[name] = run(name, cmd, run_env, out, share)
    (out / "parallel_x2.json").write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
