#!/usr/bin/env bash
# `make demo`: the main job on the shipped tiny model, on CPU.
# calibrate -> per-stage compare -> perplexity table (-> export + ONNX Runtime check when available).
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
  "$QMAMBA" export "$OUT/qdir-w8a8-dualscale" --out "$OUT/onnx" --stages
  "$QMAMBA" check "$OUT/onnx/prefill.onnx" --reference "$OUT/qdir-w8a8-dualscale" --backend onnxruntime \
    --out "$OUT/check-onnxruntime"
fi

echo
if python3 -c "import tensorrt" 2>/dev/null && command -v nvidia-smi >/dev/null; then
  echo "== 5. TensorRT: see 'make test-trt' in the docker image (docker/README.md)"
else
  echo "== 5. skipped TensorRT engine build + check: no TensorRT runtime/GPU on this machine" \
       "(run it in the docker image: docker/README.md)"
fi
echo "demo outputs in $OUT/"
