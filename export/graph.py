"""Prefill / decode / single-block ONNX graphs of a quantized (or fp16) Mamba model.

Graphs are built node by node with onnx.helper from the same stage program as
QuantMambaLM._block, so the ONNX model and the PyTorch integer path compute the same spec
operations in the same order. Output is deterministic: same model and options -> same bytes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from export.builder import DOMAIN, F32, I8, I64, IR_VERSION, OPSET, U8, Builder
from export.functions import all_functions
from qmamba.model.mamba import MambaLM
from qmamba.ops.specmath import SPEC_VERSION, a_from_a_log, scale_product
from qmamba.quant.qmodel import QLinear, QuantMambaLM

F16 = onnx.TensorProto.FLOAT16


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    graph: str = "prefill"  # prefill | decode | block
    layers: tuple[int, ...] | None = None  # block graphs: which layers (consecutive)
    stages: bool = False  # expose every stage tensor as an output named like the tracer


class GraphWriter:
    def __init__(self, recipe: str) -> None:
        self.b = Builder("")
        self.recipe = recipe
        self.inits: list[onnx.TensorProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.stage_outs: list[tuple[str, str, int]] = []

    def init(self, name: str, arr) -> str:
        a = np.ascontiguousarray(arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else arr)
        self.inits.append(numpy_helper.from_array(a, name))
        return name

    def custom(self, op: str, ins: list[str], n_out: int, overload: str = "", **attrs) -> list[str]:
        outs = [self.b.fresh(op.lower()) for _ in range(n_out)]
        node = helper.make_node(op, ins, outs, domain=DOMAIN, plugin_namespace="qmamba", plugin_version="1",
                                **attrs)
        if overload:
            node.overload = overload
        self.b.node(node)
        return outs

    def stage(self, name: str, value: str, dtype: int) -> None:
        self.stage_outs.append((name, value, dtype))

    # linears -------------------------------------------------------------------------------
    def qlinear(self, x_q: str, lin: QLinear, in_scale: float, wname: str, mask: str | None = None,
                outlier_scale: float | None = None) -> str:
        b = self.b
        one, zp = self.init(f"{wname}.one", np.float32(1.0)), self.init(f"{wname}.zp", np.int8(0))
        w = b.op("DequantizeLinear", [self.init(f"{wname}.weight_q_t", lin.weight_q.T.contiguous()), one, zp])
        xf = b.op("DequantizeLinear", [x_q, one, zp])
        m = self.init(f"{wname}.m", scale_product(in_scale, lin.weight_scale))
        if mask is None:
            return b.op("Mul", [b.op("MatMul", [xf, w]), m])
        mk = b.cast(mask, F32)
        x_in = b.op("Mul", [xf, b.op("Sub", [b.const(1.0, np.float32), mk])])
        x_out = b.op("Mul", [xf, mk])
        m_out = self.init(f"{wname}.m_out", scale_product(outlier_scale, lin.weight_scale))
        return b.op("Add", [b.op("Mul", [b.op("MatMul", [x_in, w]), m]),
                            b.op("Mul", [b.op("MatMul", [x_out, w]), m_out])])

    # tied int8 embedding (spec 4.7): one int8 table serves the lookup and the logits -----------
    def _embedding_table(self, emb: QLinear) -> tuple[str, str]:
        names = {i.name for i in self.inits}
        if "embedding.weight_q" not in names:
            self.init("embedding.weight_q", emb.weight_q)
            self.init("embedding.weight_scale", emb.weight_scale)
        return "embedding.weight_q", "embedding.weight_scale"

    def embedding_lookup(self, emb: QLinear, ids: str) -> str:
        b = self.b
        table, scale = self._embedding_table(emb)
        one, zp = self.init("embedding.one", np.float32(1.0)), self.init("embedding.zp", np.int8(0))
        codes = b.op("DequantizeLinear", [b.op("Gather", [table, ids], axis=0), one, zp])  # exact codes as float
        row_scale = b.op("Unsqueeze", [b.op("Gather", [scale, ids], axis=0), b.const([-1], np.int64)])
        return b.op("Mul", [codes, row_scale])

    def tied_logits(self, hf: str, emb: QLinear) -> str:
        b = self.b
        table, scale = self._embedding_table(emb)
        one, zp = self.init("lm_head.one", np.float32(1.0)), self.init("lm_head.zp", np.int8(0))
        w_t = b.op("Transpose", [b.op("DequantizeLinear", [table, one, zp])], perm=[1, 0])
        return b.op("Mul", [b.op("MatMul", [hf, w_t]), scale])

    def quantize_linear(self, y: str, scale: float, name: str) -> str:
        s = self.init(f"{name}.out_scale", np.float32(scale))
        zp = self.init(f"{name}.out_zp", np.int8(0))
        return self.b.op("QuantizeLinear", [y, s, zp])

    def flinear(self, x: str, w: torch.Tensor, name: str) -> str:
        """fp16 recipe: x cast to the weight dtype, MatMul, back to float32."""
        wt = self.init(f"{name}.weight_t", w.detach().T.contiguous())
        dt = F16 if w.dtype == torch.float16 else F32
        return self.b.cast(self.b.op("MatMul", [self.b.cast(x, dt), wt]), F32)

    def slice_last(self, x: str, start: int, end: int) -> str:
        b = self.b
        return b.op("Slice", [x, b.const([start], np.int64), b.const([end], np.int64), b.const([-1], np.int64)])

    def float_conv(self, x: str, w: torch.Tensor, bias: torch.Tensor, state: str, name: str) -> tuple[str, str]:
        """Float causal conv + SiLU (recipes fp16, w8a8-fpssm): spec 5."""
        from export.functions import _conv_windows

        b = self.b
        xt = b.op("Concat", [b.op("Transpose", [state], perm=[0, 2, 1]), x], axis=1)
        wn = self.init(f"{name}.weight", w.float())
        win, wk = _conv_windows(b, xt, x, wn)
        v = b.op("Add", [b.sum_r(b.op("Mul", [win, wk]), 2), self.init(f"{name}.bias", bias.float())])
        seqlen = b.op("Shape", [x], start=1, end=2)
        tail = b.op("Slice", [xt, seqlen, b.const([2**62], np.int64), b.const([1], np.int64)])
        return b.silu_r(v), b.op("Transpose", [tail], perm=[0, 2, 1])


def _zero_state(w: GraphWriter, ids_or_x: str, dims: list[int], dtype: int) -> str:
    b = w.b
    bsz = b.op("Shape", [ids_or_x], start=0, end=1)
    shape = b.op("Concat", [bsz, b.const(dims, np.int64)], axis=0)
    zero = helper.make_tensor("z", dtype, [1], [0])
    return b.op("ConstantOfShape", [shape], value=zero)


def _quant_block(w: GraphWriter, q: QuantMambaLM, i: int, r: str, conv_state: str, ssm_state: str,
                 decode: bool) -> tuple[str, str, str]:
    cfg, rc, lyr = q.cfg, q.recipe, q.layers[i]
    s, b = lyr.scales, w.b
    d, n, rk, p = cfg.d_inner, cfg.d_state, cfg.dt_rank, f"layers.{i}"
    h = w.custom("RMSNormQuant", [r, w.init(f"{p}.norm.weight", lyr.norm_weight)], 1,
                 eps=float(cfg.rms_norm_eps), scale=float(s["norm"]))[0]
    w.stage(f"{p}.norm", h, I8)
    xz = w.qlinear(h, lyr.in_proj, s["norm"], f"{p}.in_proj")
    if rc.int8_ssm:
        x = w.quantize_linear(w.slice_last(xz, 0, d), s["in_proj.x"], f"{p}.in_proj.x")
        z = w.quantize_linear(w.slice_last(xz, d, 2 * d), s["in_proj.z"], f"{p}.in_proj.z")
        dt_i = I8
    else:
        x, z, dt_i = w.slice_last(xz, 0, d), w.slice_last(xz, d, 2 * d), F32
    w.stage(f"{p}.in_proj.x", x, dt_i)
    w.stage(f"{p}.in_proj.z", z, dt_i)

    mask = None
    if rc.int8_ssm:
        dual = rc.dual_scale
        outs = w.custom(
            "QuantCausalConv1d",
            [x, w.init(f"{p}.conv1d.weight_q", lyr.conv_weight_q), w.init(f"{p}.conv1d.weight_scale",
             lyr.conv_weight_scale), w.init(f"{p}.conv1d.bias", lyr.conv_bias), conv_state],
            3 if dual else 2, "dual" if dual else "single",
            in_scale=float(s["in_proj.x"]), out_scale=float(s["conv1d"]),
            outlier_scale=float(s.get("conv1d.outlier", 0.0)), dual_scale=int(dual), kernel_size=cfg.d_conv,
        )
        u, conv_out = outs[0], outs[-1]
        mask = outs[1] if dual else None
        w.stage(f"{p}.conv1d", u, I8)
        if dual:
            w.stage(f"{p}.conv1d.mask", mask, U8)
        xdbl = w.qlinear(u, lyr.x_proj, s["conv1d"], f"{p}.x_proj", mask, s.get("conv1d.outlier"))
    else:
        u, conv_out = w.float_conv(x, lyr.conv_weight, lyr.conv_bias, conv_state, f"{p}.conv1d")
        w.stage(f"{p}.conv1d", u, F32)
        u_q = w.quantize_linear(u, s["x_proj.in"], f"{p}.x_proj.in")
        xdbl = w.qlinear(u_q, lyr.x_proj, s["x_proj.in"], f"{p}.x_proj")
    dt_lr_f = w.slice_last(xdbl, 0, rk)
    dt_lr = w.quantize_linear(dt_lr_f, s["x_proj.dt_lowrank"], f"{p}.x_proj.dt_lowrank")
    bf, cf = w.slice_last(xdbl, rk, rk + n), w.slice_last(xdbl, rk + n, rk + 2 * n)
    if rc.int8_ssm:
        bm = w.quantize_linear(bf, s["x_proj.B"], f"{p}.x_proj.B")
        cm = w.quantize_linear(cf, s["x_proj.C"], f"{p}.x_proj.C")
        w.stage(f"{p}.x_proj.dt_lowrank", dt_lr, I8)
    else:
        bm, cm = bf, cf
        w.stage(f"{p}.x_proj.dt_lowrank", dt_lr_f, F32)
    w.stage(f"{p}.x_proj.B", bm, dt_i)
    w.stage(f"{p}.x_proj.C", cm, dt_i)
    dtf = w.qlinear(dt_lr, lyr.dt_proj, s["x_proj.dt_lowrank"], f"{p}.dt_proj")
    dt = w.quantize_linear(dtf, s["dt_proj"], f"{p}.dt_proj") if rc.int8_ssm else dtf
    w.stage(f"{p}.dt_proj", dt, dt_i)

    common = [w.init(f"{p}.A", a_from_a_log(lyr.A_log)), w.init(f"{p}.D", lyr.D),
              w.init(f"{p}.dt_bias", lyr.dt_bias), ssm_state]
    if rc.int8_ssm:
        op = "SelectiveStateUpdate" if decode else "DualScaleSelectiveScan"
        ins = [u] + ([mask] if rc.dual_scale else []) + [dt, bm, cm, z] + common
        y, h_out = w.custom(op, ins, 2, "dual" if rc.dual_scale else "single",
                            u_scale=float(s["conv1d"]), u_outlier_scale=float(s.get("conv1d.outlier", 0.0)),
                            dt_scale=float(s["dt_proj"]), B_scale=float(s["x_proj.B"]), C_scale=float(s["x_proj.C"]),
                            z_scale=float(s["in_proj.z"]), dual_scale=int(rc.dual_scale), y_dtype=1)
    else:
        y, h_out = w.custom("SelectiveScan", [u, dt, bm, cm, z] + common, 2, y_dtype=1)
    w.stage(f"{p}.ssm", y, F32)
    hq = w.custom("HadamardQuant", [y], 1, f"d{d}", scale=float(s["hadamard"]))[0]
    w.stage(f"{p}.hadamard", hq, I8)
    out = w.qlinear(hq, lyr.out_proj, s["hadamard"], f"{p}.out_proj")
    w.stage(f"{p}.out_proj", out, F32)
    r = b.op("Add", [r, out])
    w.stage(f"{p}.block", r, F32)
    return r, conv_out, h_out


def _float_block(w: GraphWriter, m: MambaLM, i: int, r: str, conv_state: str, ssm_state: str,
                 decode: bool) -> tuple[str, str, str]:
    cfg, b = m.cfg, w.b
    blk = m.backbone.layers[i]
    mx, p = blk.mixer, f"layers.{i}"
    d, n, rk = cfg.d_inner, cfg.d_state, cfg.dt_rank
    eps = b.const(np.float32(cfg.rms_norm_eps))
    h = b.rmsnorm(r, w.init(f"{p}.norm.weight", blk.norm.weight.float()), eps)
    w.stage(f"{p}.norm", h, F32)
    xz = w.flinear(h, mx.in_proj.weight, f"{p}.in_proj")
    x, z = w.slice_last(xz, 0, d), w.slice_last(xz, d, 2 * d)
    w.stage(f"{p}.in_proj.x", x, F32)
    w.stage(f"{p}.in_proj.z", z, F32)
    u, conv_out = w.float_conv(x, mx.conv1d.weight[:, 0, :], mx.conv_bias(), conv_state, f"{p}.conv1d")
    w.stage(f"{p}.conv1d", u, F32)
    xdbl = w.flinear(u, mx.x_proj.weight, f"{p}.x_proj")
    dt_lr, bm, cm = w.slice_last(xdbl, 0, rk), w.slice_last(xdbl, rk, rk + n), w.slice_last(xdbl, rk + n, rk + 2 * n)
    w.stage(f"{p}.x_proj.dt_lowrank", dt_lr, F32)
    w.stage(f"{p}.x_proj.B", bm, F32)
    w.stage(f"{p}.x_proj.C", cm, F32)
    dt = w.flinear(dt_lr, mx.dt_proj.weight, f"{p}.dt_proj")
    w.stage(f"{p}.dt_proj", dt, F32)
    common = [w.init(f"{p}.A", a_from_a_log(mx.A_log.float())), w.init(f"{p}.D", mx.D.float()),
              w.init(f"{p}.dt_bias", mx.dt_proj.bias.float()), ssm_state]
    y, h_out = w.custom("SelectiveScan", [u, dt, bm, cm, z] + common, 2, y_dtype=1)
    w.stage(f"{p}.ssm", y, F32)
    out = w.flinear(y, mx.out_proj.weight, f"{p}.out_proj")
    w.stage(f"{p}.out_proj", out, F32)
    r = b.op("Add", [r, out])
    w.stage(f"{p}.block", r, F32)
    return r, conv_out, h_out


def build_model(model: QuantMambaLM | MambaLM, opts: ExportOptions) -> onnx.ModelProto:
    quant = isinstance(model, QuantMambaLM)
    cfg = model.cfg
    recipe = model.recipe.name if quant else "fp16"
    w = GraphWriter(recipe)
    b = w.b
    conv_dtype = I8 if quant and model.recipe.int8_ssm else F32
    k1, d, n = cfg.d_conv - 1, cfg.d_inner, cfg.d_state
    inputs: list[onnx.ValueInfoProto] = []
    layers = list(range(cfg.n_layer)) if opts.layers is None else list(opts.layers)
    if opts.graph == "block":
        inputs.append(helper.make_tensor_value_info("residual", F32, ["batch", "length", cfg.d_model]))
        r = "residual"
    else:
        seq = 1 if opts.graph == "decode" else "length"
        inputs.append(helper.make_tensor_value_info("input_ids", I64, ["batch", seq]))
        if quant:
            r = w.embedding_lookup(model.embedding, "input_ids")
        else:
            emb = model.backbone.embeddings.weight
            r = b.op("Gather", [w.init("embedding", emb.detach()), "input_ids"], axis=0)
            if emb.dtype != torch.float32:
                r = b.cast(r, F32)
    state_outs = []
    for i in layers:
        if opts.graph == "decode":
            cs, ss = f"conv_state.{i}", f"ssm_state.{i}"
            inputs.append(helper.make_tensor_value_info(cs, conv_dtype, ["batch", d, k1]))
            inputs.append(helper.make_tensor_value_info(ss, F32, ["batch", d, n]))
        else:
            cs = _zero_state(w, r, [d, k1], conv_dtype)
            ss = _zero_state(w, r, [d, n], F32)
        blk = _quant_block if quant else _float_block
        r, c_out, h_out = blk(w, model, i, r, cs, ss, opts.graph == "decode")
        suffix = "_out" if opts.graph == "decode" else ""
        state_outs += [(f"conv_state{suffix}.{i}", c_out, conv_dtype, [d, k1]),
                       (f"ssm_state{suffix}.{i}", h_out, F32, [d, n])]
    outputs = []
    if opts.graph == "block":
        outputs.append(helper.make_tensor_value_info("output", F32, ["batch", "length", cfg.d_model]))
        b.op("Identity", [r], out=["output"])
    else:
        nf = model.norm_f_weight if quant else model.backbone.norm_f.weight.float()
        hf = b.rmsnorm(r, w.init("norm_f.weight", nf), b.const(np.float32(cfg.rms_norm_eps)))
        w.stage("norm_f", hf, F32)
        if quant:
            logits = w.tied_logits(hf, model.embedding)
        else:
            logits = w.flinear(hf, model.lm_head.weight, "lm_head")
        b.op("Identity", [logits], out=["logits"])
        seq = 1 if opts.graph == "decode" else "length"
        outputs.append(helper.make_tensor_value_info("logits", F32, ["batch", seq, cfg.vocab_size]))
    for name, val, dt, dims in state_outs:
        b.op("Identity", [val], out=[name])
        outputs.append(helper.make_tensor_value_info(name, dt, ["batch"] + dims))
    if opts.stages:
        for name, val, dt in w.stage_outs:
            if name == "norm_f" and opts.graph == "block":
                continue
            b.op("Identity", [val], out=[name])
            seq = 1 if opts.graph == "decode" else "length"
            outputs.append(helper.make_tensor_value_info(name, dt, ["batch", seq, None]))
    graph = helper.make_graph(b.nodes, f"qmamba_{recipe}_{opts.graph}", inputs, outputs, w.inits)
    model_proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
        functions=all_functions(cfg.d_inner), producer_name="qmamba-trt", producer_version="0.1.0",
    )
    model_proto.ir_version = IR_VERSION
    helper.set_model_props(model_proto, {"qmamba.recipe": recipe, "qmamba.spec_version": SPEC_VERSION,
                                         "qmamba.graph": opts.graph})
    return model_proto
