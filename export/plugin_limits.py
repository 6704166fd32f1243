"""What the TensorRT plugins accept beyond the spec (trt_plugins/plugins/*/README.md), checked before a graph is
written: a model the plugins cannot run fails at export with the reason, instead of exporting, passing the
onnxruntime check and failing later at engine build. tests/test_export.py checks these numbers against the plugin
sources."""

from __future__ import annotations

from qmamba.config import MambaConfig
from qmamba.errors import UserError
from qmamba.ops.hadamard import factor

SCAN_STATE_SIZES = (8, 16, 32, 64)  # DualScaleSelectiveScan, SelectiveScan, SelectiveStateUpdate: N (scanPlugin.cpp)
CONV_KERNEL_SIZES = (2, 8)  # QuantCausalConv1d: kernel_size, inclusive (quantCausalConv1dPlugin.cpp)
MAX_RMS_NORM_EPS = 1.0  # RMSNormQuant: 0 < eps <= 1 (rmsNormQuantPlugin.cpp)


def check_plugin_limits(cfg: MambaConfig, quantized: bool, int8_ssm: bool) -> None:
    """Raise UserError naming every limit this model's graph would break."""
    problems = []
    if cfg.d_state not in SCAN_STATE_SIZES:
        problems.append(f"d_state={cfg.d_state}: the scan plugins take N in {SCAN_STATE_SIZES}")
    if int8_ssm and not CONV_KERNEL_SIZES[0] <= cfg.d_conv <= CONV_KERNEL_SIZES[1]:
        problems.append(f"d_conv={cfg.d_conv}: QuantCausalConv1d takes kernel_size "
                        f"{CONV_KERNEL_SIZES[0]}..{CONV_KERNEL_SIZES[1]}")
    if quantized:
        try:
            factor(cfg.d_inner)  # HadamardQuant: the spec's orders
        except ValueError as e:
            problems.append(str(e))
    if quantized and not 0.0 < cfg.rms_norm_eps <= MAX_RMS_NORM_EPS:
        problems.append(f"rms_norm_eps={cfg.rms_norm_eps}: RMSNormQuant takes 0 < eps <= {MAX_RMS_NORM_EPS:g}")
    if problems:
        raise UserError("this model cannot run on qmamba's TensorRT plugins: " + "; ".join(problems))
