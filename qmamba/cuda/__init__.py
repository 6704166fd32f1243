"""ctypes binding of libqmamba_kernels.so (trt_plugins/kernels, C ABI in qmamba_kernels.h).

Functions mirror qmamba/ops/ref.py and take CUDA torch tensors; a non-OK status becomes KernelError
with the library's message. `load_library()` finds the .so (argument, then build/trt_plugins/) or
builds it with trt_plugins/kernels/build.sh when nvcc is available.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LIB = ROOT / "build" / "trt_plugins" / "libqmamba_kernels.so"

INT8, FLOAT32, FLOAT16 = 2, 0, 1  # qm_dtype
_lib: ctypes.CDLL | None = None


class KernelError(RuntimeError):
    """A kernel call returned an error status; the message is the library's."""


class ScanArgs(ctypes.Structure):
    _fields_ = [
        ("input_dtype", ctypes.c_int),
        ("u", ctypes.c_void_p), ("u_mask", ctypes.c_void_p), ("dt", ctypes.c_void_p), ("B", ctypes.c_void_p),
        ("C", ctypes.c_void_p), ("z", ctypes.c_void_p), ("A", ctypes.c_void_p), ("Dskip", ctypes.c_void_p),
        ("dt_bias", ctypes.c_void_p), ("initial_state", ctypes.c_void_p), ("y", ctypes.c_void_p),
        ("y_dtype", ctypes.c_int), ("final_state", ctypes.c_void_p),
        ("batch", ctypes.c_int), ("seqlen", ctypes.c_int), ("dim", ctypes.c_int), ("dstate", ctypes.c_int),
        ("dual_scale", ctypes.c_int),
        ("u_scale", ctypes.c_float), ("u_outlier_scale", ctypes.c_float), ("dt_scale", ctypes.c_float),
        ("B_scale", ctypes.c_float), ("C_scale", ctypes.c_float), ("z_scale", ctypes.c_float),
        ("workspace", ctypes.c_void_p), ("workspace_bytes", ctypes.c_size_t),
        ("dt_lowrank", ctypes.c_void_p), ("dt_w", ctypes.c_void_p), ("dt_m", ctypes.c_void_p),
        ("dt_rank", ctypes.c_int), ("early_state", ctypes.c_int),
        ("conv_state", ctypes.c_void_p), ("conv_x", ctypes.c_void_p), ("conv_kernel_size", ctypes.c_int),
        ("xp_acc", ctypes.c_void_p), ("xp_m_in", ctypes.c_void_p), ("xp_m_out", ctypes.c_void_p),
        ("xp_n", ctypes.c_int), ("dt_lowrank_scale", ctypes.c_float), ("channel_major", ctypes.c_int),
    ]


ABI_VERSION = 9  # qm_abi_version() of the library this binding is written for


class LinearArgs(ctypes.Structure):
    _fields_ = [
        ("x", ctypes.c_void_p), ("x_mask", ctypes.c_void_p), ("w", ctypes.c_void_p), ("acc_in", ctypes.c_void_p),
        ("acc_out", ctypes.c_void_p), ("m_in", ctypes.c_void_p), ("m_out", ctypes.c_void_p),
        ("rows", ctypes.c_int), ("k", ctypes.c_int), ("n", ctypes.c_int), ("n_seg", ctypes.c_int),
        ("seg_end", ctypes.c_int * 3), ("seg_scale", ctypes.c_float * 3), ("seg_out", ctypes.c_void_p * 3),
        ("residual", ctypes.c_void_p),
        ("norm_x", ctypes.c_void_p), ("norm_w", ctypes.c_void_p), ("norm_eps", ctypes.c_float),
        ("norm_scale", ctypes.c_float),
        ("conv_x", ctypes.c_void_p), ("conv_w", ctypes.c_void_p), ("conv_w_scale", ctypes.c_void_p),
        ("conv_bias", ctypes.c_void_p), ("conv_state", ctypes.c_void_p), ("conv_u", ctypes.c_void_p),
        ("conv_mask", ctypes.c_void_p), ("conv_in_scale", ctypes.c_float), ("conv_out_scale", ctypes.c_float),
        ("conv_outlier_scale", ctypes.c_float), ("conv_dual_scale", ctypes.c_int), ("conv_early_state", ctypes.c_int),
        ("had_x", ctypes.c_void_p), ("had_scale", ctypes.c_float),
        ("xp_w", ctypes.c_void_p), ("xp_acc", ctypes.c_void_p), ("xp_n", ctypes.c_int),
        ("clear", ctypes.c_void_p), ("clear_n", ctypes.c_int), ("early_residual", ctypes.c_int),
    ]


