"""Quantized Mamba LM (recipes w8a8, w8a8-dualscale, w8a8-fpssm) with two interchangeable paths.

* integer path (``simulate=False``): int8/int32 torch tensors through the reference ops of
  qmamba/ops/ref.py: exactly what the CUDA kernels and TensorRT plugins compute;
* simulated path (``simulate=True``): fake quantization; every quantized tensor is held as its
  dequantized float32 value and every stage is float arithmetic (docs/quantization.md section 6).

Both run the same block program (``_block``) through an ops object (``IntOps`` / ``SimOps``), so the
order of stages can never diverge; what differs is how each stage computes, and the test
tests/test_simulated_vs_integer.py requires identical integer tensors.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from qmamba import trace
from qmamba.config import MambaConfig
from qmamba.model.mamba import LayerState, check_inputs
from qmamba.ops import ref
from qmamba.ops.hadamard import hadamard_transform
from qmamba.ops.specmath import (
    QMAX,
    QMIN,
    a_from_a_log,
    codes_of,
    divisor,
    fake_quant,
    quantize,
    rmsnorm,
    scale_product,
    silu_r,
)
from qmamba.quant.recipes import Recipe


@dataclasses.dataclass
class QLinear:
    weight_q: torch.Tensor  # int8 [C_out, C_in]
    weight_scale: torch.Tensor  # float32 [C_out]

    def dequantized(self) -> torch.Tensor:
        return self.weight_q.float() * self.weight_scale[:, None]


@dataclasses.dataclass
class QLayer:
    norm_weight: torch.Tensor
    in_proj: QLinear
    conv_weight_q: torch.Tensor | None  # int8 [D, K] (int8 recipes)
    conv_weight_scale: torch.Tensor | None  # [D]
    conv_weight: torch.Tensor | None  # float32 [D, K] (w8a8-fpssm)
    conv_bias: torch.Tensor
    x_proj: QLinear
    dt_proj: QLinear
    dt_bias: torch.Tensor
    A_log: torch.Tensor
    D: torch.Tensor
    out_proj: QLinear  # weight rotated by the Hadamard matrix
    scales: dict[str, float]  # stage -> scale, keys as recipes.scale_names without the layer prefix


@dataclasses.dataclass
class Act:
    """A stage value: the integer path carries codes (+ mask), the simulated path float values."""

    value: torch.Tensor  # int8 codes, or float32 (dequantized / plain float)
    scale: float | None = None  # None: a plain float tensor
    mask: torch.Tensor | None = None  # uint8 (integer path) or float 0/1 (simulated path)
    outlier_scale: float | None = None


def _ref_scan(ops, u: Act, dt: Act, bm: Act, cm: Act, z: Act, lyr: QLayer, state: torch.Tensor | None,
              deferred=None):
    """The selective scan on dequantized stage values (spec 4.4): (y, final state). deferred: work that ops which
    fuse stages (CudaOps) left to the scan; these ops never defer any."""
    if deferred is not None:
        raise ValueError("deferred work comes only from ops that fuse stages (CudaOps)")
    return ref.selective_scan(ops.dequant(u), ops.dequant(dt), a_from_a_log(lyr.A_log), ops.dequant(bm),
                              ops.dequant(cm), lyr.D, ops.dequant(z), lyr.dt_bias, state)


def _linear_quant(ops, a: Act, lin: QLinear, segments: list[tuple[int, float]]) -> list[Act]:
    """A linear whose output splits along the last dim into segments (width, scale), each quantized."""
    y = ops.linear(a, lin)
    out, c = [], 0
    for width, scale in segments:
        out.append(ops.quantize(y[..., c : c + width], scale))
        c += width
    return out


def _linear_add(ops, a: Act, lin: QLinear, residual: torch.Tensor) -> torch.Tensor:
    """residual + linear(a): the block's output (float32 add after the linear's epilogue)."""
    return residual + ops.linear(a, lin)


def _norm_linear_quant(ops, residual: torch.Tensor, norm_w: torch.Tensor, eps: float, s_norm: float, lin: QLinear,
                       segments: list[tuple[int, float]]) -> list[Act]:
    """linear_quant(norm_quant(residual)): ops may fuse the two when nobody records the norm stage."""
    return ops.linear_quant(ops.norm_quant(residual, norm_w, eps, s_norm), lin, segments)


def _dt_proj_scan(ops, dt_lr: Act, lyr: QLayer, s_dt: float, u: Act, bm: Act, cm: Act, z: Act,
                  state: torch.Tensor | None, deferred=None):
    """scan(u, dt_proj(dt_lr) quantized at s_dt, ...): ops may fuse the two when nobody records dt_proj."""
    (dt,) = ops.linear_quant(dt_lr, lyr.dt_proj, [(lyr.dt_proj.weight_q.shape[0], s_dt)])
    return ops.scan(u, dt, bm, cm, z, lyr, state, deferred)


def _scan_out_proj(ops, dt_lr: Act, lyr: QLayer, s_dt: float, u: Act, bm: Act, cm: Act, z: Act,
                   state: torch.Tensor | None, deferred, s_h: float, residual: torch.Tensor):
    """(residual + out_proj(HadamardQuant(y)), final state) for y = dt_proj_scan(...): ops may fuse the scan and
    out_proj when nobody records dt_proj, the scan's y, the Hadamard or out_proj."""
    y, st = ops.dt_proj_scan(dt_lr, lyr, s_dt, u, bm, cm, z, state, deferred)
    return ops.hadamard_linear_add(y, s_h, lyr.out_proj, residual), st


