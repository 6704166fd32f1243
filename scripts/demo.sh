#!/usr/bin/env bash
# `make demo`: the main job on the shipped tiny model, on CPU.
# calibrate -> per-stage compare -> perplexity table -> export + ONNX Runtime check (-> TensorRT engines + check where
# TensorRT, a GPU and the plugin library are available; otherwise it says which is missing).
set -euo pipefail
QMAMBA=${1:-qmamba}
MODEL=models/qmamba-tiny
OUT=out/demo
mkdir -p "$OUT"

echo "== 1. calibrate $MODEL with recipe w8a8-dualscale"
"$QMAMBA" calibrate "$MODEL" --recipe w8a8-dualscale --samples 32 --seq-len 256 --out "$OUT/qdir-w8a8-dualscale" --force

echo
echo "== 2. per-stage comparison: w8a8-dualscale vs fp16"
"$QMAMBA" compare "$OUT/qdir-w8a8-dualscale" --reference fp16 --target w8a8-dualscale --batch 2 --length 256 \
  --out "$OUT/compare"

echo
echo "== 3. held-out perplexity per recipe"
"$QMAMBA" eval-ppl "$MODEL" --windows 8 --calib-samples 16 --markdown "$OUT/ppl.md"

if "$QMAMBA" export --help >/dev/null 2>&1; then
  echo
  echo "== 4. export to ONNX and check ONNX Runtime against PyTorch, stage by stage"
  "$QMAMBA" export "$OUT/qdir-w8a8-dualscale" --out "$OUT/onnx" --stages --force
  "$QMAMBA" check "$OUT/onnx/prefill.onnx" --reference "$OUT/qdir-w8a8-dualscale" --backend onnxruntime \
    --out "$OUT/check-onnxruntime"
fi

echo
# 5. TensorRT engines + per-stage check on them, where this machine can build and run them
PY="$(dirname "$(command -v "$QMAMBA")")/python"
[ -x "$PY" ] || PY=python3
PLUGINS=${QMAMBA_PLUGINS:-build/trt_plugins/libqmamba_plugins.so}
trt_skip=""
if ! "$PY" -c "import tensorrt" 2>/dev/null; then
  trt_skip="TensorRT's Python package is not importable by $PY"
elif ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  trt_skip="no CUDA GPU visible to PyTorch"
elif [ ! -d "$OUT/onnx" ]; then
  trt_skip="no exported ONNX graphs (step 4 did not run)"
fi
if [ -z "$trt_skip" ] && [ ! -f "$PLUGINS" ]; then
  echo "== 5a. building the plugin library ($PLUGINS) with CMake"
  if ! { cmake -S trt_plugins -B build/trt_plugins -DCMAKE_BUILD_TYPE=Release \
         && cmake --build build/trt_plugins -j"$(nproc)"; } > "$OUT/plugins-build.log" 2>&1 || [ ! -f "$PLUGINS" ]; then
    trt_skip="the plugin library could not be built (TensorRT headers not found?): see $OUT/plugins-build.log"
  fi
fi
if [ -z "$trt_skip" ]; then
  echo "== 5. TensorRT engines (prefill + decode) and a per-stage check of the engine against PyTorch"
  "$QMAMBA" build-engine "$OUT/onnx" --plugins "$PLUGINS" --out "$OUT/engine" \
    --batch 1,2,4 --length 1,64,512 --decode-batch 1,4,16 --force
  "$QMAMBA" check "$OUT/engine" --reference "$OUT/qdir-w8a8-dualscale" --backend tensorrt --out "$OUT/check-tensorrt"
else
  echo "== 5. skipped the TensorRT engine build + check: $trt_skip (the docker image has all it needs: docker/README.md)"
fi
echo "demo outputs in $OUT/"
