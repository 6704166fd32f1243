"""Unit tests of the quantization spec's primitives (docs/quantization.md)."""

from __future__ import annotations

import pytest
import torch

from qmamba.ops import ref
from qmamba.ops.hadamard import factor, hadamard_m, hadamard_matrix, hadamard_transform
from qmamba.ops.specmath import codes_of, fake_quant, quantize, scale_product
from qmamba.quant.calibrate import _quant_weight, outlier_fraction, scale_from


def test_rounding_ties_go_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 126.5])
    assert quantize(x, 1.0).tolist() == [0, 2, 2, 0, -2, -2, 0, 126]


def test_clamp_edges():
    x = torch.tensor([127.4, 127.5, 128.0, 1e9, -128.4, -128.5, -128.6, -1e9])
    # 127.5 rounds to 128 (even) and clamps to 127; -128.5 rounds to -128 (even); -128.6 clamps
    assert quantize(x, 1.0).tolist() == [127, 127, 127, 127, -128, -128, -128, -128]


def test_quantize_uses_division_not_reciprocal():
    # 0.3 / 0.1 = 2.9999998 in float32 division -> 3; a reciprocal multiply gives a different float
    x, s = torch.tensor([0.3], dtype=torch.float32), 0.1
    div = torch.round(x / torch.tensor(s))
    assert quantize(x, s).item() == int(div.item())


def test_reference_sqrt_and_division_are_correctly_rounded():
    import numpy as np

    from qmamba.ops.specmath import sqrt_r

    x = torch.rand(1_000_000, generator=torch.Generator().manual_seed(5)) * 10 + 1e-3
    assert torch.equal(sqrt_r(x), torch.from_numpy(np.sqrt(x.numpy())))  # numpy's sqrtf is IEEE
    s = torch.tensor(0.0370001)
    assert torch.equal(x / s, torch.from_numpy(x.numpy() / np.float32(0.0370001)))


def test_code_recovery_is_exact_for_every_code_and_many_scales():
    q = torch.arange(-128, 128, dtype=torch.float32)
    for s in torch.rand(200, generator=torch.Generator().manual_seed(0)) * 10 + 1e-6:
        assert torch.equal(codes_of(q * s, s), q)


def test_fake_quant_equals_dequantized_codes():
    x = torch.randn(1000) * 3
    s = 0.037
    assert torch.equal(fake_quant(x, s), quantize(x, s).float() * torch.tensor(s))


def test_requant_multiplier_is_float64_product_rounded_once():
    a, b = torch.tensor(0.1234567), torch.tensor([3.3333333, 7e-5])
    assert torch.equal(scale_product(a, b), (a.double() * b.double()).float())


def test_dual_scale_mask_flags_exactly_the_planted_outliers():
    g = torch.Generator().manual_seed(0)
    u = (torch.rand(10000, generator=g) * 2 - 1) * 0.9  # inliers within +-0.9
    idx = torch.randperm(10000, generator=g)[:37]
    u[idx] = torch.tensor([5.0, -7.0] * 18 + [3.0])
    s_in, s_out = 1.0 / 127, 7.0 / 127
    q, mask = ref.quantize_dual(u, s_in, s_out)
    assert set(mask.nonzero().flatten().tolist()) == set(idx.tolist())
    deq = ref.dequantize_dual(q, mask, s_in, s_out)
    assert (deq - u).abs()[mask.bool()].max() <= s_out / 2 + 1e-6
    assert (deq - u).abs()[~mask.bool()].max() <= s_in / 2 + 1e-6
    assert outlier_fraction(u, s_in) == pytest.approx(37 / 10000)


def test_dual_scale_boundary_is_the_int8_range():
    s_in, s_out = 1.0, 4.0
    u = torch.tensor([127.4, 127.5, -128.5, -128.6])  # 127.5 -> 128 outlier; -128.5 -> -128 inlier
    q, mask = ref.quantize_dual(u, s_in, s_out)
    assert mask.tolist() == [0, 1, 0, 1]
    assert q.tolist() == [127, 32, -128, -32]


