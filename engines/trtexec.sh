#!/usr/bin/env bash
# The trtexec recipe equivalent to `qmamba build-engine`:
#   engines/trtexec.sh ONNX_DIR PLUGIN_LIB OUT_DIR [max_batch=8] [max_len=2048] [max_decode_batch=64]
# Strongly typed (the ONNX graph fixes every precision); no weak-typing flags (removed in TensorRT 11).
set -euo pipefail
onnx=$1; lib=$2; out=$3; mb=${4:-8}; ml=${5:-2048}; md=${6:-64}
mkdir -p "$out"
# state inputs take their batch from the same profile: list every input of the decode graph
states=$(python3 -c "import onnx,sys; m=onnx.load('$onnx/decode.onnx', load_external_data=False); \
print(' '.join(i.name for i in m.graph.input if i.name!='input_ids'))")
dims() {  # NAME BATCH -> NAME:BATCHxD1x... from the ONNX input's static dims
  python3 -c "import onnx; m=onnx.load('$onnx/decode.onnx', load_external_data=False); \
i=[x for x in m.graph.input if x.name=='$1'][0]; \
print('$1:'+'x'.join(['$2']+[str(d.dim_value) for d in i.type.tensor_type.shape.dim[1:]]))"
}
trtexec --onnx="$onnx/prefill.onnx" --stronglyTyped \
  --dynamicPlugins="$lib" --setPluginsToSerialize="$lib" \
  --minShapes=input_ids:1x1 --optShapes=input_ids:1x256 --maxShapes=input_ids:${mb}x${ml} \
  --timingCacheFile="$out/timing.cache" --saveEngine="$out/prefill.engine"
mins="input_ids:1x1"; opts="input_ids:8x1"; maxs="input_ids:${md}x1"
for s in $states; do mins+=",$(dims "$s" 1)"; opts+=",$(dims "$s" 8)"; maxs+=",$(dims "$s" "$md")"; done
trtexec --onnx="$onnx/decode.onnx" --stronglyTyped \
  --dynamicPlugins="$lib" --setPluginsToSerialize="$lib" \
  --minShapes="$mins" --optShapes="$opts" --maxShapes="$maxs" \
  --timingCacheFile="$out/timing.cache" --saveEngine="$out/decode.engine"
echo "engines in $out (trtexec writes no engine.json: use qmamba build-engine for metadata checks)"
