"""ONNX function bodies of the qmamba custom ops (docs/onnx_ops.md), written from the spec.

Each op is a FunctionProto in domain `qmamba`, so stock ONNX Runtime runs an exported model with no
project code; TensorRT's parser maps the same nodes to our plugins (plugin_namespace/version).
Variants with a different input/output list are function *overloads* (IR 10): `single`/`dual` for
the dual_scale attribute, and `d{D}` for HadamardQuant (its butterfly program is unrolled for D).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from export.builder import DOMAIN, F32, I8, I64, OPSET, U8, Builder
from qmamba.ops.hadamard import factor, hadamard_m, inv_sqrt

PLUGIN_ATTRS = ["plugin_namespace", "plugin_version"]


def _function(name: str, inputs, outputs, b: Builder, attrs: list[str], overload: str = "") -> onnx.FunctionProto:
    fn = helper.make_function(DOMAIN, name, inputs, outputs, b.nodes, [helper.make_opsetid("", OPSET)],
                              attrs + PLUGIN_ATTRS)
    if overload:
        fn.overload = overload
    return fn


def rms_norm_quant() -> onnx.FunctionProto:
    b = Builder("rnq_")
    y = b.rmsnorm("X", "weight", b.attr_float("eps"))
    q = b.quantize(y, b.attr_float("scale"))
    b.op("Identity", [q], out=["Y"])
    return _function("RMSNormQuant", ["X", "weight"], ["Y"], b, ["eps", "scale"])


def _conv_windows(b: Builder, xt: str, x: str, w: str) -> tuple[str, str]:
    """[B, L, K, D] float windows of xt (= state ++ x along time) and the [K, D] float weight."""
    seqlen = b.op("Squeeze", [b.op("Shape", [x], start=1, end=2)])
    k = b.op("Squeeze", [b.op("Shape", [w], start=1, end=2)])
    zero, one = b.const(0, np.int64), b.const(1, np.int64)
    rl = b.op("Unsqueeze", [b.op("Range", [zero, seqlen, one]), b.const([1], np.int64)])
    rk = b.op("Unsqueeze", [b.op("Range", [zero, k, one]), b.const([0], np.int64)])
    idx = b.op("Add", [rl, rk])
    win = b.op("Gather", [xt, idx], axis=1)
    wk = b.op("Transpose", [w], perm=[1, 0])
    return win, wk


def quant_causal_conv1d(dual: bool) -> onnx.FunctionProto:
    b = Builder("qcc_")
    st = b.op("Transpose", ["conv_state"], perm=[0, 2, 1])
    xt = b.op("Concat", [st, "X"], axis=1)  # int8 [B, K-1+L, D]
    win, wk = _conv_windows(b, b.cast(xt, F32), "X", b.cast("weight", F32))
    acc = b.op("ReduceSum", [b.op("Mul", [win, wk]), b.const([2], np.int64)], keepdims=0)  # exact integers
    m = b.scale_product("weight_scale", b.attr_float("in_scale"))
    v = b.op("Add", [b.op("Mul", [acc, m]), "bias"])
    u = b.silu_r(v)
    if not dual:
        b.op("Identity", [b.quantize(u, b.attr_float("out_scale"))], out=["U"])
    else:
        q_in = b.op("Round", [b.op("Div", [u, b.attr_float("out_scale")])])
        mask = b.op("Or", [b.op("Less", [q_in, b.const(-128.0, np.float32)]),
                           b.op("Greater", [q_in, b.const(127.0, np.float32)])])
        q_out = b.op("Round", [b.op("Div", [u, b.attr_float("outlier_scale")])])
        q = b.op("Clip", [b.op("Where", [mask, q_out, q_in]), b.const(-128.0, np.float32),
                          b.const(127.0, np.float32)])
        b.op("Cast", [q], out=["U"], to=I8)
        b.op("Cast", [mask], out=["U_mask"], to=U8)
    seqlen = b.op("Shape", ["X"], start=1, end=2)
    tail = b.op("Slice", [xt, seqlen, b.const([2**62], np.int64), b.const([1], np.int64)])
    b.op("Transpose", [tail], out=["conv_state_out"], perm=[0, 2, 1])
    ins = ["X", "weight", "weight_scale", "bias", "conv_state"]
    outs = ["U", "U_mask", "conv_state_out"] if dual else ["U", "conv_state_out"]
    return _function("QuantCausalConv1d", ins, outs, b,
                     ["in_scale", "out_scale", "outlier_scale", "dual_scale", "kernel_size"],
                     "dual" if dual else "single")


def _scan_core(b: Builder, u: str, dt: str, bm: str, cm: str, z: str, y_out: str, h_out: str) -> None:
    """Spec 4.4 on float32 inputs: delta, the recurrence (ONNX Scan over time), D skip, gating."""
    delta = b.softplus_r(b.op("Add", [dt, "dt_bias"]))
    du = b.op("Mul", [delta, u])
    # Scan body: carried h [B, D, N]; per step delta_t, du_t [B, D] and B_t, C_t [B, N]
    sb = Builder("step_")
    ax2, ax1 = sb.const([2], np.int64), sb.const([1], np.int64)
    da = sb.exp_r(sb.op("Mul", [sb.op("Unsqueeze", ["delta_t", ax2]), "A"]))
    dbu = sb.op("Mul", [sb.op("Unsqueeze", ["du_t", ax2]), sb.op("Unsqueeze", ["B_t", ax1])])
    sb.op("Add", [sb.op("Mul", [da, "h"]), dbu], out=["h_next"])
    hc = sb.op("Mul", ["h_next", sb.op("Unsqueeze", ["C_t", ax1])])
    sb.op("Identity", [sb.sum_r(hc, 2)], out=["y_t"])
    body = helper.make_graph(
        sb.nodes, "scan_step",
        [helper.make_tensor_value_info(n, F32, None) for n in ("h", "delta_t", "du_t", "B_t", "C_t")],
        [helper.make_tensor_value_info(n, F32, None) for n in ("h_next", "y_t")],
    )
    h_last, ys = b.op("Scan", ["initial_state", delta, du, bm, cm], n_out=2, body=body, num_scan_inputs=4,
                      scan_input_axes=[1, 1, 1, 1], scan_output_axes=[1])
    y = b.op("Add", [ys, b.op("Mul", ["Dskip", u])])
    y = b.op("Mul", [y, b.silu_r(z)])
    b.op("Identity", [h_last], out=[h_out])
    cast = helper.make_node("Cast", [y], [y_out])
    a = onnx.AttributeProto()
    a.name, a.ref_attr_name, a.type = "to", "y_dtype", onnx.AttributeProto.INT
    cast.attribute.append(a)
    b.node(cast)


def _dequant_inputs(b: Builder, dual: bool) -> tuple[str, str, str, str, str]:
    if dual:
        s = b.op("Where", [b.cast("U_mask", 9), b.attr_float("u_outlier_scale"), b.attr_float("u_scale")])
        u = b.op("Mul", [b.cast("U", F32), s])
    else:
        u = b.dequantize("U", b.attr_float("u_scale"))
    return (u, b.dequantize("dt", b.attr_float("dt_scale")), b.dequantize("Bmat", b.attr_float("B_scale")),
            b.dequantize("Cmat", b.attr_float("C_scale")), b.dequantize("Z", b.attr_float("z_scale")))


_SCAN_ATTRS = ["u_scale", "u_outlier_scale", "dt_scale", "B_scale", "C_scale", "z_scale", "dual_scale", "y_dtype"]


def dual_scale_selective_scan(dual: bool, decode: bool = False) -> onnx.FunctionProto:
    b = Builder("dss_")
    state = "state" if decode else "initial_state"
    if decode:
        b.op("Identity", ["state"], out=["initial_state"])
    u, dt, bm, cm, z = _dequant_inputs(b, dual)
    _scan_core(b, u, dt, bm, cm, z, "Y", "state_out" if decode else "final_state")
    ins = ["U"] + (["U_mask"] if dual else []) + ["dt", "Bmat", "Cmat", "Z", "A", "Dskip", "dt_bias", state]
    outs = ["Y", "state_out" if decode else "final_state"]
    name = "SelectiveStateUpdate" if decode else "DualScaleSelectiveScan"
    return _function(name, ins, outs, b, _SCAN_ATTRS, "dual" if dual else "single")


def selective_scan_float() -> onnx.FunctionProto:
    b = Builder("ss_")
    _scan_core(b, "U", "dt", "Bmat", "Cmat", "Z", "Y", "final_state")
    ins = ["U", "dt", "Bmat", "Cmat", "Z", "A", "Dskip", "dt_bias", "initial_state"]
    return _function("SelectiveScan", ins, ["Y", "final_state"], b, ["y_dtype"])


def hadamard_quant(d: int) -> onnx.FunctionProto:
    """Spec 4.6, unrolled for D = d: FWHT stages over p, left-to-right mixing across m, scale, quantize."""
    m, p = factor(d)
    b = Builder("hq_")
    x = b.cast("X", F32)
    t = b.op("Reshape", [x, b.const([0, 0, m, p], np.int64)])
    h = 1
    while h < p:
        v = b.op("Reshape", [t, b.const([0, 0, m, p // (2 * h), 2, h], np.int64)])
        lo, hi = b.op("Split", [v, b.const([1, 1], np.int64)], n_out=2, axis=4)
        t = b.op("Concat", [b.op("Add", [lo, hi]), b.op("Sub", [lo, hi])], axis=4)
        t = b.op("Reshape", [t, b.const([0, 0, m, p], np.int64)])
        h *= 2
    if m > 1:
        hm = hadamard_m(m).numpy().astype(np.float32)
        acc = None
        for j in range(m):
            tj = b.op("Slice", [t, b.const([j], np.int64), b.const([j + 1], np.int64), b.const([2], np.int64)])
            term = b.op("Mul", [b.const(hm[:, j : j + 1]), tj])  # [m, 1] x [B, L, 1, p]
            acc = term if acc is None else b.op("Add", [acc, term])
        t = acc
    y = b.op("Mul", [b.op("Reshape", [t, b.const([0, 0, d], np.int64)]), b.const(inv_sqrt(d).item(), np.float32)])
    b.op("Identity", [b.quantize(y, b.attr_float("scale"))], out=["Y"])
    return _function("HadamardQuant", ["X"], ["Y"], b, ["scale"], f"d{d}")


def all_functions(d_inner: int) -> list[onnx.FunctionProto]:
    return [
        rms_norm_quant(),
        quant_causal_conv1d(False),
        quant_causal_conv1d(True),
        dual_scale_selective_scan(False),
        dual_scale_selective_scan(True),
        dual_scale_selective_scan(False, decode=True),
        dual_scale_selective_scan(True, decode=True),
        selective_scan_float(),
        hadamard_quant(d_inner),
    ]


__all__ = ["I64", "all_functions"]