def test_per_channel_vs_per_tensor_weights():
    w = torch.tensor([[1.0, -0.5], [100.0, 20.0]])
    pc = _quant_weight(w, "per_channel")
    pt = _quant_weight(w, "per_tensor")
    assert pc.weight_scale.tolist() == pytest.approx([1 / 127, 100 / 127])
    assert pt.weight_scale.tolist() == pytest.approx([100 / 127, 100 / 127])
    assert pc.weight_q.tolist() == [[127, -64], [127, 25]]  # -63.5 -> -64 (even)
    assert pt.weight_q.tolist() == [[1, -1], [127, 25]]  # 1.27 -> 1, -0.635 -> -1
    assert (pc.dequantized() - w)[0].abs().max() < (pt.dequantized() - w)[0].abs().max()  # small row


def test_zero_statistic_gives_unit_scale():
    assert scale_from(0.0) == 1.0
    assert scale_from(127.0) == 1.0


@pytest.mark.parametrize("d", [16, 64, 192, 384, 768, 1536, 4096, 5120, 28 * 8])
def test_hadamard_is_the_normalized_kronecker_transform(d):
    m, p = factor(d)
    assert m * p == d and p & (p - 1) == 0
    y = torch.randn(5, d, generator=torch.Generator().manual_seed(d))
    got = hadamard_transform(y)
    want = (y.double() @ hadamard_matrix(d).T).float()
    assert ((got - want).norm() / want.norm()).item() < 1e-6
    h = hadamard_matrix(d)
    assert torch.allclose(h @ h.T, torch.eye(d, dtype=torch.float64), atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the reference on a GPU is tested on the H100")
@pytest.mark.parametrize("d", [1536, 5120, 3584, 4096])
def test_hadamard_reference_runs_on_the_inputs_device(d):
    # m > 1 (1536 = 12 x 128, 5120 = 20 x 256, 3584 = 28 x 128) mixes with H_m, which is built on the CPU: the
    # PyTorch model on a GPU (qmamba serve --device cuda) needs it on y's device
    y = torch.randn(3, 7, d, generator=torch.Generator().manual_seed(d)) * 2
    got = hadamard_transform(y.cuda())
    assert got.device.type == "cuda"
    assert torch.allclose(got.cpu(), hadamard_transform(y), rtol=1e-6, atol=1e-6)
    assert torch.equal(ref.hadamard_quant(y.cuda(), 0.01).cpu(), ref.hadamard_quant(y, 0.01))


def _near_ties(scale: float) -> torch.Tensor:
    """float32 values within 4 ulps of (k + 0.5) * scale for every code k: where x / s (IEEE) and x * fl(1 / s) can
    round to different codes."""
    x = (torch.arange(-128, 128, dtype=torch.float32) + 0.5) * torch.tensor(scale, dtype=torch.float32)
    out, up, down = [x], x, x
    for _ in range(4):
        up, down = torch.nextafter(up, up + 1), torch.nextafter(down, down - 1)
        out += [up, down]
    return torch.cat(out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the reference on a GPU is tested on the H100")
@pytest.mark.parametrize("s", [0.01, 0.03])
def test_quantizers_divide_on_a_gpu_as_on_the_cpu(s):
    # spec: x / s is an IEEE float32 division; PyTorch's CUDA division by a CPU scalar multiplies by fl(1 / s)
    x = _near_ties(s)
    st = torch.tensor(s, dtype=torch.float32)
    assert (torch.round(x / st) != torch.round(x * (1 / st))).any()  # these values tell the two apart
    xc = x.cuda()
    assert torch.equal(quantize(xc, s).cpu(), quantize(x, s))
    assert torch.equal(fake_quant(xc, s).cpu(), fake_quant(x, s))
    assert torch.equal(codes_of(xc, s).cpu(), codes_of(x, s))
    for got, want in zip(ref.quantize_dual(xc, s, 8 * s), ref.quantize_dual(x, s, 8 * s), strict=True):
        assert torch.equal(got.cpu(), want)


def _ref_op_cases() -> dict:
    """Each reference op with inputs (CPU) and the tolerance of its outputs across devices: 0 (the same values)
    for integer outputs and the spec's exact float results; the float tolerance where the spec allows any
    summation order (the scan's y and state, tied logits)."""
    g = torch.Generator().manual_seed(11)
    i8 = lambda *shape: torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)  # noqa: E731
    b, l, d, n, k, c = 2, 33, 96, 16, 64, 48
    mask = (torch.rand(b, l, k, generator=g) < 0.05).to(torch.uint8)
    ws = torch.rand(c, generator=g) * 0.01 + 1e-3
    scan = (i8(b, l, d), (torch.rand(b, l, d, generator=g) < 0.01).to(torch.uint8), i8(b, l, d), i8(b, l, n),
            i8(b, l, n), i8(b, l, d), -torch.rand(d, n, generator=g) - 0.1, torch.randn(d, generator=g),
            torch.rand(d, generator=g) * -4 - 2)
    scan_scales = dict(u_scale=0.02, u_outlier_scale=0.3, dt_scale=0.03, B_scale=0.01, C_scale=0.01, z_scale=0.02)
    e_q, e_s = i8(50, k), torch.rand(50, generator=g) * 0.01
    return {
        "rms_norm_quant": (ref.rms_norm_quant, (torch.randn(b, l, k, generator=g), torch.rand(k, generator=g) + 0.5,
                                                1e-5, 0.03), {}, 0.0),
        "quant_linear int8 out": (ref.quant_linear, (i8(b, l, k), i8(c, k), 0.02, ws, 0.05), {}, 0.0),
        "quant_linear float out": (ref.quant_linear, (i8(b, l, k), i8(c, k), 0.02, ws), {}, 0.0),
        "quant_linear dual-scale in": (ref.quant_linear, (i8(b, l, k), i8(c, k), 0.02, ws, 0.05, mask, 0.4), {}, 0.0),
        "quant_causal_conv1d": (ref.quant_causal_conv1d, (i8(b, l, k), i8(k, 4), torch.rand(k, generator=g) * 0.01,
                                                          torch.randn(k, generator=g), 0.03, 0.01, i8(b, k, 3), 0.05),
                                {}, 0.0),
        "dual_scale_selective_scan": (ref.dual_scale_selective_scan, scan,
                                      dict(scan_scales, initial_state=torch.randn(b, d, n, generator=g)), 1e-6),
        "hadamard_quant": (ref.hadamard_quant, (torch.randn(b, l, 1536, generator=g), 0.01), {}, 0.0),
        "embedding_lookup": (ref.embedding_lookup, (torch.randint(0, 50, (b, l), generator=g), e_q, e_s), {}, 0.0),
        "tied_logits": (ref.tied_logits, (torch.randn(b, l, k, generator=g), e_q, e_s), {}, 1e-5),
    }


def _outputs(r) -> list[torch.Tensor]:
    return [t for t in (r if isinstance(r, tuple) else (r,)) if t is not None]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the reference on a GPU is tested on the H100")
@pytest.mark.parametrize("op", list(_ref_op_cases()))
def test_reference_ops_give_the_cpu_results_on_a_gpu(op):
    fn, args, kwargs, tol = _ref_op_cases()[op]
    on = lambda v: v.cuda() if isinstance(v, torch.Tensor) else v  # noqa: E731
    want = _outputs(fn(*args, **kwargs))
    got = _outputs(fn(*(on(a) for a in args), **{key: on(v) for key, v in kwargs.items()}))
    assert len(got) == len(want)
    for g_, w in zip(got, want, strict=True):
        assert g_.device.type == "cuda" and g_.dtype == w.dtype and g_.shape == w.shape
        if tol == 0.0:
            assert torch.equal(g_.cpu(), w)
        else:
            assert ((g_.cpu().double() - w.double()).norm() / w.double().norm()).item() <= tol


def test_hadamard_rejects_unsupported_sizes():
    with pytest.raises(ValueError, match="no Hadamard transform"):
        factor(3 * 7)
    for m in (12, 20, 28):
        hm = hadamard_m(m)
        assert torch.equal(hm @ hm.T, m * torch.eye(m, dtype=torch.int64))


def test_quant_linear_matches_dequantized_math():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-128, 128, (3, 5, 40), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (24, 40), dtype=torch.int8, generator=g)
    sx, sw = 0.02, torch.rand(24, generator=g) * 0.01 + 1e-3
    y = ref.quant_linear(x, w, sx, sw)
    want = (x.double() * sx) @ (w.double() * sw[:, None].double()).T
    assert torch.allclose(y.double(), want, rtol=1e-6, atol=1e-6)


