"""Arithmetic primitives of the quantization spec (docs/quantization.md, section "Arithmetic").

Every value that feeds a quantizer must be computed identically by PyTorch, ONNX Runtime and
CUDA. Two rules make that possible without a shared math library:

* transcendentals (exp, log1p, sigmoid) are evaluated in float64 and rounded once to float32;
* reductions (sums over channels or states) are accumulated in float64 and rounded once.

A float64 result is within 1 ulp(f64) of the exact value, so its rounding to float32 is the correctly
rounded result unless the exact value lies within ~2^-29 relative of a float32 rounding boundary;
implementations therefore agree on all but ~1e-9 of elements (spec section "Exactness").
Elementwise float32 +, -, *, / are IEEE round-to-nearest and are never contracted into FMAs.
"""

from __future__ import annotations

import torch

QMIN = -128
QMAX = 127
SPEC_VERSION = "1.1"


def divisor(scale: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """scale as a float32 tensor on like's device, for dividing by it: with a CPU scalar divisor PyTorch's CUDA
    division multiplies by the divisor's reciprocal instead (up to 1 ulp off the IEEE quotient, so a code can flip),
    where its CPU division divides. A number is filled on that device rather than copied from the host (no copy per
    call, and a copy is not allowed inside CUDA-graph capture); a tensor of scales is moved there."""
    if isinstance(scale, torch.Tensor):
        return scale.to(device=like.device, dtype=torch.float32)
    return torch.full((), float(scale), dtype=torch.float32, device=like.device)


def quantize(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """q = clamp(round_half_even(x / s), -128, 127) as int8; x / s is an IEEE float32 division."""
    q = torch.round(x.float() / divisor(scale, x))
    return q.clamp_(QMIN, QMAX).to(torch.int8)


def dequantize(q: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """x = float32(q) * s, one float32 multiply."""
    return q.float() * torch.as_tensor(scale, dtype=torch.float32)


def fake_quant(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """dequantize(quantize(x)) as one float32 tensor: the simulated path's representation."""
    s = divisor(scale, x)
    return torch.round(x.float() / s).clamp_(QMIN, QMAX) * s


def codes_of(x_fq: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Recover the integer codes of a fake-quant tensor, as float32.

    Exact: fl(q*s) = q*s*(1+e), |e| <= 2^-24, so fl(fl(q*s)/s) is within 127*2^-23 of q and rounds to q.
    """
    return torch.round(x_fq / divisor(scale, x_fq))


def scale_product(a: float | torch.Tensor, b: float | torch.Tensor) -> torch.Tensor:
    """float32(a * b) computed in float64 from float32 operands (the requantization multiplier)."""
    a64 = torch.as_tensor(a, dtype=torch.float32).double()
    b64 = torch.as_tensor(b, dtype=torch.float32).double()
    return (a64 * b64).float()


def exp_r(x: torch.Tensor) -> torch.Tensor:
    """float32(exp(x)) evaluated in float64."""
    return torch.exp(x.double()).float()


def silu_r(x: torch.Tensor) -> torch.Tensor:
    """float32(x * sigmoid(x)) evaluated in float64 as x / (1 + exp(-x))."""
    x64 = x.double()
    return (x64 / (1.0 + torch.exp(-x64))).float()


def softplus_r(x: torch.Tensor) -> torch.Tensor:
    """float32(log1p(exp(x))) in float64; x > 20 returns x (as torch and mamba do).

    log1p(e) is written with log only (w = 1 + e; log(w) * e / (w - 1), or e when w == 1, accurate
    to a few float64 ulps), so runtimes without a log1p (ONNX) compute the same float64 operations.
    """
    x64 = x.double()
    e = torch.exp(x64)
    w = 1.0 + e
    lp = torch.where(w == 1.0, e, torch.log(w) * e / (w - 1.0))
    return torch.where(x64 > 20.0, x64, lp).float()


def sum_r(x: torch.Tensor, dim: int) -> torch.Tensor:
    """float32 of the float64 sum of float32 terms."""
    return x.double().sum(dim).float()


def sqrt_r(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded float32 square root: float32(sqrt(float64(x)))."""
    return torch.sqrt(x.double()).float()


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Spec RMSNorm in float32: r = 1 / sqrt(sum_r(x*x)/D + eps); out = (x * r) * w.

    sqrt is the correctly rounded float32 square root, computed as float32(sqrt64(v)) (exact: double
    rounding is innocuous for sqrt). torch's CPU float32 sqrt is not correctly rounded for ~15% of inputs.
    """
    x = x.float()
    d = x.shape[-1]
    ms = sum_r(x * x, -1) / divisor(d, x)
    r = 1.0 / sqrt_r(ms + x.new_full((), eps))
    return (x * r.unsqueeze(-1)) * weight.float()


def a_from_a_log(a_log: torch.Tensor) -> torch.Tensor:
    """A = -float32(exp(A_log)) in float64."""
    return -exp_r(a_log)
