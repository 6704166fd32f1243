"""Reference implementations of the qmamba ops, written from docs/quantization.md.

These are the oracles: the ONNX function bodies, the CUDA kernels and the TensorRT plugins are all
tested against them. Layout is token-major everywhere: activations are [B, L, C].

Ops (names match the ONNX op types in docs/onnx_ops.md):

* rms_norm_quant          RMSNormQuant            float32 [B,L,D] -> int8 [B,L,D]
* quant_linear            (QDQ MatMul in ONNX)    int8 [..,K] x int8 [C,K] -> int8 or float32 [..,C]
* quant_causal_conv1d     QuantCausalConv1d       int8 [B,L,D] -> int8 u (+ uint8 mask), int8 conv state
* selective_scan          DualScaleSelectiveScan  float32 inputs -> y [B,L,D], state [B,D,N]
* dual_scale_selective_scan                       int8 inputs dequantized per spec, then selective_scan
* selective_state_update  SelectiveStateUpdate    one token: the scan with L = 1
* hadamard_quant          HadamardQuant           float32 [..,D] -> int8 [..,D]
* embedding_lookup        (Gather + Mul in ONNX)  int8 table [V,d] + float32 row scales -> float32 [B,L,d]
* tied_logits             (MatMul + Mul in ONNX)  float32 [B,L,d] x int8 table [V,d] -> float32 [B,L,V]
"""

from __future__ import annotations

import torch

from qmamba.ops.hadamard import hadamard_transform
from qmamba.ops.specmath import (
    QMAX,
    QMIN,
    dequantize,
    divisor,
    exp_r,
    quantize,
    rmsnorm,
    scale_product,
    silu_r,
    softplus_r,
    sum_r,
)


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, scale: float) -> torch.Tensor:
    """int8 codes of the spec RMSNorm of x (the in_proj input)."""
    return quantize(rmsnorm(x, weight, eps), scale)


def embedding_lookup(ids: torch.Tensor, e_q: torch.Tensor, e_scale: torch.Tensor) -> torch.Tensor:
    """Spec 4.7: row id of the int8 embedding, dequantized with that row's scale: fl(E_q[id] * s_E[id])."""
    return e_q[ids].float() * e_scale[ids].unsqueeze(-1)


def tied_logits(h: torch.Tensor, e_q: torch.Tensor, e_scale: torch.Tensor) -> torch.Tensor:
    """Spec 4.7: logits[v] = fl(fl(sum_k h[k] * E_q[v, k]) * s_E[v]), float32 accumulation in any order
    (a float output that feeds no quantizer: implementations agree within the float tolerance)."""
    return torch.nn.functional.linear(h, e_q.float()) * e_scale


