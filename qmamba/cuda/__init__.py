"""ctypes binding of libqmamba_kernels.so (trt_plugins/kernels, C ABI in qmamba_kernels.h).

Functions mirror qmamba/ops/ref.py and take CUDA torch tensors; every tensor argument is checked (dtype, shape,
one device: qmamba/cuda/checks.py) before a pointer reaches C, and a non-OK status becomes KernelError with the
library's message. Kernels run on the tensors' device, on its current stream. `load_library()` finds the .so
(argument, then build/trt_plugins/) or builds it with trt_plugins/kernels/build.sh when nvcc is available.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import numbers
import subprocess
from pathlib import Path

import torch

from qmamba.cuda.checks import Args, KernelError

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LIB = ROOT / "build" / "trt_plugins" / "libqmamba_kernels.so"

INT8, FLOAT32, FLOAT16 = 2, 0, 1  # qm_dtype
_lib: ctypes.CDLL | None = None


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


def _stream(device: torch.device | None = None) -> ctypes.c_void_p:
    return ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)


def _call(a: Args, fn, *args) -> None:
    """fn(*args, stream) on the call's device (the C side sizes grids for the current device) and its stream."""
    if a.device is None or a.device.type != "cuda":
        raise KernelError(f"{a.fn}: kernel inputs must be CUDA tensors, got {a.device}")
    with torch.cuda.device(a.device):
        _check(fn(*args, _stream(a.device)))


def _check(rc: int) -> None:
    if rc != 0:
        lib = load_library()
        raise KernelError(f"{lib.qm_status_string(rc).decode()}: {lib.qm_last_error().decode()}")


F32, I8, U8, I32 = torch.float32, torch.int8, torch.uint8, torch.int32


