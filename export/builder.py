"""A small ONNX node builder: unique names, constants, and the spec's arithmetic patterns.

Used both for graph bodies and for FunctionProto bodies; every pattern here follows
docs/quantization.md section 2 (float64 transcendentals and reductions, division quantizer).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 20
IR_VERSION = 10
DOMAIN = "qmamba"

F32, F64, I8, U8, I64 = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT8, TensorProto.UINT8, TensorProto.INT64


class Builder:
    """Appends nodes to a list; every output name is fresh (prefix + counter)."""

    def __init__(self, prefix: str = "") -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.prefix = prefix
        self._n = 0

    def fresh(self, hint: str = "t") -> str:
        self._n += 1
        return f"{self.prefix}{hint}_{self._n}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, out: list[str] | None = None,
           domain: str = "", **attrs) -> str | list[str]:
        outs = out or [self.fresh(op_type.lower()) for _ in range(n_out)]
        node = helper.make_node(op_type, inputs, outs, domain=domain, **attrs)
        self.nodes.append(node)
        return outs[0] if len(outs) == 1 else outs

    def node(self, node: onnx.NodeProto) -> None:
        self.nodes.append(node)

    # constants ---------------------------------------------------------------------------------
    def const(self, value, dtype=None, hint: str = "c") -> str:
        arr = np.asarray(value, dtype=dtype)
        return self.op("Constant", [], out=[self.fresh(hint)], value=numpy_helper.from_array(arr))

    def attr_float(self, attr: str) -> str:
        """A float32 scalar constant taken from the enclosing function's attribute `attr`."""
        name = self.fresh(attr)
        node = helper.make_node("Constant", [], [name])
        a = onnx.AttributeProto()
        a.name = "value_float"
        a.ref_attr_name = attr
        a.type = onnx.AttributeProto.FLOAT
        node.attribute.append(a)
        self.nodes.append(node)
        return name

    # spec arithmetic ---------------------------------------------------------------------------
    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", [x], to=to)

    def quantize(self, x: str, scale: str) -> str:
        """Q(x, s) = clamp(rne(x / s), -128, 127) as int8 (spec rule 1)."""
        r = self.op("Round", [self.op("Div", [x, scale])])
        c = self.op("Clip", [r, self.const(-128.0, np.float32), self.const(127.0, np.float32)])
        return self.cast(c, I8)

    def dequantize(self, q: str, scale: str) -> str:
        return self.op("Mul", [self.cast(q, F32), scale])

    def exp_r(self, x: str) -> str:
        return self.cast(self.op("Exp", [self.cast(x, F64)]), F32)

    def silu_r(self, x: str) -> str:
        x64 = self.cast(x, F64)
        den = self.op("Add", [self.const(1.0, np.float64), self.op("Exp", [self.op("Neg", [x64])])])
        return self.cast(self.op("Div", [x64, den]), F32)

    def softplus_r(self, x: str) -> str:
        x64 = self.cast(x, F64)
        e = self.op("Exp", [x64])
        one = self.const(1.0, np.float64)
        w = self.op("Add", [one, e])
        lp = self.op("Div", [self.op("Mul", [self.op("Log", [w]), e]), self.op("Sub", [w, one])])
        lp = self.op("Where", [self.op("Equal", [w, one]), e, lp])
        big = self.op("Greater", [x64, self.const(20.0, np.float64)])
        return self.cast(self.op("Where", [big, x64, lp]), F32)

    def sum_r(self, x: str, axis: int, keepdims: int = 0) -> str:
        s = self.op("ReduceSum", [self.cast(x, F64), self.const([axis], np.int64)], keepdims=keepdims)
        return self.cast(s, F32)

    def scale_product(self, a: str, b: str) -> str:
        """fl(a * b) computed in float64 (spec rule 7)."""
        return self.cast(self.op("Mul", [self.cast(a, F64), self.cast(b, F64)]), F32)

    def rmsnorm(self, x: str, w: str, eps: str) -> str:
        s = self.sum_r(self.op("Mul", [x, x]), -1, keepdims=1)
        d = self.cast(self.op("Shape", [x], start=-1), F32)
        ms = self.op("Div", [s, d])
        root = self.cast(self.op("Sqrt", [self.cast(self.op("Add", [ms, eps]), F64)]), F32)  # spec: sqrt_r
        # Reciprocal, not Div(1, root): ORT's DivMulFusion rewrites Mul(x, Div(1, r)) into Div(x, r),
        # which rounds differently from the spec's x * fl(1 / r).
        rr = self.op("Reciprocal", [root])
        return self.op("Mul", [self.op("Mul", [x, rr]), w])


def tensor_info(name: str, dtype: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)