@dataclasses.dataclass
class FusedConv:
    """The decode conv (one token, kernel size 4) computed inside a GEMV in front of its linear (qm_int8_linear's
    conv_x): x int8 [..., k] with the conv state [B, k, 3] (only read: the state update shifts it, see
    selective_state_update's conv_shift); u (and mask, dual scale) receive the conv's output, which is also the
    GEMV's input. early_state: as in quant_causal_conv1d."""

    x: torch.Tensor
    weight: torch.Tensor  # int8 [k, 4]
    weight_scale: torch.Tensor  # float32 [k]
    bias: torch.Tensor  # float32 [k]
    state: torch.Tensor
    u: torch.Tensor  # int8 like x, written
    mask: torch.Tensor | None  # uint8 like x, written (dual scale)
    in_scale: float
    out_scale: float
    outlier_scale: float | None
    early_state: bool = False


@dataclasses.dataclass
class ConvXProjBehind:
    """The decode conv and x_proj's int32 sums computed behind a one-row GEMV (qm_int8_linear's xp_acc), in_proj at
    decode: the GEMV's segment 0 (int8 codes x, [1, 1, d]) is the conv's input, at that segment's scale. The conv
    state [1, d, 3] is shifted in place; u (and mask, dual scale) receive the conv's output; acc (int32 [xp_n], or
    [2, xp_n] with the outliers' sums, dual scale) must hold zeros and receives x_proj's sums over u
    (xp_w int8 [xp_n, d]). Their reader is selective_state_update(x_proj=...); a later int8_linear(clear=acc) zeroes
    them again. early_state: as in quant_causal_conv1d."""

    weight: torch.Tensor  # int8 [d, 4]
    weight_scale: torch.Tensor  # float32 [d]
    bias: torch.Tensor  # float32 [d]
    state: torch.Tensor  # int8 [1, d, 3], in place
    u: torch.Tensor  # int8 [1, 1, d], written
    mask: torch.Tensor | None  # uint8 [1, 1, d], written (dual scale)
    out_scale: float
    outlier_scale: float | None
    xp_w: torch.Tensor
    acc: torch.Tensor
    early_state: bool = False


def build_library(out_dir: Path = DEFAULT_LIB.parent, arch: str = "-gencode arch=compute_90,code=sm_90") -> Path:
    script = ROOT / "trt_plugins" / "kernels" / "build.sh"
    r = subprocess.run(["bash", str(script), str(out_dir), *arch.split()], capture_output=True, text=True)
    if r.returncode != 0:
        raise KernelError(f"building the kernels failed:\n{r.stderr[-3000:]}")
    return out_dir / "libqmamba_kernels.so"


def load_library(path: str | Path | None = None, build: bool = True) -> ctypes.CDLL:
    global _lib
    if _lib is not None and path is None:
        return _lib
    p = Path(path) if path else DEFAULT_LIB
    if not p.is_file():
        if not build:
            raise KernelError(f"{p} not found: build it with trt_plugins/kernels/build.sh")
        p = build_library(p.parent)
    lib = ctypes.CDLL(str(p))
    lib.qm_last_error.restype = ctypes.c_char_p
    lib.qm_status_string.restype = ctypes.c_char_p
    if lib.qm_abi_version() != ABI_VERSION:
        raise KernelError(f"{p} has C ABI version {lib.qm_abi_version()}, this binding speaks {ABI_VERSION}: "
                          "rebuild it with trt_plugins/kernels/build.sh")
    if path is None:
        _lib = lib
    return lib