def _conv_x_proj(ops, x: Act, lyr: QLayer, state: torch.Tensor | None, s_u: float, s_out: float | None,
                 segments: list[tuple[int, float]]):
    """(u, conv state, x_proj(u)'s segments, deferred) with u = conv(x). Ops may compute the conv inside x_proj;
    then the conv state comes back not yet shifted and `deferred` (else None) must go to the scan that follows
    (dt_proj_scan / scan), which shifts it."""
    u, st = ops.conv(x, lyr, state, s_u, s_out)
    return u, st, ops.linear_quant(u, lyr.x_proj, segments), None


def _in_proj_conv_x_proj(ops, residual: torch.Tensor, lyr: QLayer, eps: float, xz_segments: list[tuple[int, float]],
                         state: torch.Tensor | None, xp_segments: list[tuple[int, float]]):
    """(x, z, u, conv state, x_proj's segments, deferred): in_proj of the normed residual, then the conv and x_proj.
    Ops may run the conv and x_proj's sums behind in_proj; then x_proj's segments are written by the scan that
    follows (dt_proj_scan, which must get `deferred`)."""
    s = lyr.scales
    x, z = ops.norm_linear_quant(residual, lyr.norm_weight, eps, s["norm"], lyr.in_proj, xz_segments)
    u, st, segs, deferred = ops.conv_x_proj(x, lyr, state, s["conv1d"], s.get("conv1d.outlier"), xp_segments)
    return x, z, u, st, segs, deferred


def _hadamard_linear_add(ops, y: torch.Tensor, s_h: float, lin: QLinear, residual: torch.Tensor) -> torch.Tensor:
    """linear_add(hadamard_quant(y)): ops may fuse the two when nobody records the hadamard or out_proj stage."""
    return ops.linear_add(ops.hadamard_quant(y, s_h), lin, residual)


def _logits(ops, hf: torch.Tensor, emb: QLinear) -> torch.Tensor:
    return ref.tied_logits(hf, emb.weight_q, emb.weight_scale)


def _embed(ops, ids: torch.Tensor, emb: QLinear) -> torch.Tensor:
    return ref.embedding_lookup(ids, emb.weight_q, emb.weight_scale)


def _norm_logits(ops, residual: torch.Tensor, norm_w: torch.Tensor, eps: float, emb: QLinear) -> torch.Tensor:
    """logits(rmsnorm(residual)): ops may fuse the final norm into the logits."""
    return ops.logits(rmsnorm(residual, norm_w, eps), emb)


