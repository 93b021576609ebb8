#!/usr/bin/env bash
# One use of the lent GPU machine, call 2 of the protocol in bench/gpu/NOTES.md (after call 1 has
# stashed the CUDA backend): the suite's GPU mode on the decode tests (compiled == eager, the
# fused MoE), where the host's time goes in a decode step (host_profile.py), then bench_gpu.py
# (printed last; BENCH_ONLY picks its sections). Logs and JSON go to $OUT; time caps keep the
# call inside the device budget.
#   bash .gpu/b/install.sh && bash bench/gpu/run_device.sh [TEST_SECONDS] [BENCH_BUDGET_SECONDS] [BENCH_ONLY]
set -u
OUT=${OUT:-/tmp/kimi-mlx-device}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
TESTS_S=${1:-60}
BENCH_S=${2:-300}
ONLY=${3:-}
python3 -c 'import transformers, tiktoken, jinja2' 2>/dev/null \
  || python3 -m pip install -q --no-index --no-deps ~/.gpu-stash/h17/*.whl .gpu/h17/b/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
t0=$(date +%s)
# TF32 off: these compare whole fp32 models, whose every projection is an fp32 GEMM.
KIMI_MLX_TEST_DEVICE=gpu MLX_ENABLE_TF32=0 timeout "$TESTS_S" python3 -m pytest -q -rf -p no:cacheprovider \
  tests/test_decode.py > "$OUT/tests_tf32_off.log" 2>&1
echo "tests (TF32 off) rc=$? in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/tests_tf32_off.log")"
grep -h "^FAILED\|^ERROR" "$OUT"/tests_*.log | head -20
t1=$(date +%s)
timeout 90 python3 bench/gpu/host_profile.py > "$OUT/host_profile.log" 2>&1
echo "host_profile rc=$? in $(( $(date +%s) - t1 )) s"
head -32 "$OUT/host_profile.log"
timeout $((BENCH_S + 60)) python3 bench/bench_gpu.py --budget "$BENCH_S" ${ONLY:+--only "$ONLY"} \
  --out "$OUT/bench_gpu.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
grep -v "^  " "$OUT/bench.log" | tail -45