def _last_dim(a: Args, name: str, t: torch.Tensor | None) -> int:
    if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[-1] == 0:
        raise a.fail(f"{name} must be a tensor [..., d] with d > 0, got {getattr(t, 'shape', t)!r}")
    return t.shape[-1]


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, scale: float) -> torch.Tensor:
    a = Args("rms_norm_quant")
    d = _last_dim(a, "x", x)
    a("x", x, F32)
    a("weight", weight, F32, (d,))
    y = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    lib = load_library()
    _call(a, lib.qm_rmsnorm_quant, _ptr(x), _ptr(weight), _ptr(y), ctypes.c_int64(x.numel() // d), ctypes.c_int(d),
          ctypes.c_float(eps), ctypes.c_float(scale))
    return y


def quant_causal_conv1d(x_q, w_q, w_scale, bias, in_scale: float, out_scale: float, conv_state=None,
                        outlier_scale: float | None = None, state_out: torch.Tensor | None = None,
                        early_state: bool = False):
    """(u, mask or None, new conv state). state_out may be conv_state (in place). early_state: the caller asserts
    what qmamba_kernels.h's "Early state reads" asks (decode: the state is read before the PDL wait)."""
    a = Args("quant_causal_conv1d")
    b, l, d = a.rank("x_q", x_q, 3)
    a("x_q", x_q, I8)
    k = a.rank("w_q", w_q, 2)[1]
    a("w_q", w_q, I8, (d, k))
    a("w_scale", w_scale, F32, (d,))
    a("bias", bias, F32, (d,))
    a("conv_state", conv_state, I8, (b, d, k - 1), optional=True)
    a("state_out", state_out, I8, (b, d, k - 1), optional=True)
    u = torch.empty_like(x_q)
    dual = outlier_scale is not None
    mask = torch.empty(x_q.shape, dtype=torch.uint8, device=x_q.device) if dual else None
    new_state = state_out if state_out is not None else torch.empty(b, d, k - 1, dtype=torch.int8,
                                                                    device=x_q.device)
    lib = load_library()
    _call(a, lib.qm_quant_causal_conv1d,
          _ptr(x_q), _ptr(w_q), _ptr(w_scale), _ptr(bias), _ptr(conv_state), _ptr(u), _ptr(mask), _ptr(new_state),
          b, l, d, k, ctypes.c_float(in_scale), ctypes.c_float(out_scale), ctypes.c_float(outlier_scale or 0.0),
          int(dual), int(early_state))
    return u, mask, new_state


def _scan(fn: str, *a, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, final state); final_state None: a new float32 [B, D, N] tensor."""
    checked, args, y, final_state = _scan_args(fn.removeprefix("qm_"), *a, **kw)
    _call(checked, getattr(load_library(), fn), ctypes.byref(args))
    return y, final_state


SCALE_NAMES = ("u_scale", "u_outlier_scale", "dt_scale", "B_scale", "C_scale", "z_scale")


def _scales(a: Args, scales: dict, dual: bool) -> list[float]:
    """The int8 scan's six scales: every one given (u_outlier_scale may be None without a mask), no other name."""
    unknown = sorted(set(scales) - set(SCALE_NAMES))
    if unknown:
        raise a.fail(f"unknown scale argument(s) {unknown}; the scales are {list(SCALE_NAMES)}")
    out = []
    for name in SCALE_NAMES:
        v = scales.get(name)
        if name == "u_outlier_scale" and not dual:
            out.append(0.0 if v is None else a.number(name, v))
        elif v is None:
            raise a.fail(f"{name} is required" + (" (u_mask is given: dual scale)" if name == "u_outlier_scale"
                                                  else ""))
        else:
            out.append(a.number(name, v))
    return out


def _scan_args(fn: str, input_dtype: int, u, mask, dt, B, C, z, A, D, dt_bias, initial_state, final_state, y_dtype,
               scales: dict, dt_proj: tuple | None = None, early_state: bool = False,
               conv_shift: tuple | None = None, x_proj: tuple | None = None,
               channel_major: bool = False, a: Args | None = None) -> tuple[Args, ScanArgs, torch.Tensor, torch.Tensor]:
    """The checked arguments and qm_scan_args for these tensors, with the y and final-state tensors they point to.
    `a`: the checks of a larger call (update_out_proj), so that all its tensors share one device."""
    a = a or Args(fn)
    shape = a.rank("u", u, 3)
    bsz, l, d = shape
    if channel_major:  # u, dt, z, mask [B, D, L]; B, C, y keep [B, L, .]
        bsz, d, l = shape
        for name, t in (("dt", dt), ("z", z), ("u_mask", mask)):
            if t is not None and tuple(t.shape) != (bsz, d, l):
                raise KernelError(f"channel-major scan: {name} must be [B, D, L] = {(bsz, d, l)} like u, got "
                                  f"{tuple(t.shape)}")
    n = a.rank("A", A, 2)[1]
    dtype = I8 if input_dtype == INT8 else F32
    a("u", u, dtype)
    a("u_mask", mask, U8, shape, optional=True)
    a("dt", dt, dtype, shape, optional=dt_proj is not None)
    a("B", B, dtype, numel=bsz * l * n)
    a("C", C, dtype, numel=bsz * l * n)
    a("z", z, dtype, shape, optional=True)
    a("A", A, F32, (d, n))
    a("D", D, F32, (d,), optional=True)
    a("dt_bias", dt_bias, F32, (d,), optional=True)
    a("initial_state", initial_state, F32, (bsz, d, n), optional=True)
    a("final_state", final_state, F32, (bsz, d, n), optional=True)
    if y_dtype not in (torch.float32, torch.float16):
        raise a.fail(f"y_dtype must be torch.float32 or torch.float16, got {y_dtype}")
    sc = _scales(a, scales, mask is not None) if input_dtype == INT8 else [0.0] * 6
    rank = 0
    if dt_proj is not None:  # (dt_lowrank int8 [B, R], dt_w int8 [D, R], multiplier float32 [D])
        lr, w, m = dt_proj
        rank = a.rank("dt_proj's dt_w", w, 2)[1]
        a("dt_proj's dt_w", w, I8, (d, rank))
        a("dt_proj's dt_lowrank", lr, I8, numel=bsz * rank)
        a("dt_proj's multiplier", m, F32, (d,))
    if conv_shift is not None:  # (conv_x int8 [B, 1, D], conv state int8 [B, D, 3], in place)
        cx, cs = conv_shift
        a("conv_shift's x", cx, I8, numel=bsz * d)
        a("conv_shift's state", cs, I8, (bsz, d, 3))
    if x_proj is not None:  # (sums int32 [xp_n] or [2, xp_n], m_in [xp_n], m_out [xp_n] or None, dt_lowrank scale)
        acc, xm_in, xm_out, s_lr = x_proj
        xp_n = a.rank("x_proj's m_in", xm_in, 1)[0]
        if not isinstance(acc, torch.Tensor) or acc.dtype != torch.int32 or \
                acc.numel() != (1 if xm_out is None else 2) * xp_n:
            raise KernelError(f"selective_state_update: x_proj's sums must be int32 [{xp_n}] (or [2, {xp_n}] with "
                              f"m_out), got {getattr(acc, 'dtype', acc)} {tuple(getattr(acc, 'shape', ()))}")
        a("x_proj's sums", acc, I32)
        a("x_proj's m_in", xm_in, F32, (xp_n,))
        a("x_proj's m_out", xm_out, F32, (xp_n,), optional=True)
        s_lr = a.number("x_proj's dt_lowrank scale", s_lr)
    # every argument checked: from here on pointers are taken
    if final_state is None:
        final_state = torch.empty(bsz, d, n, dtype=torch.float32, device=u.device)
    y = torch.empty(bsz, l, d, dtype=y_dtype, device=u.device)
    args = ScanArgs(
        input_dtype, _ptr(u), _ptr(mask), _ptr(dt), _ptr(B), _ptr(C), _ptr(z), _ptr(A), _ptr(D), _ptr(dt_bias),
        _ptr(initial_state), _ptr(y), FLOAT16 if y_dtype == torch.float16 else FLOAT32, _ptr(final_state),
        bsz, l, d, n, int(mask is not None), *sc, None, 0)
    if dt_proj is not None:
        args.dt_lowrank, args.dt_w, args.dt_m, args.dt_rank = _ptr(lr), _ptr(w), _ptr(m), rank
    args.early_state, args.channel_major = int(early_state), int(channel_major)
    if conv_shift is not None:
        args.conv_x, args.conv_state, args.conv_kernel_size = _ptr(cx), _ptr(cs), cs.shape[-1] + 1
    if x_proj is not None:
        args.xp_acc, args.xp_m_in, args.xp_m_out = _ptr(acc), _ptr(xm_in), _ptr(xm_out)
        args.xp_n, args.dt_lowrank_scale = xp_n, s_lr
    return a, args, y, final_state


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
    """Decode step (L = 1): (y, new state); in_place=True updates `state` itself. The scales are keywords, all six
    required (u_outlier_scale may be None without a mask). dt_proj = (dt_lowrank int8 [B, R], dt_w int8 [D, R],
    multiplier float32 [D]): dt_q is None and the kernel computes the dt codes itself.
    early_state: as in quant_causal_conv1d. conv_shift = (x int8 [B, 1, D], conv state int8 [B, D, 3]): the
    kernel also shifts that conv state in place by the token x (with dt_proj; after a FusedConv GEMV).
    x_proj = (sums int32 [xp_n] (or [2, xp_n]: outliers too, dual scale), m_in float32 [xp_n], m_out or None,
    dt_lowrank_scale), with dt_proj, batch 1: x_proj's epilogue runs here (after a ConvXProjBehind GEMV), and
    dt_proj's dt_lowrank, B_q and C_q are buffers the kernel writes the codes into."""
    out = state if in_place or not isinstance(state, torch.Tensor) else torch.empty_like(state)
    return _scan("qm_selective_state_update", INT8, u_q, u_mask, dt_q, B_q, C_q, z_q, A, D, dt_bias, state, out,
                 y_dtype, scales, dt_proj, early_state, conv_shift, x_proj)


def hadamard_quant(y: torch.Tensor, scale: float) -> torch.Tensor:
    a = Args("hadamard_quant")
    d = _last_dim(a, "y", y)
    a("y", y, (torch.float32, torch.float16))
    out = torch.empty(y.shape, dtype=torch.int8, device=y.device)
    dtype = FLOAT16 if y.dtype == torch.float16 else FLOAT32
    _call(a, load_library().qm_hadamard_quant, _ptr(y), dtype, _ptr(out), ctypes.c_int64(y.numel() // d),
          ctypes.c_int(d), ctypes.c_float(scale))
    return out


def tied_logits(h: torch.Tensor, e_q: torch.Tensor, e_scale: torch.Tensor,
                out: torch.Tensor | None = None, norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """Spec 4.7 logits (qm_tied_logits): h float32 [..., k], e_q int8 [V, k], e_scale float32 [V] -> [..., V]
    (into `out` when given, float32 contiguous). The kernel reads the table once per 4 rows: for decode-sized h.
    norm = (norm_w float32 [k], eps): h is the residual stream and the kernel applies the final RMSNorm first."""
    a = Args("tied_logits")
    kdim = _last_dim(a, "h", h)
    h = h.float().contiguous()
    a("h", h, F32)
    n = a.rank("e_q", e_q, 2)[0]
    a("e_q", e_q, I8, (n, kdim))
    a("e_scale", e_scale, F32, (n,))
    if out is None:
        out = torch.empty(*h.shape[:-1], n, dtype=torch.float32, device=h.device)
    elif out.shape != (*h.shape[:-1], n) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"tied_logits: out must be float32 contiguous {(*h.shape[:-1], n)}, got {out.dtype}"
                         f"{tuple(out.shape)}")
    a("out", out, F32)
    norm_w, eps = norm if norm is not None else (None, 0.0)
    a("norm's weight", norm_w, F32, (kdim,), optional=True)
    _call(a, load_library().qm_tied_logits, _ptr(h), _ptr(e_q), _ptr(e_scale), _ptr(out),
          ctypes.c_int(h.numel() // kdim), ctypes.c_int(kdim), ctypes.c_int(n), _ptr(norm_w), ctypes.c_float(eps))
    return out


def embedding_lookup(ids: torch.Tensor, e_q: torch.Tensor, e_scale: torch.Tensor) -> torch.Tensor:
    """Spec 4.7 lookup (qm_embedding_lookup), as ref.embedding_lookup: float32 [*ids.shape, k]. An id out of range
    gives a row of NaN. The kernel is launched without programmatic dependent launch (it opens a decode step)."""
    a = Args("embedding_lookup")
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
        raise KernelError(f"embedding_lookup: ids must be int64, got {getattr(ids, 'dtype', type(ids).__name__)}")
    ids = ids.contiguous()
    a("ids", ids, torch.int64)
    vocab, kdim = a.rank("e_q", e_q, 2)
    a("e_q", e_q, I8)
    a("e_scale", e_scale, F32, (vocab,))
    out = torch.empty(*ids.shape, kdim, dtype=torch.float32, device=ids.device)
    _call(a, load_library().qm_embedding_lookup, _ptr(ids), _ptr(e_q), _ptr(e_scale), _ptr(out),
          ctypes.c_int(ids.numel()), ctypes.c_int(kdim), ctypes.c_int64(vocab))
    return out


GEMV_MAX_ROWS = 4  # qm_int8_linear computes its own accumulators for <= 4 rows (k % 16 == 0)


def _set_conv_fields(args: LinearArgs, c: FusedConv | ConvXProjBehind, in_scale: float) -> None:
    """The conv_* fields of qm_linear_args that a conv in front (FusedConv) and behind (ConvXProjBehind) share."""
    args.conv_w, args.conv_w_scale, args.conv_bias = _ptr(c.weight), _ptr(c.weight_scale), _ptr(c.bias)
    args.conv_state, args.conv_u, args.conv_mask = _ptr(c.state), _ptr(c.u), _ptr(c.mask)
    args.conv_in_scale, args.conv_out_scale = in_scale, c.out_scale
    args.conv_outlier_scale = c.outlier_scale or 0.0
    args.conv_dual_scale, args.conv_early_state = int(c.outlier_scale is not None), int(c.early_state)


def _check_conv(a: Args, what: str, c: FusedConv | ConvXProjBehind, d: int, tokens: int, batch: int) -> None:
    """A decode conv's tensors for d channels: `tokens` outputs (u, mask), a [batch, d, 3] state."""
    a(f"{what}.weight", c.weight, I8, (d, 4))
    a(f"{what}.weight_scale", c.weight_scale, F32, (d,))
    a(f"{what}.bias", c.bias, F32, (d,))
    a(f"{what}.state", c.state, I8, (batch, d, 3))
    a(f"{what}.u", c.u, I8, numel=tokens * d)
    a(f"{what}.mask", c.mask, U8, numel=tokens * d, optional=c.outlier_scale is None)


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
    a, args, outs = _linear_args("int8_linear", x_q, w_q, m_in, segments, x_mask, m_out, acc_in, acc_out, residual,
                                 norm, conv, hadamard, behind, clear, early_residual)
    _call(a, load_library().qm_int8_linear, ctypes.byref(args))
    return outs


def _linear_args(fn, x_q, w_q, m_in, segments, x_mask, m_out, acc_in, acc_out, residual, norm, conv, hadamard,
                 behind, clear, early_residual, a: Args | None = None) -> tuple[Args, LinearArgs, list[torch.Tensor]]:
    """The checked arguments and qm_linear_args for int8_linear's arguments, with the output tensors they point
    to. `a`: the checks of a call this GEMV is part of (update_out_proj), so all its tensors share one device."""
    a = a or Args(fn)
    given = [name for name, v in (("norm", norm), ("conv", conv), ("hadamard", hadamard)) if v is not None]
    if len(given) > 1 or (given and x_q is not None):
        got = given + (["x_q"] if x_q is not None else [])
        raise a.fail(f"x_q, norm, conv and hadamard are alternatives (the GEMV's input); got {got}")
    if not given and x_q is None:
        raise a.fail("x_q is required without norm, conv or hadamard")
    src_name, src = (("norm's r", norm[0]) if norm is not None else ("conv.x", conv.x) if conv is not None
                     else ("hadamard's y", hadamard[0]) if hadamard is not None else ("x_q", x_q))
    kdim = _last_dim(a, src_name, src)
    lead, rows = src.shape[:-1], src.numel() // kdim
    a(src_name, src, F32 if norm is not None or hadamard is not None else I8)
    n = a.rank("w_q", w_q, 2)[0]
    a("w_q", w_q, I8, (n, kdim))
    a("m_in", m_in, F32, (n,))
    a("m_out", m_out, F32, (n,), optional=True)
    a("x_mask", x_mask, U8, tuple(src.shape), optional=True)
    a("acc_in", acc_in, I32, numel=rows * n, optional=True)
    a("acc_out", acc_out, I32, numel=rows * n, optional=True)
    if not 1 <= len(segments) <= 3:
        raise a.fail(f"segments must list 1 to 3 (width, scale) pairs, got {len(segments)}")
    widths = [w for w, _ in segments]
    if any(not isinstance(w, numbers.Integral) or w < 1 for w in widths) or sum(widths) != n:
        raise a.fail(f"segment widths {widths} must be positive and add up to w_q's {n} rows")
    if norm is not None:
        a("norm's weight", norm[1], F32, (kdim,))
    if conv is not None:
        _check_conv(a, "conv", conv, kdim, rows, conv.state.shape[0] if isinstance(conv.state, torch.Tensor) else 0)
    if residual is not None:
        if len(segments) != 1 or segments[0][1] is not None:
            raise a.fail("residual takes one float segment (scale None)")
        a("residual", residual, F32, numel=rows * n)
    if behind is not None:
        b = behind
        d0 = widths[0]
        xp_n = a.rank("behind.xp_w", b.xp_w, 2)[0]
        want = (2 if b.outlier_scale is not None else 1) * xp_n
        if not isinstance(b.acc, torch.Tensor) or b.acc.dtype != torch.int32 or b.acc.numel() != want:
            raise KernelError(f"int8_linear: behind.acc must be int32 with {want} sums (x_proj's outputs, twice with "
                              f"outliers), got {getattr(b.acc, 'dtype', b.acc)} {tuple(getattr(b.acc, 'shape', ()))}")
        if d0 % 16 == 0:  # else the C side refuses segment 0's width itself (width % 16 == 0) before any read
            _check_conv(a, "behind", b, d0, 1, 1)
            a("behind.xp_w", b.xp_w, I8, (xp_n, d0))
        a("behind.acc", b.acc, I32)
    if clear is not None:
        if not isinstance(clear, torch.Tensor) or clear.dtype != torch.int32:
            raise KernelError(f"int8_linear: clear must be an int32 tensor, got {getattr(clear, 'dtype', clear)}")
        a("clear", clear, I32)
    # every argument checked: from here on pointers are taken
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
        _set_conv_fields(args, behind, scales[0])
        args.xp_w, args.xp_acc, args.xp_n = _ptr(behind.xp_w), _ptr(behind.acc), xp_n
    if clear is not None:
        args.clear, args.clear_n = _ptr(clear), clear.numel()
    args.early_residual = int(early_residual)
    return a, args, outs


def update_out_proj(state, u_q, u_mask, B_q, C_q, z_q, A, D, dt_bias, *, dt_proj: tuple, out_proj: tuple,
                    residual: torch.Tensor, conv_shift: tuple | None = None, x_proj: tuple | None = None,
                    clear: torch.Tensor | None = None, early_residual: bool = False, **scales) -> torch.Tensor:
    """qm_update_out_proj: selective_state_update(..., in_place=True, dt_proj, early_state=True, conv_shift,
    x_proj) followed by int8_linear(None, w_q, m_in, [(n, None)], residual=residual, hadamard=(y, had_scale),
    clear, early_residual), one sequence, in one kernel (a cluster of 16 blocks; sm_90+). out_proj = (w_q int8
    [n, d_inner], m_in float32 [n], had_scale). The state and the residual are updated in place; returns the
    residual."""
    w_q, m_in, had_scale = out_proj
    a = Args("update_out_proj")
    if isinstance(u_q, torch.Tensor) and u_q.dim() == 3 and u_q.shape[:2] != (1, 1):
        raise a.fail(f"the update must be one token of one sequence (got batch={u_q.shape[0]} "
                     f"seqlen={u_q.shape[1]})")
    n = a.rank("out_proj's w_q", w_q, 2)[0]
    a("out_proj's w_q", w_q, I8)
    a("residual", residual, F32, numel=n)  # one sequence: one row of n
    a("out_proj's m_in", m_in, F32, (n,))
    a, sargs, y, _ = _scan_args("update_out_proj", INT8, u_q, u_mask, None, B_q, C_q, z_q, A, D, dt_bias, state,
                                state, torch.float32, scales, dt_proj, True, conv_shift, x_proj, a=a)
    _, largs, outs = _linear_args("update_out_proj", None, w_q, m_in, [(n, None)], None, None, None, None,
                                  residual, None, None, (y, had_scale), None, clear, early_residual, a)
    _call(a, load_library().qm_update_out_proj, ctypes.byref(sargs), ctypes.byref(largs))
    return outs[0]