# stages that the fused front (in_proj_conv_x_proj) does not produce before the scan: a tracer wanting one of them
# gets the separate stages
_FRONT_STAGES = ("norm", "x_proj.dt_lowrank", "x_proj.B", "x_proj.C", "dt_proj")
# stages that the fused back (scan_out_proj) does not produce: a tracer wanting one of them gets the separate stages
_BACK_STAGES = ("dt_proj", "ssm", "hadamard", "out_proj")


class _ComposedStages:
    """The stages both paths build from their own primitives (quantize, linear, dequant, ...) the same way."""

    scan = _ref_scan
    linear_quant = _linear_quant
    linear_add = _linear_add
    norm_linear_quant = _norm_linear_quant
    dt_proj_scan = _dt_proj_scan
    scan_out_proj = _scan_out_proj
    conv_x_proj = _conv_x_proj
    in_proj_conv_x_proj = _in_proj_conv_x_proj
    hadamard_linear_add = _hadamard_linear_add
    logits = _logits
    norm_logits = _norm_logits
    embed = _embed


class IntOps(_ComposedStages):
    """Stages computed on integer tensors with the reference ops."""

    simulate = False

    def qtensor(self, a: Act) -> trace.QTensor:
        return trace.QTensor(a.value, a.scale, a.mask, a.outlier_scale)

    def quantize(self, x: torch.Tensor, s: float) -> Act:
        return Act(quantize(x, s), s)

    def norm_quant(self, r: torch.Tensor, w: torch.Tensor, eps: float, s: float) -> Act:
        return Act(ref.rms_norm_quant(r, w, eps, s), s)

    def linear(self, a: Act, lin: QLinear) -> torch.Tensor:
        return ref.quant_linear(
            a.value, lin.weight_q, a.scale, lin.weight_scale, None, a.mask, a.outlier_scale
        )

    def conv(self, x: Act, lyr: QLayer, state, s_u: float, s_out: float | None):
        u, mask, st = ref.quant_causal_conv1d(
            x.value, lyr.conv_weight_q, lyr.conv_weight_scale, lyr.conv_bias, x.scale, s_u, state, s_out
        )
        return Act(u, s_u, mask, s_out), st

    def dequant(self, a: Act) -> torch.Tensor:
        if a.scale is None:
            return a.value
        return ref.dequantize_dual(a.value, a.mask, a.scale, a.outlier_scale)

    def hadamard_quant(self, y: torch.Tensor, s: float) -> Act:
        return Act(ref.hadamard_quant(y, s), s)

    def conv_state_zeros(self, bsz: int, d: int, k: int) -> torch.Tensor:
        return torch.zeros(bsz, d, k - 1, dtype=torch.int8)


