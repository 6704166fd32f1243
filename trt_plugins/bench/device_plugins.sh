#!/usr/bin/env bash
# Device call for the plugins: GPU kernel tests, plugin harness tests (build + enqueue vs reference), the field
# fuzzer and the enqueue tests under compute-sanitizer (memcheck). Needs TensorRT headers under .deps/ (carry them).
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-out/device}  # the device tool sets OUT; elsewhere the logs go here
mkdir -p "$OUT"
which cmake g++ compute-sanitizer; ls /usr/lib/gcc/x86_64-linux-gnu/*/libasan.so 2>/dev/null | head -2
bash trt_plugins/bench/device_run.sh test 2>&1 | tail -4
timeout 900 python3 -m pytest -q -ra trt_plugins/tests/test_plugins.py 2>&1 | tee $OUT/plugins.log | tail -15
python3 - <<'PY'
import sys; sys.path.insert(0, "trt_plugins/tests")
from pathlib import Path
import plugin_harness as ph
r = ph.build(ph.header_roots()[-1], Path("/tmp/pf"), targets=("qmamba_plugins", "qmamba_plugin_fuzz"))
print("fuzz build rc", r.returncode, r.stderr[-1500:])
PY
compute-sanitizer --tool memcheck --require-cuda-init=no --error-exitcode 3 /tmp/pf/qmamba_plugin_fuzz /tmp/pf/libqmamba_plugins.so 3000 5 2>&1 | tail -4; echo "fuzz under compute-sanitizer rc=${PIPESTATUS[0]}"
timeout 420 compute-sanitizer --tool memcheck --error-exitcode 3 python3 -m pytest -q -x -m gpu trt_plugins/tests/test_plugins.py -k "enqueue and 1-1" 2>&1 | tail -6
