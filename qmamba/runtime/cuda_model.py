"""The quantized model on a CUDA GPU: the project's kernels (qmamba.cuda) + int8 GEMMs, decode in CUDA graphs.

`CudaOps` computes every stage of QuantMambaLM's block program (the same `_block` as the CPU integer path)
on the GPU: RMSNormQuant, conv, HadamardQuant and the scan with the CUDA kernels; each linear with its
dequantize/requantize epilogue fused (qm_int8_linear: a dp4a GEMV for <= 4 rows, else a cuBLASLt int8 GEMM
via `torch._int_mm` + the epilogue kernel). In decode, when no tracer asks for those stages, RMSNormQuant runs
inside the in_proj GEMV and dt_proj inside the state-update kernel (`norm_linear_quant`, `dt_proj_scan`). For one
sequence also the conv and x_proj's int32 sums run behind the in_proj GEMV, x_proj's epilogue in the state update
(`in_proj_conv_x_proj`; the out_proj GEMV zeroes the sums again), and HadamardQuant inside the out_proj GEMV
(`hadamard_linear_add`): three kernels per layer. The decode-path kernels use
programmatic dependent launch; a step opens with the embedding kernel (qm_embedding_lookup, without it: the early
state reads rely on that) and ends with the logits reading the int8 tied embedding directly, the final RMSNorm inside
(qm_tied_logits, `norm_logits`). Other quantizers divide by a CUDA tensor (a CPU scalar divisor
makes PyTorch multiply by its reciprocal, which is not the spec's division). Every
integer stage equals the CPU integer path up to the scan; the scan's float output is within 1e-5 (fast
float32 math), so the int8 codes after it may differ at rounding ties (tests/test_cuda_backend.py).

`CudaBackend` serves it: prefill eagerly, decode steps replayed from CUDA graphs captured per batch-size
bucket over static token/state buffers (the states returned by decode *are* those buffers, so consecutive
steps of the same batch copy nothing).
"""

from __future__ import annotations

import dataclasses

import torch

from qmamba import cuda as k
from qmamba.model.mamba import LayerState
from qmamba.ops import ref
from qmamba.ops.hadamard import factor
from qmamba.ops.specmath import QMAX, QMIN, a_from_a_log, scale_product
from qmamba.quant.qmodel import Act, IntOps, QLayer, QLinear, QuantMambaLM

LOGITS_KERNEL_ROWS = 64  # qm_tied_logits reads the int8 table once per 4 rows: decode batches up to 64 use it


@dataclasses.dataclass
class XProjSums:
    """x_proj's int32 sums left by an in_proj GEMV with the conv and x_proj behind it: the state update applies
    x_proj's epilogue (m_in, m_out: the multipliers; the segment scales are those of the dt_lowrank, B and C Acts)
    and writes the codes into those Acts' tensors."""

    acc: torch.Tensor  # int32 [xp_n] or [2, xp_n] (outliers: dual scale)
    m_in: torch.Tensor
    m_out: torch.Tensor | None


def hadamard_factor(d: int) -> tuple[int, int]:
    """The spec's d = m * p (qmamba.ops.hadamard.factor); (0, 0) where d has none, so that callers fall back."""
    try:
        return factor(d)
    except ValueError:
        return 0, 0


