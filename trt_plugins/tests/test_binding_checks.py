"""The kernel binding refuses, before any pointer reaches C, every tensor argument whose dtype, shape or device does
not fit the others (qmamba/cuda/checks.py): the C ABI only sees pointers and one tensor's sizes, so such an argument
would otherwise be read or written out of bounds. The checks run on CPU tensors too, so these tests need no GPU."""

from __future__ import annotations

import pytest
import torch

from qmamba import cuda as k

I8, U8, F32 = torch.int8, torch.uint8, torch.float32
SCALES = dict(u_scale=0.02, u_outlier_scale=0.2, dt_scale=0.03, B_scale=0.02, C_scale=0.02, z_scale=0.03)


def scan_inputs(b=2, l=5, d=8, n=16):
    def q(*shape):
        return torch.zeros(*shape, dtype=I8)

    return dict(u_q=q(b, l, d), u_mask=torch.zeros(b, l, d, dtype=U8), dt_q=q(b, l, d), B_q=q(b, l, n),
                C_q=q(b, l, n), z_q=q(b, l, d), A=-torch.ones(d, n), D=torch.ones(d), dt_bias=torch.zeros(d))


def refused(words: str):
    return pytest.raises(k.KernelError, match=words)


@pytest.mark.parametrize(("change", "words"), [
    (dict(B_q=torch.zeros(2, 5, 8, dtype=I8)), r"B must have 160 elements, got 80"),
    (dict(A=-torch.ones(9, 16)), r"A must have shape \[8, 16\], got \[9, 16\]"),
    (dict(u_q=torch.zeros(2, 5, 8, dtype=torch.float16)), r"u must be int8, got float16"),
    (dict(dt_q=torch.zeros(2, 5, 7, dtype=I8)), r"dt must have shape \[2, 5, 8\], got \[2, 5, 7\]"),
    (dict(u_mask=torch.zeros(2, 5, 8, 2, dtype=U8)), r"u_mask must have shape \[2, 5, 8\]"),
    (dict(D=torch.ones(8, dtype=torch.float64)), r"D must be float32, got float64"),
    (dict(dt_bias=torch.zeros(4)), r"dt_bias must have shape \[8\]"),
    (dict(initial_state=torch.zeros(2, 8, 8)), r"initial_state must have shape \[2, 8, 16\]"),
    (dict(final_state=torch.zeros(1, 8, 16)), r"final_state must have shape \[2, 8, 16\]"),
    (dict(y_dtype=torch.bfloat16), r"y_dtype must be torch.float32 or torch.float16"),
    (dict(u_outlier_scale=None), r"u_outlier_scale is required \(u_mask is given"),
    (dict(A=-torch.ones(8, 16).to("meta")), r"A is on meta but u is on cpu"),
])
def test_the_scan_refuses_arguments_that_do_not_fit(change, words):
    args = {**scan_inputs(), **SCALES, **change}
    with refused(words):
        k.dual_scale_selective_scan(**args)


def test_the_state_update_wants_every_scale_by_its_name():
    x = scan_inputs(l=1)
    state = torch.zeros(2, 8, 16)
    pos = [x[n] for n in ("u_q", "u_mask", "dt_q", "B_q", "C_q", "z_q", "A", "D", "dt_bias")]
    with refused(r"unknown scale argument\(s\) \['u_scal'\]"):
        k.selective_state_update(state, *pos, **{**SCALES, "u_scal": 0.1})
    with refused("z_scale is required"):
        k.selective_state_update(state, *pos, **{n: v for n, v in SCALES.items() if n != "z_scale"})
    with refused(r"initial_state must be float32, got float16"):
        k.selective_state_update(state.half(), *pos, **SCALES)
    with refused(r"conv_shift's state must have shape \[2, 8, 3\]"):
        k.selective_state_update(state, *pos, conv_shift=(torch.zeros(2, 1, 8, dtype=I8),
                                                          torch.zeros(1, 8, 3, dtype=I8)), **SCALES)
    lr, w, m = torch.zeros(2, 4, dtype=I8), torch.zeros(8, 4, dtype=I8), torch.ones(7)
    with refused(r"dt_proj's multiplier must have shape \[8\]"):
        k.selective_state_update(state, *pos[:2], None, *pos[3:], dt_proj=(lr, w, m), **SCALES)


def test_the_float_scan_refuses_half_inputs():
    x = scan_inputs()
    f = {n: x[n].float() for n in ("u_q", "dt_q", "B_q", "C_q", "z_q")}
    with refused(r"dt must be float32, got float16"):
        k.selective_scan(f["u_q"], f["dt_q"].half(), x["A"], f["B_q"], f["C_q"], x["D"], f["z_q"], x["dt_bias"])