def test_dual_scale_linear_splits_accumulators():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-128, 128, (2, 7, 32), dtype=torch.int8, generator=g)
    mask = (torch.rand(2, 7, 32, generator=g) < 0.1).to(torch.uint8)
    w = torch.randint(-128, 128, (8, 32), dtype=torch.int8, generator=g)
    sw = torch.rand(8, generator=g) * 0.01
    y = ref.quant_linear(x, w, 0.01, sw, None, mask, 0.05)
    xd = ref.dequantize_dual(x, mask, 0.01, 0.05).double()
    assert torch.allclose(y.double(), xd @ (w.double() * sw[:, None].double()).T, rtol=1e-6, atol=1e-6)


def test_conv_and_scan_chunks_continue_exactly():
    g = torch.Generator().manual_seed(3)
    b, l, d, n, k = 2, 11, 24, 4, 4
    x = torch.randint(-128, 128, (b, l, d), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (d, k), dtype=torch.int8, generator=g)
    ws, bias = torch.rand(d, generator=g) * 0.01, torch.randn(d, generator=g)
    whole = ref.quant_causal_conv1d(x, w, ws, bias, 0.05, 0.02, None, 0.1)
    a = ref.quant_causal_conv1d(x[:, :6], w, ws, bias, 0.05, 0.02, None, 0.1)
    c = ref.quant_causal_conv1d(x[:, 6:], w, ws, bias, 0.05, 0.02, a[2], 0.1)
    assert torch.equal(torch.cat([a[0], c[0]], 1), whole[0])
    assert torch.equal(torch.cat([a[1], c[1]], 1), whole[1])
    assert torch.equal(c[2], whole[2])
    f = [torch.randn(b, l, d, generator=g), torch.randn(b, l, d, generator=g), -torch.rand(d, n, generator=g),
         torch.randn(b, l, n, generator=g), torch.randn(b, l, n, generator=g), torch.randn(d, generator=g),
         torch.randn(b, l, d, generator=g), torch.randn(d, generator=g)]
    y, h = ref.selective_scan(*f)
    y1, h1 = ref.selective_scan(*[t[:, :4] if t.dim() == 3 else t for t in f])
    y2, h2 = ref.selective_scan(*[t[:, 4:] if t.dim() == 3 else t for t in f], initial_state=h1)
    assert torch.equal(torch.cat([y1, y2], 1), y) and torch.equal(h2, h)