class CudaOps(IntOps):
    """IntOps on CUDA tensors with the kernels; caches device scales, multipliers and A per layer.
    in_place_states: conv and SSM states are updated in the tensors passed in (the decode graphs' buffers).
    The conv and state-update kernels read their states early (early_state): every model step starts with the
    embedding gather, a kernel launched without programmatic dependent launch, and a layer's states are written
    only by that layer's own conv (or the GEMV that runs it) / scan of an earlier step, so none is written by a kernel
    still ahead."""

    def __init__(self, device: torch.device, in_place_states: bool = False, fuse_conv: bool = True,
                 fuse_hadamard: bool = True, fuse_x_proj_behind: bool = True, fuse_final_norm: bool = True,
                 embedding_kernel: bool = True, early_residual: bool = True,
                 fuse_update_out_proj: bool = True) -> None:
        self.device = device
        self.in_place = in_place_states
        # False only to measure the separate kernels (bench/e2e.py --compare-fusions)
        self.fuse_conv, self.fuse_hadamard, self.fuse_x_proj_behind = fuse_conv, fuse_hadamard, fuse_x_proj_behind
        self.fuse_final_norm, self.embedding_kernel = fuse_final_norm, embedding_kernel
        self.early_residual = early_residual
        self.fuse_update_out_proj = fuse_update_out_proj
        self._smem: int | None = None  # shared memory per block with the opt-in (scan_out_proj)
        self._xp_acc: dict[tuple[int, bool], torch.Tensor] = {}  # per layer: x_proj's sums, zero between steps
        self._clear_next: torch.Tensor | None = None  # sums whose reader ran: the next GEMV zeroes them
        self._unread: torch.Tensor | None = None  # sums an in_proj filled that no state update has read yet
        self._scales: dict[float, torch.Tensor] = {}
        self._mult: dict[tuple[int, float], torch.Tensor] = {}
        self._A: dict[int, torch.Tensor] = {}

    def _s(self, s: float) -> torch.Tensor:
        t = self._scales.get(s)
        if t is None:
            t = self._scales[s] = torch.tensor(s, dtype=torch.float32, device=self.device)
        return t

    def quantize(self, x: torch.Tensor, s: float) -> Act:
        q = torch.round(x.float() / self._s(s))  # a CUDA tensor divisor: IEEE division
        return Act(q.clamp_(QMIN, QMAX).to(torch.int8), s)

    def norm_quant(self, r: torch.Tensor, w: torch.Tensor, eps: float, s: float) -> Act:
        return Act(k.rms_norm_quant(r.float().contiguous(), w, eps, s), s)

    def _multiplier(self, in_scale: float, lin: QLinear) -> torch.Tensor:
        key = (id(lin), in_scale)
        m = self._mult.get(key)
        if m is None:
            m = self._mult[key] = scale_product(in_scale, lin.weight_scale.cpu()).to(self.device)
        return m

    def _linear(self, a: Act, lin: QLinear, segments: list[tuple[int, float | None]],
                residual: torch.Tensor | None = None, early_residual: bool = False) -> list[torch.Tensor]:
        """One W8A8 linear: GEMV + epilogue for <= 16 rows (decode), else cuBLASLt int8 GEMM + epilogue kernel."""
        x = a.value.contiguous()
        rows = x.numel() // x.shape[-1]
        m_out = None if a.mask is None else self._multiplier(a.outlier_scale, lin)
        acc_in = acc_out = None
        if rows > k.GEMV_MAX_ROWS or x.shape[-1] % 16:
            x2 = x.reshape(rows, -1)
            if a.mask is None:
                acc_in = self._int_mm(x2, lin)
            else:
                m = a.mask.reshape(rows, -1).bool()
                zero = torch.zeros((), dtype=torch.int8, device=self.device)
                acc_in = self._int_mm(torch.where(m, zero, x2), lin)
                acc_out = self._int_mm(torch.where(m, x2, zero), lin)
        clear = self._take_clear()
        outs = k.int8_linear(x, lin.weight_q, self._multiplier(a.scale, lin), segments,
                             None if a.mask is None else a.mask.contiguous(), m_out, acc_in, acc_out, residual,
                             clear=None if acc_in is not None else clear,
                             early_residual=early_residual and acc_in is None and rows == 1)
        if clear is not None and acc_in is not None:  # the GEMM path has no clear: a torch memset then
            clear.zero_()
        return outs

    def _take_clear(self) -> torch.Tensor | None:
        clear, self._clear_next = self._clear_next, None
        return clear

    @staticmethod
    def _int_mm(x2: torch.Tensor, lin: QLinear) -> torch.Tensor:
        """int32 [rows, n] = x2 @ W^T by cuBLASLt (torch._int_mm needs more than 16 rows: zero rows pad it)."""
        rows = x2.shape[0]
        if rows <= 16:
            x2 = torch.cat([x2, x2.new_zeros(17 - rows, x2.shape[1])])
        return torch._int_mm(x2, lin.weight_q.t())[:rows].contiguous()

    def linear(self, a: Act, lin: QLinear) -> torch.Tensor:
        return self._linear(a, lin, [(lin.weight_q.shape[0], None)])[0]

    def linear_add(self, a: Act, lin: QLinear, residual: torch.Tensor) -> torch.Tensor:
        """residual += linear(a) inside the linear's epilogue (the block owns its residual tensor)."""
        early = self._early_residual(residual)
        residual = residual.contiguous()
        return self._linear(a, lin, [(lin.weight_q.shape[0], None)], residual=residual, early_residual=early)[0]

    def _early_residual(self, residual: torch.Tensor) -> bool:
        """Whether out_proj's GEMV may read the residual before its dependency wait: in a decode step (states in
        place) the residual stream is written only by out_proj (and the step's embedding), two or more kernels
        before the next out_proj (in_proj and the state update run between), and a contiguous tensor needs no copy
        kernel right before (qm_linear_args.early_residual)."""
        return self.early_residual and self.in_place and residual.is_contiguous()

    def linear_quant(self, a: Act, lin: QLinear, segments: list[tuple[int, float]]) -> list[Act]:
        outs = self._linear(a, lin, segments)
        return [Act(o, sc) for o, (_, sc) in zip(outs, segments, strict=True)]

    def norm_linear_quant(self, residual: torch.Tensor, norm_w: torch.Tensor, eps: float, s_norm: float,
                          lin: QLinear, segments: list[tuple[int, float]]) -> list[Act]:
        """Decode (rows <= GEMV_MAX_ROWS): the GEMV computes RMSNormQuant itself, one kernel instead of two."""
        r = residual.float().contiguous()
        kdim = r.shape[-1]
        if r.numel() // kdim > k.GEMV_MAX_ROWS or kdim % 16 or kdim > 8192:
            return super().norm_linear_quant(residual, norm_w, eps, s_norm, lin, segments)
        outs = k.int8_linear(None, lin.weight_q, self._multiplier(s_norm, lin), segments,
                             norm=(r, norm_w, eps, s_norm))
        return [Act(o, sc) for o, (_, sc) in zip(outs, segments, strict=True)]

    def dt_proj_scan(self, dt_lr: Act, lyr: QLayer, s_dt: float, u: Act, bm: Act, cm: Act, z: Act,
                     state: torch.Tensor | None, deferred: tuple | XProjSums | None = None):
        """Decode (one token, a state): the state-update kernel computes dt_proj itself (and shifts the conv
        state when conv_x_proj left that to it, or applies x_proj's epilogue to the sums in_proj_conv_x_proj left)."""
        if state is None or u.value.shape[1] != 1 or u.scale is None:
            self._settle(deferred)
            return super().dt_proj_scan(dt_lr, lyr, s_dt, u, bm, cm, z, state)
        lin = lyr.dt_proj
        xp = deferred if isinstance(deferred, XProjSums) else None
        y = k.selective_state_update(
            state, u.value, u.mask, None, bm.value.contiguous(), cm.value.contiguous(), z.value.contiguous(),
            self._a(lyr), lyr.D, lyr.dt_bias, in_place=self.in_place,
            dt_proj=(dt_lr.value.contiguous(), lin.weight_q, self._multiplier(dt_lr.scale, lin)),
            u_scale=u.scale, u_outlier_scale=u.outlier_scale, dt_scale=s_dt, B_scale=bm.scale, C_scale=cm.scale,
            z_scale=z.scale, early_state=True, conv_shift=None if xp else deferred,
            x_proj=None if xp is None else (xp.acc, xp.m_in, xp.m_out, dt_lr.scale))
        if xp is not None:
            self._unread = None
            self._clear_next = xp.acc  # read: the next GEMV (out_proj) zeroes the sums after its wait
        return y

    def scan_out_proj(self, dt_lr: Act, lyr: QLayer, s_dt: float, u: Act, bm: Act, cm: Act, z: Act,
                      state: torch.Tensor | None, deferred, s_h: float, residual: torch.Tensor):
        """Decode of one sequence (one token, states in place) on sm_90+, d_inner = m * 2^j (m 1 or 12) a multiple
        of 128 up to 2048, d_model up to 2048: the state update (dt_proj, x_proj's epilogue and the conv shift in
        it) and out_proj (HadamardQuant in front, the residual behind) in one kernel of a 16-block cluster
        (qm_update_out_proj), where one block's share of out_proj's weights fits its shared memory."""
        d, n = u.value.shape[-1], lyr.out_proj.weight_q.shape[0]
        m, p = hadamard_factor(d)
        if not (self.fuse_update_out_proj and self.fuse_hadamard and self.in_place and state is not None
                and u.scale is not None and u.value.shape[:2] == (1, 1) and residual.numel() == n
                and d % 128 == 0 and d <= 2048 and n <= 2048 and m in (1, 12) and p >= 8
                and lyr.A_log.shape[1] == 16 and -(-n // 16) * d + 10 * d <= self._smem_optin() - 4096):
            return super().scan_out_proj(dt_lr, lyr, s_dt, u, bm, cm, z, state, deferred, s_h, residual)
        xp = deferred if isinstance(deferred, XProjSums) else None
        pending = self._take_clear()
        if xp is not None:  # the kernel zeroes the sums it read (once every block's y has arrived)
            if pending is not None:
                pending.zero_()
            clear, self._unread = xp.acc, None
        else:
            clear = pending
        early = self._early_residual(residual)
        residual = residual.contiguous()
        lin, out = lyr.dt_proj, lyr.out_proj
        k.update_out_proj(
            state, u.value, u.mask, bm.value.contiguous(), cm.value.contiguous(), z.value.contiguous(), self._a(lyr),
            lyr.D, lyr.dt_bias, dt_proj=(dt_lr.value.contiguous(), lin.weight_q, self._multiplier(dt_lr.scale, lin)),
            out_proj=(out.weight_q, self._multiplier(s_h, out), s_h), residual=residual,
            conv_shift=None if xp else deferred,
            x_proj=None if xp is None else (xp.acc, xp.m_in, xp.m_out, dt_lr.scale), clear=clear,
            early_residual=early, u_scale=u.scale, u_outlier_scale=u.outlier_scale, dt_scale=s_dt,
            B_scale=bm.scale, C_scale=cm.scale, z_scale=z.scale)
        return residual, state

    def _smem_optin(self) -> int:
        """Shared memory per block with the opt-in (0 below sm_90: no thread-block clusters there): the SM's less
        the 1 KB the driver reserves per block (torch does not report the opt-in limit itself)."""
        if self._smem is None:
            props = torch.cuda.get_device_properties(self.device)
            self._smem = props.shared_memory_per_multiprocessor - 1024 if props.major >= 9 else 0
        return self._smem

    def _settle(self, deferred: tuple | XProjSums | None) -> None:
        """Do with torch ops what a fused op left to a kernel that will not run: the conv state's shift. x_proj's
        sums have no such path: in_proj_conv_x_proj fuses only where the fused state update follows (one token, a
        state, int8 inputs, no tracer on dt_proj)."""
        if isinstance(deferred, XProjSums):
            raise ValueError("x_proj's sums (in_proj_conv_x_proj) are read only by the fused state update "
                             "(dt_proj_scan with one token, a state and int8 inputs)")
        if deferred is not None:
            cx, cs = deferred
            cs.copy_(torch.cat([cs[..., 1:], cx.reshape(cs.shape[0], cs.shape[1], 1)], dim=-1))

    def in_proj_conv_x_proj(self, residual: torch.Tensor, lyr: QLayer, eps: float,
                            xz_segments: list[tuple[int, float]], state, xp_segments: list[tuple[int, float]]):
        """Decode of one sequence (one token, states in place): the in_proj GEMV (RMSNormQuant in front) runs the
        conv of its x channels and adds their share of x_proj into int32 sums; the state update that follows turns
        them into x_proj's codes (XProjSums, passed on as `deferred`). Two kernels fewer than norm-in_proj, conv,
        x_proj."""
        r = residual.float().contiguous()
        kdim, d = r.shape[-1], xz_segments[0][0]
        sc = lyr.scales
        s_norm, s_u, s_out = sc["norm"], sc["conv1d"], sc.get("conv1d.outlier")
        xp_n = sum(w for w, _ in xp_segments)
        if not (self.fuse_x_proj_behind and self.in_place and state is not None and r.numel() == kdim
                and kdim % 16 == 0 and kdim <= 8192 and d % 16 == 0 and lyr.conv_weight_q.shape[1] == 4
                and xp_n <= 1024 and len(xz_segments) == 2):
            return super().in_proj_conv_x_proj(residual, lyr, eps, xz_segments, state, xp_segments)
        # a step that stopped half way (an exception between the kernels of an eager step) left sums that no kernel
        # will zero: zero them here, before any in_proj adds to them again
        for stale in (self._unread, self._clear_next):
            if stale is not None:
                stale.zero_()
        self._unread = self._clear_next = None
        dual = s_out is not None
        acc = self._xp_acc.get((id(lyr), dual))
        if acc is None:
            acc = self._xp_acc[id(lyr), dual] = torch.zeros((2, xp_n) if dual else (xp_n,), dtype=torch.int32,
                                                            device=self.device)
        self._unread = acc
        u = torch.empty(1, 1, d, dtype=torch.int8, device=self.device)
        mask = torch.empty(1, 1, d, dtype=torch.uint8, device=self.device) if dual else None
        behind = k.ConvXProjBehind(lyr.conv_weight_q, lyr.conv_weight_scale, lyr.conv_bias, state, u, mask, s_u, s_out,
                                   lyr.x_proj.weight_q, acc, early_state=True)
        lin = lyr.in_proj
        x, z = k.int8_linear(None, lin.weight_q, self._multiplier(s_norm, lin), xz_segments,
                             norm=(r, lyr.norm_weight, eps, s_norm), behind=behind)
        xp = XProjSums(acc, self._multiplier(s_u, lyr.x_proj),
                       None if s_out is None else self._multiplier(s_out, lyr.x_proj))
        # the update writes the codes into these
        acts = [Act(torch.empty(1, 1, w, dtype=torch.int8, device=self.device), sc) for w, sc in xp_segments]
        return (Act(x, xz_segments[0][1]), Act(z, xz_segments[1][1]), Act(u, s_u, mask, s_out), state, acts, xp)

    def conv_x_proj(self, x: Act, lyr: QLayer, state, s_u: float, s_out: float | None,
                    segments: list[tuple[int, float]]):
        """Decode of one sequence (one token, states in place): the x_proj GEMV computes the conv itself, one
        kernel instead of two. The conv state is only read there; the state update shifts it (`deferred`). Not
        at 2-4 rows, where the kernel supports it but each block's conv share is 2-4x larger: 130m B4 0.574 ->
        0.600 ms, 2.8b B4 3.56 -> 3.97 ms (trt_plugins/bench/NOTES.md, session 8)."""
        xv = x.value
        bsz, seqlen, d = xv.shape
        if not (self.fuse_conv and self.in_place and state is not None and seqlen == 1 and bsz == 1
                and lyr.conv_weight_q.shape[1] == 4 and d % 16 == 0 and d <= 24576):
            return super().conv_x_proj(x, lyr, state, s_u, s_out, segments)
        xv = xv.contiguous()
        u = torch.empty_like(xv)
        mask = None if s_out is None else torch.empty(xv.shape, dtype=torch.uint8, device=xv.device)
        conv = k.FusedConv(xv, lyr.conv_weight_q, lyr.conv_weight_scale, lyr.conv_bias, state, u, mask, x.scale, s_u,
                           s_out, early_state=True)
        lin = lyr.x_proj
        outs = k.int8_linear(None, lin.weight_q, self._multiplier(s_u, lin), segments,
                             m_out=None if s_out is None else self._multiplier(s_out, lin), conv=conv)
        acts = [Act(o, sc) for o, (_, sc) in zip(outs, segments, strict=True)]
        return Act(u, s_u, mask, s_out), state, acts, (xv, state)

    def norm_logits(self, residual: torch.Tensor, norm_w: torch.Tensor, eps: float, emb: QLinear) -> torch.Tensor:
        """Decode-sized batches: qm_tied_logits applies the final RMSNorm itself (each block to its copy of the
        rows), one kernel instead of the dozen small torch ops of specmath.rmsnorm."""
        rows, kdim = residual.numel() // residual.shape[-1], residual.shape[-1]
        if not (self.fuse_final_norm and rows <= LOGITS_KERNEL_ROWS and kdim % 16 == 0 and kdim <= 4096):
            return super().norm_logits(residual, norm_w, eps, emb)
        return k.tied_logits(residual, emb.weight_q, emb.weight_scale, norm=(norm_w.float().contiguous(), eps))

    def embed(self, ids: torch.Tensor, emb: QLinear) -> torch.Tensor:
        """One kernel (qm_embedding_lookup) instead of torch's gathers, cast and product."""
        if not self.embedding_kernel:
            return super().embed(ids, emb)
        return k.embedding_lookup(ids, emb.weight_q, emb.weight_scale)

    def logits(self, hf: torch.Tensor, emb: QLinear) -> torch.Tensor:
        rows, kdim = hf.numel() // hf.shape[-1], hf.shape[-1]
        if rows <= LOGITS_KERNEL_ROWS and kdim % 16 == 0 and kdim <= 4096:
            return k.tied_logits(hf, emb.weight_q, emb.weight_scale)
        # many rows (prefill): a float GEMM per slice of the vocabulary keeps the float copy of the table small
        out = torch.empty(*hf.shape[:-1], emb.weight_q.shape[0], dtype=torch.float32, device=hf.device)
        for v0 in range(0, emb.weight_q.shape[0], 8192):
            sl = slice(v0, v0 + 8192)
            out[..., sl] = ref.tied_logits(hf, emb.weight_q[sl], emb.weight_scale[sl])
        return out

    def conv(self, x: Act, lyr: QLayer, state, s_u: float, s_out: float | None):
        u, mask, st = k.quant_causal_conv1d(x.value.contiguous(), lyr.conv_weight_q, lyr.conv_weight_scale,
                                            lyr.conv_bias, x.scale, s_u, state, s_out,
                                            state_out=state if self.in_place else None, early_state=True)
        return Act(u, s_u, mask, s_out), st

    def hadamard_linear_add(self, y: torch.Tensor, s_h: float, lin: QLinear, residual: torch.Tensor) -> torch.Tensor:
        """One row (decode of one sequence): the out_proj GEMV computes HadamardQuant itself, one kernel instead of
        two: every block recomputes the row. d_inner = m * 2^j: up to 2048 with m 1 or 12; up to 6144 with m 1, 12,
        20 or 28 on sm_90+ (1.4b, 2.8b), where each block holds its weight rows in shared memory."""
        d = y.shape[-1]
        m, p = hadamard_factor(d)
        fits = (d <= 2048 and m in (1, 12)) or (2048 < d <= 6144 and self._smem_optin() > 0)
        if not (self.fuse_hadamard and y.numel() == d and p >= 8 and fits and y.dtype == torch.float32):
            return super().hadamard_linear_add(y, s_h, lin, residual)
        early = self._early_residual(residual)
        residual = residual.contiguous()
        return k.int8_linear(None, lin.weight_q, self._multiplier(s_h, lin), [(lin.weight_q.shape[0], None)],
                             residual=residual, hadamard=(y.contiguous(), s_h), clear=self._take_clear(),
                             early_residual=early)[0]

    def hadamard_quant(self, y: torch.Tensor, s: float) -> Act:
        return Act(k.hadamard_quant(y.contiguous(), s), s)

    def conv_state_zeros(self, bsz: int, d: int, kk: int) -> torch.Tensor:
        return torch.zeros(bsz, d, kk - 1, dtype=torch.int8, device=self.device)

    def _a(self, lyr: QLayer) -> torch.Tensor:
        a = self._A.get(id(lyr))
        if a is None:
            a = self._A[id(lyr)] = a_from_a_log(lyr.A_log.cpu()).to(self.device)
        return a

    def scan(self, u: Act, dt: Act, bm: Act, cm: Act, z: Act, lyr: QLayer, state: torch.Tensor | None,
             deferred: tuple | XProjSums | None = None):
        self._settle(deferred)  # e.g. the conv ran inside x_proj (traced dt_proj): shift its state here
        out = state if self.in_place else None
        if u.scale is None:  # w8a8-fpssm: float inputs
            return k.selective_scan(u.value.contiguous(), dt.value.contiguous(), self._a(lyr), bm.value.contiguous(),
                                    cm.value.contiguous(), lyr.D, z.value.contiguous(), lyr.dt_bias,
                                    initial_state=state, final_state=out)
        return k.dual_scale_selective_scan(
            u.value, u.mask, dt.value, bm.value.contiguous(), cm.value.contiguous(), z.value.contiguous(),
            self._a(lyr), lyr.D, lyr.dt_bias, u_scale=u.scale, u_outlier_scale=u.outlier_scale, dt_scale=dt.scale,
            B_scale=bm.scale, C_scale=cm.scale, z_scale=z.scale, initial_state=state, final_state=out)


class CudaQuantModel:
    """A QuantMambaLM on the GPU, called like the CPU model: (logits, states) = model(ids, states)."""

    def __init__(self, model: QuantMambaLM, device: str | torch.device = "cuda") -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("the CUDA model needs a CUDA GPU (torch.cuda.is_available() is False)")
        self.device = torch.device(device)
        k.load_library()
        self.model = model.to(self.device)
        self.cfg = model.cfg
        self.ops = CudaOps(self.device)
        self.in_place_ops = CudaOps(self.device, in_place_states=True)

    def __call__(self, ids: torch.Tensor, states: list[LayerState] | None = None, in_place: bool = False):
        """in_place: write the new states into `states` (the decode graphs) instead of new tensors."""
        return self.model(ids.to(self.device), states, ops=self.in_place_ops if in_place else self.ops)

    def init_states(self, batch: int) -> list[LayerState]:
        cfg = self.cfg
        conv_dtype = torch.int8 if self.model.recipe.int8_ssm else torch.float32
        return [LayerState(torch.zeros(batch, cfg.d_inner, cfg.d_conv - 1, dtype=conv_dtype, device=self.device),
                           torch.zeros(batch, cfg.d_inner, cfg.d_state, device=self.device))
                for _ in range(cfg.n_layer)]


class _DecodeGraph:
    """One captured decode step for a fixed batch size: static token and state buffers, updated in place."""

    def __init__(self, model: CudaQuantModel, batch: int) -> None:
        self.batch = batch
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
        self.states = model.init_states(batch)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (library load, cuBLASLt heuristics)
            for _ in range(2):
                model(self.ids, self.states, in_place=True)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            logits, new = model(self.ids, self.states, in_place=True)
            for st, nw in zip(self.states, new, strict=True):  # in place: nothing to copy (checked, not assumed)
                if nw.conv.data_ptr() != st.conv.data_ptr():
                    st.conv.copy_(nw.conv)
                if nw.ssm.data_ptr() != st.ssm.data_ptr():
                    st.ssm.copy_(nw.ssm)
            self.logits = logits[:, -1].float()

    def step(self, tokens: torch.Tensor, states: list[LayerState]) -> tuple[torch.Tensor, list[LayerState]]:
        n = tokens.shape[0]
        self.ids[:n, 0].copy_(tokens.to(self.ids.device))
        if states is not self.states:  # another batch (or a changed one): copy its states in, zero the padding
            for st, src in zip(self.states, states, strict=True):
                st.conv[:n].copy_(src.conv)
                st.ssm[:n].copy_(src.ssm)
                st.conv[n:].zero_()
                st.ssm[n:].zero_()
        self.graph.replay()
        return self.logits[:n], self.states


class CudaBackend:
    """The `torch` backend on a GPU: CudaQuantModel, prefill eager, decode from CUDA graphs per batch bucket."""

    name = "torch"
    BUCKETS = (1, 2, 4, 8, 16, 32, 64)

    def __init__(self, model: QuantMambaLM, device: str = "cuda", graphs: bool = True) -> None:
        self.model = CudaQuantModel(model, device)
        self.vocab_size = model.cfg.vocab_size
        self.graphs = graphs
        self._graphs: dict[int, _DecodeGraph] = {}

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[LayerState]]:
        logits, states = self.model(ids)
        return logits[:, -1].float().cpu(), states

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, states: list[LayerState]) -> tuple[torch.Tensor, list[LayerState]]:
        n = tokens.shape[0]
        bucket = next((b for b in self.BUCKETS if b >= n), None)
        if not self.graphs or bucket is None:
            logits, states = self.model(tokens.view(-1, 1), states)
            return logits[:, -1].float().cpu(), states
        g = self._graphs.get(bucket)
        if g is None:
            g = self._graphs[bucket] = _DecodeGraph(self.model, bucket)
        logits, st = g.step(tokens, states)
        if bucket != n:  # padded bucket: hand back views of the live rows (copied in again next step)
            st = [LayerState(s.conv[:n], s.ssm[:n]) for s in st]
        return logits.cpu(), st

    def cat_states(self, states: list[list[LayerState]]) -> list[LayerState]:
        return [LayerState(torch.cat([s[i].conv for s in states]), torch.cat([s[i].ssm for s in states]))
                for i in range(len(states[0]))]

    def select_states(self, states: list[LayerState], index: list[int]) -> list[LayerState]:
        idx = torch.tensor(index, dtype=torch.long, device=self.model.device)
        return [LayerState(s.conv[idx], s.ssm[idx]) for s in states]