@pytest.mark.parametrize(("change", "words"), [
    (dict(w_q=torch.zeros(9, 4, dtype=I8)), r"w_q must have shape \[8, 4\]"),
    (dict(w_scale=torch.ones(4)), r"w_scale must have shape \[8\]"),
    (dict(bias=torch.ones(8, dtype=torch.float16)), r"bias must be float32"),
    (dict(conv_state=torch.zeros(1, 8, 3, dtype=I8)), r"conv_state must have shape \[2, 8, 3\]"),
    (dict(state_out=torch.zeros(2, 8, 2, dtype=I8)), r"state_out must have shape \[2, 8, 3\]"),
    (dict(x_q=torch.zeros(2, 5, 8, dtype=torch.float16)), r"x_q must be int8, got float16"),
    (dict(x_q=torch.zeros(5, 8, dtype=I8)), r"x_q must be a non-empty tensor of rank 3"),
])
def test_the_conv_refuses_arguments_that_do_not_fit(change, words):
    args = dict(x_q=torch.zeros(2, 5, 8, dtype=I8), w_q=torch.zeros(8, 4, dtype=I8), w_scale=torch.ones(8),
                bias=torch.zeros(8), in_scale=0.1, out_scale=0.1)
    with refused(words):
        k.quant_causal_conv1d(**{**args, **change})


def test_norm_hadamard_logits_and_embedding_refuse_what_does_not_fit():
    with refused(r"x must be float32, got float16"):
        k.rms_norm_quant(torch.zeros(2, 8, dtype=torch.float16), torch.ones(8), 1e-5, 0.1)
    with refused(r"weight must have shape \[8\]"):
        k.rms_norm_quant(torch.zeros(2, 8), torch.ones(6), 1e-5, 0.1)
    with refused(r"y must be float32 or float16, got bfloat16"):
        k.hadamard_quant(torch.zeros(2, 16, dtype=torch.bfloat16), 0.1)
    with refused(r"e_q must have shape \[10, 16\], got \[10, 8\]"):
        k.tied_logits(torch.zeros(1, 16), torch.zeros(10, 8, dtype=I8), torch.ones(10))
    with refused(r"e_scale must have shape \[10\]"):
        k.tied_logits(torch.zeros(1, 16), torch.zeros(10, 16, dtype=I8), torch.ones(9))
    with refused(r"norm's weight must have shape \[16\]"):
        k.tied_logits(torch.zeros(1, 16), torch.zeros(10, 16, dtype=I8), torch.ones(10), norm=(torch.ones(8), 1e-5))
    with refused(r"e_scale must have shape \[10\]"):
        k.embedding_lookup(torch.zeros(3, dtype=torch.int64), torch.zeros(10, 16, dtype=I8), torch.ones(4))


@pytest.mark.parametrize(("change", "words"), [
    (dict(w_q=torch.zeros(12, 8, dtype=I8)), r"w_q must have shape \[12, 16\]"),
    (dict(m_in=torch.ones(11)), r"m_in must have shape \[12\]"),
    (dict(segments=[(6, 0.1), (5, None)]), r"segment widths \[6, 5\] must be positive and add up to w_q's 12 rows"),
    (dict(segments=[(3, 0.1)] * 4), r"segments must list 1 to 3"),
    (dict(acc_in=torch.zeros(2, 11, dtype=torch.int32)), r"acc_in must have 24 elements"),
    (dict(x_mask=torch.zeros(2, 8, dtype=U8)), r"x_mask must have shape \[2, 16\]"),
    (dict(segments=[(12, None)], residual=torch.zeros(2, 11)), r"residual must have 24 elements"),
    (dict(segments=[(6, 0.1), (6, None)], residual=torch.zeros(2, 12)), r"residual takes one float segment"),
    (dict(x_q=None), r"x_q is required without norm, conv or hadamard"),
    (dict(norm=(torch.zeros(2, 16), torch.ones(16), 1e-5, 0.1)), r"alternatives"),
    (dict(clear=torch.zeros(4)), r"clear must be an int32 tensor"),
])
def test_the_linear_refuses_arguments_that_do_not_fit(change, words):
    args = dict(x_q=torch.zeros(2, 16, dtype=I8), w_q=torch.zeros(12, 16, dtype=I8), m_in=torch.ones(12),
                segments=[(6, 0.1), (6, None)])
    with refused(words):
        k.int8_linear(**{**args, **change})


def test_the_fused_update_refuses_a_residual_of_another_size():
    x = scan_inputs(b=1, l=1)
    pos = [x[n] for n in ("u_q", "u_mask", "B_q", "C_q", "z_q", "A", "D", "dt_bias")]
    dt_proj = (torch.zeros(1, 4, dtype=I8), torch.zeros(8, 4, dtype=I8), torch.ones(8))
    out_proj = (torch.zeros(6, 8, dtype=I8), torch.ones(6), 0.1)
    with refused(r"residual must have 6 elements, got 5"):
        k.update_out_proj(torch.zeros(1, 8, 16), *pos, dt_proj=dt_proj, out_proj=out_proj, residual=torch.zeros(5),
                          **SCALES)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: a CPU tensor beside CUDA ones needs a GPU")
def test_a_cpu_tensor_among_cuda_tensors_is_named():
    args = {n: v.cuda() for n, v in scan_inputs().items()}
    args["D"] = args["D"].cpu()
    with refused(r"D is on cpu but u is on cuda:0"):
        k.dual_scale_selective_scan(**args, **SCALES)
