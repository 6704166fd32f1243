#!/usr/bin/env bash
# Device calls: `device_run.sh test` builds the kernels for sm_90 and runs the GPU kernel tests;
# `device_run.sh bench [ARGS]` runs the benchmarks (ARGS go to bench_kernels.py, e.g. --mamba-ssm-build DIR).
# `device_run.sh` alone does both. Logs to $OUT.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-out/device}  # the device tool sets OUT; elsewhere the logs go here
mkdir -p "$OUT"
what=${1:-all}; shift || true
if [[ $what == test || $what == all ]]; then
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
  nvcc --version | tail -1 | tee -a "$OUT/device.txt"
  ( time bash trt_plugins/kernels/build.sh build/trt_plugins ) 2>&1 | tail -3
  python3 -m pytest -q -ra -m gpu trt_plugins/tests/test_kernels.py 2>&1 | tee "$OUT/tests.log" | tail -25
fi
if [[ $what == bench || $what == all ]]; then
  timeout 400 python3 trt_plugins/bench/bench_kernels.py --out "$OUT/bench.md" --reps 20 "$@" 2>&1 | tail -60
fi