def test_scan_matches_a_float64_recurrence():
    g = torch.Generator().manual_seed(4)
    b, l, d, n = 2, 9, 8, 4
    u, dt, z = (torch.randn(b, l, d, generator=g) for _ in range(3))
    A, B, C = -torch.rand(d, n, generator=g), torch.randn(b, l, n, generator=g), torch.randn(b, l, n, generator=g)
    D, dtb = torch.randn(d, generator=g), torch.randn(d, generator=g)
    y, _ = ref.selective_scan(u, dt, A, B, C, D, z, dtb)
    delta = torch.nn.functional.softplus((dt + dtb).double())
    h = torch.zeros(b, d, n, dtype=torch.float64)
    ys = []
    for t in range(l):
        h = torch.exp(delta[:, t, :, None] * A.double()) * h + (delta[:, t] * u[:, t].double())[..., None] * \
            B[:, t, None, :].double()
        ys.append((h * C[:, t, None, :].double()).sum(-1) + D.double() * u[:, t].double())
    want = torch.stack(ys, 1) * torch.nn.functional.silu(z.double())
    assert ((y.double() - want).norm() / want.norm()).item() < 1e-6


def test_rmsnorm_quant_reference():
    x = torch.randn(3, 4, 64) * 5
    w = torch.rand(64) + 0.5
    q = ref.rms_norm_quant(x, w, 1e-5, 0.03)
    want = x.double() / torch.sqrt((x.double() ** 2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert (q.double() * 0.03 - want.clamp(-128 * 0.03, 127 * 0.03)).abs().max() <= 0.03 / 2 + 1e-6
