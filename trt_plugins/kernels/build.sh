#!/usr/bin/env bash
# Build libqmamba_kernels.so with nvcc (CMakeLists.txt does the same). Usage: build.sh OUT_DIR [ARCH_FLAGS...]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-build/trt_plugins}; shift || true
arch=${*:-"-gencode arch=compute_90,code=sm_90"}
mkdir -p "$out"
# shellcheck disable=SC2086
nvcc -O3 -std=c++17 -shared -Xcompiler -fPIC -Xcompiler -fvisibility=hidden $arch -fmad=false \
  -I"$here" "$here"/errors.cu "$here"/rmsnorm_quant.cu "$here"/quant_causal_conv1d.cu "$here"/selective_scan.cu \
  "$here"/hadamard_quant.cu "$here"/int8_linear.cu "$here"/tied_logits.cu "$here"/update_out_proj.cu "$here"/hadamard_slab.cu -o "$out/libqmamba_kernels.so"
echo "built $out/libqmamba_kernels.so"