class SimOps(_ComposedStages):
    """Stages computed as fake quantization in float32 (float64 GEMMs over recovered codes)."""

    simulate = True

    def qtensor(self, a: Act) -> trace.QTensor:
        s = a.scale
        if a.mask is None:
            codes = codes_of(a.value, s)
        else:
            codes = torch.where(a.mask.bool(), codes_of(a.value, a.outlier_scale), codes_of(a.value, s))
        mask = None if a.mask is None else a.mask.to(torch.uint8)
        return trace.QTensor(codes.to(torch.int8), s, mask, a.outlier_scale)

    def quantize(self, x: torch.Tensor, s: float) -> Act:
        return Act(fake_quant(x, s), s)

    def norm_quant(self, r: torch.Tensor, w: torch.Tensor, eps: float, s: float) -> Act:
        return Act(fake_quant(rmsnorm(r, w, eps), s), s)

    def _codes(self, a: Act) -> torch.Tensor:
        if a.mask is None:
            return codes_of(a.value, a.scale)
        return torch.where(a.mask.bool(), codes_of(a.value, a.outlier_scale), codes_of(a.value, a.scale))

    def linear(self, a: Act, lin: QLinear) -> torch.Tensor:
        w_fq = lin.dequantized()
        w_codes = codes_of(w_fq, lin.weight_scale[:, None]).double()
        c = self._codes(a).double()
        if a.mask is None:
            acc = F.linear(c, w_codes).float()
            return acc * scale_product(a.scale, lin.weight_scale)
        m = a.mask.double()
        acc_in = F.linear(c * (1 - m), w_codes).float()
        acc_out = F.linear(c * m, w_codes).float()
        return acc_in * scale_product(a.scale, lin.weight_scale) + acc_out * scale_product(
            a.outlier_scale, lin.weight_scale
        )

    def conv(self, x: Act, lyr: QLayer, state, s_u: float, s_out: float | None):
        bsz, seqlen, d = x.value.shape
        k = lyr.conv_weight_q.shape[1]
        if state is None:
            state = torch.zeros(bsz, d, k - 1)
        xt = torch.cat([state.transpose(1, 2), x.value], 1)
        w_fq = lyr.conv_weight_q.float() * lyr.conv_weight_scale[:, None]
        acc = F.conv1d(
            codes_of(xt, x.scale).double().transpose(1, 2),
            codes_of(w_fq, lyr.conv_weight_scale[:, None]).double()[:, None, :],
            groups=d,
        ).transpose(1, 2)
        v = acc.float() * scale_product(x.scale, lyr.conv_weight_scale) + lyr.conv_bias
        u = silu_r(v)
        new_state = xt[:, seqlen:].transpose(1, 2).contiguous()
        if s_out is None:
            return Act(fake_quant(u, s_u), s_u), new_state
        q_in = torch.round(u / divisor(s_u, u))
        mask = (q_in < QMIN) | (q_in > QMAX)
        u_fq = torch.where(mask, fake_quant(u, s_out), q_in * torch.tensor(s_u))
        return Act(u_fq, s_u, mask.float(), s_out), new_state

    def dequant(self, a: Act) -> torch.Tensor:
        return a.value

    def hadamard_quant(self, y: torch.Tensor, s: float) -> Act:
        return Act(fake_quant(hadamard_transform(y), s), s)

    def conv_state_zeros(self, bsz: int, d: int, k: int) -> torch.Tensor:
        return torch.zeros(bsz, d, k - 1)


