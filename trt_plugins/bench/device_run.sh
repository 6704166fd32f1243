#!/usr/bin/env bash
# One device call: build the kernels for sm_90, run the GPU kernel tests, then the benchmarks. Logs to $OUT.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
nvcc --version | tail -1 | tee -a "$OUT/device.txt"
( time bash trt_plugins/kernels/build.sh build/trt_plugins ) 2>&1 | tail -3
python3 -m pytest -q -ra -m gpu trt_plugins/tests/test_kernels.py 2>&1 | tee "$OUT/tests.log" | tail -25
timeout 300 python3 trt_plugins/bench/bench_kernels.py --out "$OUT/bench.md" --reps 20 2>&1 | tail -40
