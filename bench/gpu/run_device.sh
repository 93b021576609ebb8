#!/usr/bin/env bash
# One use of the lent GPU machine, call 2 of the protocol in bench/gpu/NOTES.md (after call 1 has
# stashed the CUDA backend): install MLX's CUDA backend, run the suite's GPU mode on the KDA,
# precision, decode, long-context and parity tests, the route kernel's check (route_check.py), then
# the whole bench_gpu.py table (printed last). Logs and JSON go to $OUT. Time caps keep the call inside the device budget.
#   bash .gpu/b/install.sh && bash bench/gpu/run_device.sh [TEST_SECONDS] [BENCH_BUDGET_SECONDS]
set -u
OUT=${OUT:-/tmp/kimi-mlx-device}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
TESTS_S=${1:-90}
BENCH_S=${2:-300}
python3 -c 'import transformers, tiktoken, jinja2' 2>/dev/null \
  || python3 -m pip install -q --no-index --no-deps ~/.gpu-stash/h17/*.whl .gpu/h17/b/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
t0=$(date +%s)
# TF32 on (MLX's default): the paths that must stay fp32 keep it themselves (kimi_mlx/precision.py).
KIMI_MLX_TEST_DEVICE=gpu timeout $((TESTS_S / 3)) python3 -m pytest -q -rf -p no:cacheprovider \
  tests/test_precision.py tests/test_kda.py > "$OUT/tests_tf32_on.log" 2>&1
echo "tests (TF32 on) rc=$? in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/tests_tf32_on.log")"
t1=$(date +%s)
# TF32 off: these compare whole fp32 models, whose every projection is an fp32 GEMM.
KIMI_MLX_TEST_DEVICE=gpu MLX_ENABLE_TF32=0 timeout $((TESTS_S * 2 / 3)) python3 -m pytest -q -rf -p no:cacheprovider \
  tests/test_decode.py tests/test_long_context.py tests/test_parity.py > "$OUT/tests_tf32_off.log" 2>&1
echo "tests (TF32 off) rc=$? in $(( $(date +%s) - t1 )) s: $(tail -1 "$OUT/tests_tf32_off.log")"
grep -h "^FAILED\|^ERROR" "$OUT"/tests_*.log | head -20
# The MoE route kernel on the GPU: self-check inside MLX, decode with it vs the ops router vs mlx-lm (~60 s).
timeout 150 python3 bench/gpu/route_check.py > "$OUT/route_check.log" 2>&1
echo "route_check rc=$?"
grep -v "Warning" "$OUT/route_check.log" | tail -8
timeout $((BENCH_S + 40)) python3 bench/bench_gpu.py --budget "$BENCH_S" --prefill-steps 2048 --prefill-experts grouped \
  --out "$OUT/bench_gpu.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
grep -v "^  " "$OUT/bench.log" | tail -45