class QuantMambaLM:
    """A calibrated, quantized Mamba LM. Not an nn.Module: it holds fixed integer weights."""

    def __init__(
        self,
        cfg: MambaConfig,
        recipe: Recipe,
        layers: list[QLayer],
        embedding: QLinear,
        norm_f_weight: torch.Tensor,
        meta: dict | None = None,
    ) -> None:
        self.cfg = cfg
        self.recipe = recipe
        self.layers = layers
        self.embedding = embedding  # tied: the input table and the lm_head (spec 4.7)
        self.norm_f_weight = norm_f_weight
        self.meta = meta or {}

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,
        states: list[LayerState] | None = None,
        simulate: bool = False,
        ops=None,
    ) -> tuple[torch.Tensor, list[LayerState]]:
        """ops: how the stages compute (default IntOps, or SimOps with simulate=True; the CUDA runtime passes
        its kernel-backed ops, qmamba/runtime/cuda_model.py)."""
        check_inputs(input_ids, states, self.cfg.n_layer)
        ops = ops or (SimOps() if simulate else IntOps())
        residual = ops.embed(input_ids, self.embedding)
        new_states = []
        for i, lyr in enumerate(self.layers):
            residual, st = self._block(ops, i, lyr, residual, None if states is None else states[i])
            new_states.append(st)
        tr = trace.active()
        if tr is not None and tr.wants("norm_f"):
            hf = rmsnorm(residual, self.norm_f_weight, self.cfg.rms_norm_eps)
            trace.record("norm_f", hf)
            logits = ops.logits(hf, self.embedding)
        else:  # nobody looks at the final norm alone: ops may fuse it into the logits
            logits = ops.norm_logits(residual, self.norm_f_weight, self.cfg.rms_norm_eps, self.embedding)
        trace.record("logits", logits)
        return logits, new_states

    def _block(self, ops, i: int, lyr: QLayer, residual: torch.Tensor, state: LayerState | None):
        cfg, rc, s = self.cfg, self.recipe, lyr.scales
        d, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank

        def wanted(stage: str) -> bool:
            tr = trace.active()
            return tr is not None and tr.wants(trace.stage_name(i, stage))

        def rec(stage: str, a: Act | torch.Tensor) -> None:
            if not wanted(stage):
                return
            tr, name = trace.active(), trace.stage_name(i, stage)
            if isinstance(a, torch.Tensor) or a.scale is None:
                tr.record(name, a if isinstance(a, torch.Tensor) else a.value)
                return
            qt = ops.qtensor(a)
            tr.record(name, qt)
            if qt.mask is not None:
                tr.record(name + ".mask", qt.mask)

        xz_segments = [(d, s["in_proj.x"]), (d, s["in_proj.z"])] if rc.int8_ssm else []
        xp_segments = [(r, s["x_proj.dt_lowrank"]), (n, s["x_proj.B"]), (n, s["x_proj.C"])] if rc.int8_ssm else []
        conv_state = None if state is None else state.conv
        if rc.int8_ssm and not any(wanted(t) for t in _FRONT_STAGES):
            # nobody looks at the norm, x_proj or dt_proj alone: ops may fuse from the norm to x_proj. deferred: work
            # that ops which fuse stages left to the scan (CudaOps: x_proj's epilogue)
            x, z, u, conv_state, (dt_lr, bm, cm), deferred = ops.in_proj_conv_x_proj(
                residual, lyr, cfg.rms_norm_eps, xz_segments, conv_state, xp_segments)
            rec("in_proj.x", x)
            rec("in_proj.z", z)
            rec("conv1d", u)
        else:
            x, z, u, conv_state, (dt_lr, bm, cm), deferred = self._separate_front(
                ops, lyr, residual, conv_state, xz_segments, xp_segments, wanted, rec)

        ssm_in = None if state is None else state.ssm
        if rc.int8_ssm and not any(wanted(t) for t in _BACK_STAGES):
            # nobody looks between x_proj and the block's output: ops may fuse the scan (dt_proj in it) and out_proj
            residual, ssm_state = ops.scan_out_proj(dt_lr, lyr, s["dt_proj"], u, bm, cm, z, ssm_in, deferred,
                                                    s["hadamard"], residual)
        else:
            residual, ssm_state = self._separate_back(ops, lyr, residual, (dt_lr, u, bm, cm, z), ssm_in, deferred,
                                                      wanted, rec)
        rec("block", residual)
        if conv_state is None:
            conv_state = ops.conv_state_zeros(residual.shape[0], d, cfg.d_conv)
        return residual, LayerState(conv_state, ssm_state)

    def _separate_back(self, ops, lyr: QLayer, residual: torch.Tensor, ins: tuple, ssm_in: torch.Tensor | None,
                       deferred, wanted, rec):
        """dt_proj, the scan, the Hadamard and out_proj as separate stages (a tracer wants one of them): (residual,
        final state), recording each stage a tracer wants."""
        rc, s = self.recipe, lyr.scales
        d = self.cfg.d_inner
        dt_lr, u, bm, cm, z = ins
        if rc.int8_ssm and not wanted("dt_proj"):  # ops may fuse dt_proj into the scan
            y, ssm_state = ops.dt_proj_scan(dt_lr, lyr, s["dt_proj"], u, bm, cm, z, ssm_in, deferred)
        else:
            if rc.int8_ssm:
                (dt,) = ops.linear_quant(dt_lr, lyr.dt_proj, [(d, s["dt_proj"])])
            else:
                dt = Act(ops.linear(dt_lr, lyr.dt_proj))
            rec("dt_proj", dt)
            y, ssm_state = ops.scan(u, dt, bm, cm, z, lyr, ssm_in, deferred)
        rec("ssm", y)
        if not wanted("hadamard") and not wanted("out_proj"):  # ops may fuse both into out_proj
            residual = ops.hadamard_linear_add(y, s["hadamard"], lyr.out_proj, residual)
        else:
            hq = ops.hadamard_quant(y, s["hadamard"])
            rec("hadamard", hq)
            if wanted("out_proj"):
                out = ops.linear(hq, lyr.out_proj)
                rec("out_proj", out)
                residual = residual + out
            else:  # nobody looks at out_proj alone: ops may fuse the residual add into the linear
                residual = ops.linear_add(hq, lyr.out_proj, residual)
        return residual, ssm_state

    def _separate_front(self, ops, lyr: QLayer, residual: torch.Tensor, conv_state: torch.Tensor | None,
                        xz_segments: list[tuple[int, float]], xp_segments: list[tuple[int, float]], wanted, rec):
        """The norm, in_proj, conv and x_proj as separate stages (a tracer wants one of them, or the SSM inputs are
        float): (x, z, u, conv state, (dt_lowrank, B, C), deferred), recording each stage a tracer wants. deferred:
        work that ops which fuse stages left to the scan (CudaOps: a conv-state shift), else None."""
        cfg, rc, s = self.cfg, self.recipe, lyr.scales
        d, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank
        if rc.int8_ssm and not wanted("norm"):  # nobody looks at the norm alone: ops may fuse it into in_proj
            x, z = ops.norm_linear_quant(residual, lyr.norm_weight, cfg.rms_norm_eps, s["norm"], lyr.in_proj,
                                         xz_segments)
        else:
            h = ops.norm_quant(residual, lyr.norm_weight, cfg.rms_norm_eps, s["norm"])
            rec("norm", h)
            if rc.int8_ssm:
                x, z = ops.linear_quant(h, lyr.in_proj, xz_segments)
            else:
                xz = ops.linear(h, lyr.in_proj)
                x, z = Act(xz[..., :d].contiguous()), Act(xz[..., d:].contiguous())
        rec("in_proj.x", x)
        rec("in_proj.z", z)
        deferred = None
        if rc.int8_ssm:
            u, conv_state, (dt_lr, bm, cm), deferred = ops.conv_x_proj(
                x, lyr, conv_state, s["conv1d"], s.get("conv1d.outlier"), xp_segments)
            rec("conv1d", u)
            rec("x_proj.dt_lowrank", dt_lr)
        else:
            u_f, conv_state = ref.causal_conv1d_silu(x.value, lyr.conv_weight, lyr.conv_bias, conv_state)
            u = Act(u_f)
            rec("conv1d", u)
            u_lin = ops.quantize(u_f, s["x_proj.in"])
            xdbl = ops.linear(u_lin, lyr.x_proj)
            dt_lr_f, b_f, c_f = xdbl[..., :r], xdbl[..., r : r + n], xdbl[..., r + n :]
            dt_lr = ops.quantize(dt_lr_f, s["x_proj.dt_lowrank"])
            bm, cm = Act(b_f.contiguous()), Act(c_f.contiguous())
            rec("x_proj.dt_lowrank", dt_lr_f)
        rec("x_proj.B", bm)
        rec("x_proj.C", cm)
        return x, z, u, conv_state, (dt_lr, bm, cm), deferred

    def to(self, device: str | torch.device) -> QuantMambaLM:
        """A copy with every tensor on `device` (scales stay Python floats)."""

        def mv(x):
            if isinstance(x, torch.Tensor):
                return x.to(device)
            if isinstance(x, QLinear):
                return QLinear(mv(x.weight_q), mv(x.weight_scale))
            return x

        names = [f.name for f in dataclasses.fields(QLayer)]
        layers = [QLayer(**{k: mv(getattr(lyr, k)) for k in names}) for lyr in self.layers]
        return QuantMambaLM(self.cfg, self.recipe, layers, mv(self.embedding), self.norm_f_weight.to(device),
                            self.meta)

    def init_states(self, batch: int, simulate: bool = False) -> list[LayerState]:
        ops = SimOps() if simulate else IntOps()
        cfg = self.cfg
        states = []
        for _ in range(cfg.n_layer):
            if self.recipe.int8_ssm:
                conv = ops.conv_state_zeros(batch, cfg.d_inner, cfg.d_conv)
            else:
                conv = torch.zeros(batch, cfg.d_inner, cfg.d_conv - 1)
            states.append(LayerState(conv, torch.zeros(batch, cfg.d_inner, cfg.d_state)))
        return states