def int_matmul(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Exact int32 accumulator sum_k x[..,k] * w[c,k]."""
    lead = x_q.shape[:-1]
    x2 = x_q.reshape(-1, x_q.shape[-1])
    if x2.is_cuda:  # no integer matmul on CUDA: float64 is exact here (every partial sum is an integer < 2^53)
        acc = (x2.double() @ w_q.double().T).to(torch.int32)
    else:
        acc = x2.to(torch.int32) @ w_q.to(torch.int32).T
    return acc.reshape(*lead, w_q.shape[0])


def requant_multiplier(in_scale: float | torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """m[c] = float32(s_in * s_w[c]) (computed in float64): the per-channel dequantization multiplier."""
    return scale_product(in_scale, w_scale)


def quant_linear(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    in_scale: float,
    w_scale: torch.Tensor,
    out_scale: float | None = None,
    x_mask: torch.Tensor | None = None,
    outlier_scale: float | None = None,
) -> torch.Tensor:
    """W8A8 linear. y = float32(float32(acc) * m[c]); int8 output = quantize(y, out_scale) when given.

    With a dual-scale input (x_mask, outlier_scale) the inliers and outliers accumulate separately:
    y = float32(float32(acc_in) * m_in[c]) + float32(float32(acc_out) * m_out[c]).
    """
    if x_mask is None:
        y = int_matmul(x_q, w_q).float() * requant_multiplier(in_scale, w_scale)
    else:
        m = x_mask.bool()
        zero = torch.zeros((), dtype=torch.int8)
        acc_in = int_matmul(torch.where(m, zero, x_q), w_q)
        acc_out = int_matmul(torch.where(m, x_q, zero), w_q)
        y = acc_in.float() * requant_multiplier(in_scale, w_scale)
        y = y + acc_out.float() * requant_multiplier(outlier_scale, w_scale)
    return y if out_scale is None else quantize(y, out_scale)


def quantize_dual(
    u: torch.Tensor, inlier_scale: float, outlier_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual-scale quantization: (int8 codes, uint8 mask). Outlier where round(u/s_in) is outside int8."""
    q_in = torch.round(u.float() / divisor(inlier_scale, u))
    mask = (q_in < QMIN) | (q_in > QMAX)
    q = torch.where(mask, torch.round(u.float() / divisor(outlier_scale, u)), q_in)
    return q.clamp_(QMIN, QMAX).to(torch.int8), mask.to(torch.uint8)


def dequantize_dual(
    q: torch.Tensor, mask: torch.Tensor | None, inlier_scale: float, outlier_scale: float | None
) -> torch.Tensor:
    """u = float32(q) * (mask ? s_out : s_in)."""
    if mask is None:
        return dequantize(q, inlier_scale)
    s = torch.where(
        mask.bool(),
        torch.tensor(outlier_scale, dtype=torch.float32),
        torch.tensor(inlier_scale, dtype=torch.float32),
    )
    return q.float() * s


def causal_conv1d_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, conv_state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float depthwise causal conv + bias + SiLU (spec order). x [B,L,D], weight [D,K], state [B,D,K-1].

    v[t] = sum_r(x[t-K+1+k] * w[k] for k in 0..K-1) + bias; out = silu_r(v). Returns (out, new_state).
    """
    bsz, seqlen, d = x.shape
    k = weight.shape[1]
    if conv_state is None:
        conv_state = torch.zeros(bsz, d, k - 1, dtype=x.dtype, device=x.device)
    xt = torch.cat([conv_state.to(x.dtype).transpose(1, 2), x], dim=1)  # [B, K-1+L, D]
    windows = xt.unfold(1, k, 1)  # [B, L, D, K]
    v = sum_r(windows.float() * weight.float(), -1) + bias.float()
    new_state = xt[:, seqlen:, :].transpose(1, 2).contiguous()
    return silu_r(v), new_state


def quant_causal_conv1d(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor,
    in_scale: float,
    out_scale: float,
    conv_state: torch.Tensor | None = None,
    outlier_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """int8 causal depthwise conv + bias + SiLU + requantization.

    acc[t,d] = sum_k x[t-K+1+k,d] * w[d,k] (int32, exact; the state supplies the K-1 earlier tokens)
    v = float32(float32(acc) * m[d]) + bias[d];  u = silu_r(v)
    single-scale: (quantize(u, out_scale), None); dual-scale: quantize_dual(u, out_scale, outlier_scale).
    Returns (u codes, mask or None, new int8 conv state [B, D, K-1] = the last K-1 input tokens).
    """
    bsz, seqlen, d = x_q.shape
    k = w_q.shape[1]
    if conv_state is None:
        conv_state = torch.zeros(bsz, d, k - 1, dtype=torch.int8, device=x_q.device)
    xt = torch.cat([conv_state.transpose(1, 2), x_q], dim=1).to(torch.int32)
    acc = (xt.unfold(1, k, 1) * w_q.to(torch.int32)).sum(-1)  # [B, L, D]
    v = acc.float() * requant_multiplier(in_scale, w_scale) + bias.float()
    u = silu_r(v)
    new_state = xt[:, seqlen:, :].transpose(1, 2).to(torch.int8).contiguous()
    if outlier_scale is None:
        return quantize(u, out_scale), None, new_state
    q, mask = quantize_dual(u, out_scale, outlier_scale)
    return q, mask, new_state


def selective_scan(
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 selective scan in the spec's operation order.

    u, dt, z: [B,L,D]; B, C: [B,L,N]; A: [D,N] (negative); D, dt_bias: [D]; state [B,D,N] float32.
    delta = softplus_r(dt + dt_bias)
    for t: h = exp_r(delta_t*A) * h + (delta_t*u_t) * B_t;  y_t = sum_r(h * C_t) + D*u_t;
           y_t = y_t * silu_r(z_t)
    Returns (y [B,L,D] float32, final state [B,D,N] float32).
    """
    bsz, seqlen, d = u.shape
    n = A.shape[1]
    u, dt, B, C = u.float(), dt.float(), B.float(), C.float()
    A, D = A.float(), D.float()
    delta = softplus_r(dt + dt_bias.float())
    du = delta * u
    h = (
        torch.zeros(bsz, d, n, dtype=torch.float32, device=u.device)
        if initial_state is None
        else initial_state.float().clone()
    )
    ys = []
    for t in range(seqlen):
        da = exp_r(delta[:, t, :, None] * A)
        h = da * h + du[:, t, :, None] * B[:, t, None, :]
        ys.append(sum_r(h * C[:, t, None, :], -1))
    y = torch.stack(ys, dim=1) + D * u
    if z is not None:
        y = y * silu_r(z.float())
    return y, h


def dual_scale_selective_scan(
    u_q: torch.Tensor,
    u_mask: torch.Tensor | None,
    dt_q: torch.Tensor,
    B_q: torch.Tensor,
    C_q: torch.Tensor,
    z_q: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    *,
    u_scale: float,
    u_outlier_scale: float | None,
    dt_scale: float,
    B_scale: float,
    C_scale: float,
    z_scale: float,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 scan: dequantize every input per spec, then selective_scan."""
    u = dequantize_dual(u_q, u_mask, u_scale, u_outlier_scale)
    return selective_scan(
        u,
        dequantize(dt_q, dt_scale),
        A,
        dequantize(B_q, B_scale),
        dequantize(C_q, C_scale),
        D,
        dequantize(z_q, z_scale),
        dt_bias,
        initial_state,
    )


def selective_state_update(
    state: torch.Tensor, u_q, u_mask, dt_q, B_q, C_q, z_q, A, D, dt_bias, **scales
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode form: one token ([B,1,.] inputs). Identical by definition to the scan with L = 1."""
    return dual_scale_selective_scan(
        u_q, u_mask, dt_q, B_q, C_q, z_q, A, D, dt_bias, initial_state=state, **scales
    )


def hadamard_quant(y: torch.Tensor, scale: float) -> torch.Tensor:
    """int8 codes of the spec Hadamard transform of y over its last dim."""
    return quantize(hadamard_transform(y.float()), scale)


__all__ = [
    "causal_conv1d_silu",
    "dequantize_dual",
    "dual_scale_selective_scan",
    "exp_r",
    "hadamard_quant",
    "quant_causal_conv1d",
    "quant_linear",
    "quantize_dual",
    "requant_multiplier",
    "rms_norm_quant",
    "selective_scan",
    "selective_state_update",
]
