"""ONNX Runtime sessions for exported qmamba models.

`session.disable_quant_qdq` keeps ORT from rewriting our int8 `DequantizeLinear -> MatMul` chains
into `MatMulIntegerToFloat` with an s8->u8 shift: on x86 CPUs without VNNI that kernel saturates
int16 pair sums of u8 x s8 products and returns wrong results (seen: 22% error on x_proj). With the
rewrite disabled, ORT runs the float MatMul over integer codes, which is exact (spec rule 6).
"""

from __future__ import annotations

from pathlib import Path


def session_options(threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads:
        opts.intra_op_num_threads = threads
    return opts


def session(path: str | Path | bytes, threads: int | None = None):
    import onnxruntime as ort

    src = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(src, session_options(threads), providers=["CPUExecutionProvider"])