@contextlib.contextmanager
def use_library(lib: ctypes.CDLL):
    """Route this module's calls to `lib` (another build of the same C ABI, from load_library(path)) inside the
    block, then back to the library before it: for timing builds against each other in one process."""
    global _lib
    before = _lib
    _lib = lib
    try:
        yield lib
    finally:
        _lib = before


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p | None:
    if t is None:
        return None
    if not t.is_cuda:
        raise KernelError("kernel inputs must be CUDA tensors")
    if not t.is_contiguous():
        raise KernelError("kernel inputs must be contiguous")
    return ctypes.c_void_p(t.data_ptr())


def _stream() -> ctypes.c_void_p:
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


def _check(rc: int) -> None:
    if rc != 0:
        lib = load_library()
        raise KernelError(f"{lib.qm_status_string(rc).decode()}: {lib.qm_last_error().decode()}")


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, scale: float) -> torch.Tensor:
    lib = load_library()
    y = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    d = x.shape[-1]
    _check(lib.qm_rmsnorm_quant(_ptr(x), _ptr(weight), _ptr(y), ctypes.c_int64(x.numel() // d), ctypes.c_int(d),
                                ctypes.c_float(eps), ctypes.c_float(scale), _stream()))
    return y


def quant_causal_conv1d(x_q, w_q, w_scale, bias, in_scale: float, out_scale: float, conv_state=None,
                        outlier_scale: float | None = None, state_out: torch.Tensor | None = None,
                        early_state: bool = False):
    """(u, mask or None, new conv state). state_out may be conv_state (in place). early_state: the caller asserts
    what qmamba_kernels.h's "Early state reads" asks (decode: the state is read before the PDL wait)."""
    lib = load_library()
    b, l, d = x_q.shape
    k = w_q.shape[1]
    u = torch.empty_like(x_q)
    dual = outlier_scale is not None
    mask = torch.empty(x_q.shape, dtype=torch.uint8, device=x_q.device) if dual else None
    new_state = state_out if state_out is not None else torch.empty(b, d, k - 1, dtype=torch.int8,
                                                                    device=x_q.device)
    _check(lib.qm_quant_causal_conv1d(
        _ptr(x_q), _ptr(w_q), _ptr(w_scale), _ptr(bias), _ptr(conv_state), _ptr(u), _ptr(mask), _ptr(new_state),
        b, l, d, k, ctypes.c_float(in_scale), ctypes.c_float(out_scale), ctypes.c_float(outlier_scale or 0.0),
        int(dual), int(early_state), _stream()))
    return u, mask, new_state


def _scan(fn: str, *a, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, final state); final_state None: a new float32 [B, D, N] tensor."""
    args, y, final_state = _scan_args(*a, **kw)
    _check(getattr(load_library(), fn)(ctypes.byref(args), _stream()))
    return y, final_state


def _scan_args(input_dtype: int, u, mask, dt, B, C, z, A, D, dt_bias, initial_state, final_state, y_dtype,
               scales: dict, dt_proj: tuple | None = None, early_state: bool = False,
               conv_shift: tuple | None = None, x_proj: tuple | None = None,
               channel_major: bool = False) -> tuple[ScanArgs, torch.Tensor, torch.Tensor]:
    """qm_scan_args for these tensors, with the y and final-state tensors they point to."""
    bsz, l, d = u.shape
    if channel_major:  # u, dt, z, mask [B, D, L]; B, C, y keep [B, L, .]
        bsz, d, l = u.shape
        for name, t in (("dt", dt), ("z", z), ("u_mask", mask)):
            if t is not None and tuple(t.shape) != (bsz, d, l):
                raise KernelError(f"channel-major scan: {name} must be [B, D, L] = {(bsz, d, l)} like u, got "
                                  f"{tuple(t.shape)}")
    n = A.shape[1]
    if final_state is None:
        final_state = torch.empty(bsz, d, n, dtype=torch.float32, device=u.device)
    y = torch.empty(bsz, l, d, dtype=y_dtype, device=u.device)
    args = ScanArgs(
        input_dtype, _ptr(u), _ptr(mask), _ptr(dt), _ptr(B), _ptr(C), _ptr(z), _ptr(A), _ptr(D), _ptr(dt_bias),
        _ptr(initial_state), _ptr(y), FLOAT16 if y_dtype == torch.float16 else FLOAT32, _ptr(final_state),
        bsz, l, d, n, int(mask is not None), scales.get("u_scale", 1.0), scales.get("u_outlier_scale") or 0.0,
        scales.get("dt_scale", 1.0), scales.get("B_scale", 1.0), scales.get("C_scale", 1.0),
        scales.get("z_scale", 1.0), None, 0)
    if dt_proj is not None:  # (dt_lowrank int8 [B, R], dt_w int8 [D, R], multiplier float32 [D])
        lr, w, m = dt_proj
        args.dt_lowrank, args.dt_w, args.dt_m, args.dt_rank = _ptr(lr), _ptr(w), _ptr(m), w.shape[1]
    args.early_state, args.channel_major = int(early_state), int(channel_major)
    if conv_shift is not None:  # (conv_x int8 [B, 1, D], conv state int8 [B, D, 3], in place)
        cx, cs = conv_shift
        args.conv_x, args.conv_state, args.conv_kernel_size = _ptr(cx), _ptr(cs), cs.shape[-1] + 1
    if x_proj is not None:  # (sums int32 [xp_n] or [2, xp_n], m_in [xp_n], m_out [xp_n] or None, dt_lowrank scale)
        acc, xm_in, xm_out, s_lr = x_proj
        if acc.dtype != torch.int32 or acc.numel() != (1 if xm_out is None else 2) * xm_in.shape[0]:
            raise KernelError(f"selective_state_update: x_proj's sums must be int32 [{xm_in.shape[0]}] (or [2, "
                              f"{xm_in.shape[0]}] with m_out), got {acc.dtype} {tuple(acc.shape)}")
        args.xp_acc, args.xp_m_in, args.xp_m_out = _ptr(acc), _ptr(xm_in), _ptr(xm_out)
        args.xp_n, args.dt_lowrank_scale = xm_in.shape[0], s_lr
    return args, y, final_state


def selective_scan(u, dt, A, B, C, D, z, dt_bias, initial_state=None, y_dtype=torch.float32, final_state=None,
                   channel_major: bool = False):
    """Float-input scan, as ref.selective_scan: (y, final state). final_state may be initial_state (in place).
    channel_major: u, dt, z are [B, D, L] (mamba_ssm's layout); B, C and y stay [B, L, .]."""
    return _scan("qm_selective_scan", FLOAT32, u, None, dt, B, C, z, A, D, dt_bias, initial_state, final_state,
                 y_dtype, {}, channel_major=channel_major)


def dual_scale_selective_scan(u_q, u_mask, dt_q, B_q, C_q, z_q, A, D, dt_bias, *, u_scale, u_outlier_scale,
                              dt_scale, B_scale, C_scale, z_scale, initial_state=None, y_dtype=torch.float32,
                              final_state=None, channel_major: bool = False):
    """int8-input scan, as ref.dual_scale_selective_scan: (y, final state). final_state may be initial_state.
    channel_major: u_q, u_mask, dt_q, z_q are [B, D, L] (mamba_ssm's layout); B_q, C_q and y stay [B, L, .]."""
    scales = dict(u_scale=u_scale, u_outlier_scale=u_outlier_scale, dt_scale=dt_scale, B_scale=B_scale,
                  C_scale=C_scale, z_scale=z_scale)
    return _scan("qm_selective_scan", INT8, u_q, u_mask, dt_q, B_q, C_q, z_q, A, D, dt_bias, initial_state,
                 final_state, y_dtype, scales, channel_major=channel_major)


def selective_state_update(state, u_q, u_mask, dt_q, B_q, C_q, z_q, A, D, dt_bias, *, in_place: bool = False,
                           y_dtype=torch.float32, dt_proj: tuple | None = None, early_state: bool = False,
                           conv_shift: tuple | None = None, x_proj: tuple | None = None, **scales):
    """Decode step (L = 1): (y, new state); in_place=True updates `state` itself. dt_proj = (dt_lowrank int8
    [B, R], dt_w int8 [D, R], multiplier float32 [D]): dt_q is None and the kernel computes the dt codes itself.
    early_state: as in quant_causal_conv1d. conv_shift = (x int8 [B, 1, D], conv state int8 [B, D, 3]): the
    kernel also shifts that conv state in place by the token x (with dt_proj; after a FusedConv GEMV).
    x_proj = (sums int32 [xp_n] (or [2, xp_n]: outliers too, dual scale), m_in float32 [xp_n], m_out or None,
    dt_lowrank_scale), with dt_proj, batch 1: x_proj's epilogue runs here (after a ConvXProjBehind GEMV), and
    dt_proj's dt_lowrank, B_q and C_q are buffers the kernel writes the codes into."""
    return _scan("qm_selective_state_update", INT8, u_q, u_mask, dt_q, B_q, C_q, z_q, A, D, dt_bias, state,
                 state if in_place else torch.empty_like(state), y_dtype, scales, dt_proj, early_state, conv_shift,
                 x_proj)


def hadamard_quant(y: torch.Tensor, scale: float) -> torch.Tensor:
    lib = load_library()
    d = y.shape[-1]
    out = torch.empty(y.shape, dtype=torch.int8, device=y.device)
    dtype = FLOAT16 if y.dtype == torch.float16 else FLOAT32
    _check(lib.qm_hadamard_quant(_ptr(y), dtype, _ptr(out), ctypes.c_int64(y.numel() // d), ctypes.c_int(d),
                                 ctypes.c_float(scale), _stream()))
    return out


def tied_logits(h: torch.Tensor, e_q: torch.Tensor, e_scale: torch.Tensor,
                out: torch.Tensor | None = None, norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """Spec 4.7 logits (qm_tied_logits): h float32 [..., k], e_q int8 [V, k], e_scale float32 [V] -> [..., V]
    (into `out` when given, float32 contiguous). The kernel reads the table once per 4 rows: for decode-sized h.
    norm = (norm_w float32 [k], eps): h is the residual stream and the kernel applies the final RMSNorm first."""
    lib = load_library()
    kdim, n = h.shape[-1], e_q.shape[0]
    h = h.float().contiguous()
    if out is None:
        out = torch.empty(*h.shape[:-1], n, dtype=torch.float32, device=h.device)
    elif out.shape != (*h.shape[:-1], n) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"tied_logits: out must be float32 contiguous {(*h.shape[:-1], n)}, got {out.dtype}"
                         f"{tuple(out.shape)}")
    norm_w, eps = norm if norm is not None else (None, 0.0)
    _check(lib.qm_tied_logits(_ptr(h), _ptr(e_q), _ptr(e_scale), _ptr(out), ctypes.c_int(h.numel() // kdim),
                              ctypes.c_int(kdim), ctypes.c_int(n), _ptr(norm_w), ctypes.c_float(eps), _stream()))
    return out


def embedding_lookup(ids: torch.Tensor, e_q: torch.Tensor, e_scale: torch.Tensor) -> torch.Tensor:
    """Spec 4.7 lookup (qm_embedding_lookup), as ref.embedding_lookup: float32 [*ids.shape, k]. An id out of range
    gives a row of NaN. The kernel is launched without programmatic dependent launch (it opens a decode step)."""
    lib = load_library()
    if ids.dtype != torch.int64:
        raise KernelError(f"embedding_lookup: ids must be int64, got {ids.dtype}")
    ids = ids.contiguous()
    kdim = e_q.shape[1]
    out = torch.empty(*ids.shape, kdim, dtype=torch.float32, device=ids.device)
    _check(lib.qm_embedding_lookup(_ptr(ids), _ptr(e_q), _ptr(e_scale), _ptr(out), ctypes.c_int(ids.numel()),
                                   ctypes.c_int(kdim), ctypes.c_int64(e_q.shape[0]), _stream()))
    return out


GEMV_MAX_ROWS = 4  # qm_int8_linear computes its own accumulators for <= 4 rows (k % 16 == 0)


def _set_conv_fields(args: LinearArgs, c: FusedConv | ConvXProjBehind, in_scale: float) -> None:
    """The conv_* fields of qm_linear_args that a conv in front (FusedConv) and behind (ConvXProjBehind) share."""
    args.conv_w, args.conv_w_scale, args.conv_bias = _ptr(c.weight), _ptr(c.weight_scale), _ptr(c.bias)
    args.conv_state, args.conv_u, args.conv_mask = _ptr(c.state), _ptr(c.u), _ptr(c.mask)
    args.conv_in_scale, args.conv_out_scale = in_scale, c.out_scale
    args.conv_outlier_scale = c.outlier_scale or 0.0
    args.conv_dual_scale, args.conv_early_state = int(c.outlier_scale is not None), int(c.early_state)


def int8_linear(x_q: torch.Tensor | None, w_q: torch.Tensor, m_in: torch.Tensor,
                segments: list[tuple[int, float | None]], x_mask: torch.Tensor | None = None,
                m_out: torch.Tensor | None = None, acc_in: torch.Tensor | None = None,
                acc_out: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                norm: tuple[torch.Tensor, torch.Tensor, float, float] | None = None,
                conv: FusedConv | None = None,
                hadamard: tuple[torch.Tensor, float] | None = None, behind: ConvXProjBehind | None = None,
                clear: torch.Tensor | None = None, early_residual: bool = False) -> list[torch.Tensor]:
    """W8A8 linear epilogue (qm_int8_linear): per segment (width, scale) an int8 tensor Q(y, scale), or float32 y
    for scale None (plus `residual` for a single float segment). Without acc_in the accumulators come from the
    GEMV (rows <= GEMV_MAX_ROWS); x_q [..., k], w_q [n, k]. norm = (r, norm_w, eps, scale): x_q is None and the
    GEMV computes x = RMSNormQuant(r) itself (r float32 [..., k]). conv: x_q and x_mask are None and the GEMV
    computes x (and its mask) as that conv's output itself. hadamard = (y float32 [1, k], scale): x_q is None and the
    GEMV computes x = HadamardQuant(y, scale) itself (one row). behind: the decode conv and x_proj's sums computed
    behind the GEMV on segment 0 (one row). clear: an int32 tensor the GEMV zeroes after its dependency wait.
    early_residual (GEMV, one row, residual): the residual is read before the dependency wait; the caller asserts
    that the kernel right before this one does not write it (qm_linear_args.early_residual)."""
    args, outs = _linear_args(x_q, w_q, m_in, segments, x_mask, m_out, acc_in, acc_out, residual, norm, conv,
                              hadamard, behind, clear, early_residual)
    _check(load_library().qm_int8_linear(ctypes.byref(args), _stream()))
    return outs


def _linear_args(x_q, w_q, m_in, segments, x_mask, m_out, acc_in, acc_out, residual, norm, conv, hadamard, behind,
                 clear, early_residual) -> tuple[LinearArgs, list[torch.Tensor]]:
    """qm_linear_args for int8_linear's arguments, with the output tensors they point to."""
    src = norm[0] if norm is not None else conv.x if conv is not None else hadamard[0] if hadamard else x_q
    lead, kdim, n = src.shape[:-1], src.shape[-1], w_q.shape[0]
    rows = src.numel() // kdim
    outs, ends, scales, c = [], [], [], 0
    for width, scale in segments:
        c += width
        ends.append(c)
        scales.append(scale or 0.0)
        if residual is not None:
            outs.append(residual)
        else:
            outs.append(torch.empty(*lead, width, dtype=torch.int8 if scale else torch.float32, device=src.device))
    nx, nw, neps, nscale = norm if norm is not None else (None, None, 0.0, 0.0)
    args = LinearArgs(_ptr(x_q), _ptr(x_mask), _ptr(w_q), _ptr(acc_in), _ptr(acc_out), _ptr(m_in), _ptr(m_out),
                      rows, kdim, n, len(segments), (ctypes.c_int * 3)(*ends, *[0] * (3 - len(ends))),
                      (ctypes.c_float * 3)(*scales, *[0.0] * (3 - len(scales))),
                      (ctypes.c_void_p * 3)(*[o.data_ptr() for o in outs], *[None] * (3 - len(outs))),
                      _ptr(residual), _ptr(nx), _ptr(nw), neps, nscale)
    if conv is not None:
        args.conv_x = _ptr(conv.x)
        _set_conv_fields(args, conv, conv.in_scale)
    if hadamard is not None:
        args.had_x, args.had_scale = _ptr(hadamard[0]), hadamard[1]
    if behind is not None:
        b = behind
        want = (2 if b.outlier_scale is not None else 1) * b.xp_w.shape[0]
        if b.acc.dtype != torch.int32 or b.acc.numel() != want:
            raise KernelError(f"int8_linear: behind.acc must be int32 with {want} sums (x_proj's outputs, twice with "
                              f"outliers), got {b.acc.dtype} {tuple(b.acc.shape)}")
        _set_conv_fields(args, b, scales[0])
        args.xp_w, args.xp_acc, args.xp_n = _ptr(b.xp_w), _ptr(b.acc), b.xp_w.shape[0]
    if clear is not None:
        if clear.dtype != torch.int32:
            raise KernelError(f"int8_linear: clear must be an int32 tensor, got {clear.dtype}")
        args.clear, args.clear_n = _ptr(clear), clear.numel()
    args.early_residual = int(early_residual)
    return args, outs


def update_out_proj(state, u_q, u_mask, B_q, C_q, z_q, A, D, dt_bias, *, dt_proj: tuple, out_proj: tuple,
                    residual: torch.Tensor, conv_shift: tuple | None = None, x_proj: tuple | None = None,
                    clear: torch.Tensor | None = None, early_residual: bool = False, **scales) -> torch.Tensor:
    """qm_update_out_proj: selective_state_update(..., in_place=True, dt_proj, early_state=True, conv_shift,
    x_proj) followed by int8_linear(None, w_q, m_in, [(n, None)], residual=residual, hadamard=(y, had_scale),
    clear, early_residual), one sequence, in one kernel (a cluster of 16 blocks; sm_90+). out_proj = (w_q int8
    [n, d_inner], m_in float32 [n], had_scale). The state and the residual are updated in place; returns the
    residual."""
    w_q, m_in, had_scale = out_proj
    sargs, y, _ = _scan_args(INT8, u_q, u_mask, None, B_q, C_q, z_q, A, D, dt_bias, state, state, torch.float32,
                             scales, dt_proj, True, conv_shift, x_proj)
    largs, outs = _linear_args(None, w_q, m_in, [(w_q.shape[0], None)], None, None, None, None, residual, None,
                               None, (y, had_scale), None, clear, early_residual)
    _check(load_library().qm_update_out_proj(ctypes.byref(sargs), ctypes.byref(largs), _stream()))
    return outs[0]
