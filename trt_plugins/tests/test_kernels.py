"""CUDA kernels against the PyTorch reference (qmamba/ops/ref.py).

GPU tests are marked `gpu` and skip with a reason without a CUDA device. Every check draws fresh random
inputs (planted outliers for dual-scale) and poisons the outputs first; integer outputs must be
bit-identical to the reference, float outputs within 1e-5 relative L2.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from qmamba.ops import ref
from qmamba.ops.hadamard import inv_sqrt
from qmamba.ops.specmath import a_from_a_log, dequantize

ROOT = Path(__file__).resolve().parents[2]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: kernel tests run on the H100")


@pytest.mark.parametrize("archs", [(90,), (80, 86, 89)])  # Hopper (the default), Ampere and Ada
def test_kernels_compile_with_nvcc(tmp_path, archs):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found: kernel compilation not tested")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    r = subprocess.run(["bash", str(ROOT / "trt_plugins/kernels/build.sh"), str(tmp_path), *flags],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    nm = subprocess.run(["nm", "-D", "--defined-only", str(tmp_path / "libqmamba_kernels.so")], capture_output=True,
                        text=True).stdout
    for sym in ("qm_rmsnorm_quant", "qm_quant_causal_conv1d", "qm_selective_scan", "qm_selective_state_update",
                "qm_hadamard_quant", "qm_update_out_proj", "qm_last_error", "qm_abi_version"):
        assert f" T {sym}" in nm


def test_cmake_configures_and_says_why_plugins_are_skipped(tmp_path):
    if shutil.which("cmake") is None or shutil.which("nvcc") is None:
        pytest.skip("cmake or nvcc not found: CMake project not tested")
    r = subprocess.run(["cmake", "-S", str(ROOT / "trt_plugins"), "-B", str(tmp_path), "-DCMAKE_CUDA_ARCHITECTURES=90",
                        f"-DCMAKE_CUDA_COMPILER={shutil.which('nvcc')}", "-DTensorRT_ROOT=/nonexistent"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "the plugin library is SKIPPED" in r.stdout


@pytest.fixture(scope="module")
def k():
    from qmamba import cuda as qcuda

    qcuda.load_library()
    return qcuda


def _g(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def _poison(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(0x5A if t.dtype in (torch.int8, torch.uint8) else float("nan"))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("tokens", "d"), [(1, 768), (3 * 2049, 768), (97, 1536), (5, 5120)])
def test_rmsnorm_quant_bit_exact(k, tokens, d):
    x = torch.randn(tokens, d, device="cuda", generator=_g(tokens)) * 3
    w = torch.rand(d, device="cuda", generator=_g(d)) + 0.5
    got = k.rms_norm_quant(x, w, 1e-5, 0.02)
    want = ref.rms_norm_quant(x.cpu(), w.cpu(), 1e-5, 0.02)
    assert torch.equal(got.cpu(), want)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("l", [1, 2, 7, 2049])
@pytest.mark.parametrize("dual", [False, True])
def test_conv_bit_exact_with_state(k, b, l, dual):
    d, kk = 1536, 4
    g = _g(b * 10000 + l)
    x = torch.randint(-128, 128, (b, l, d), dtype=torch.int8, device="cuda", generator=g)
    w = torch.randint(-128, 128, (d, kk), dtype=torch.int8, device="cuda", generator=g)
    ws = torch.rand(d, device="cuda", generator=g) * 0.01 + 1e-4
    bias = torch.randn(d, device="cuda", generator=g)
    st = torch.randint(-128, 128, (b, d, kk - 1), dtype=torch.int8, device="cuda", generator=g)
    s_out = 0.05 if dual else None  # s_in 0.01: many outliers planted by the scale ratio
    u, mask, new = k.quant_causal_conv1d(x, w, ws, bias, 0.03, 0.01, st, s_out,
                                         state_out=_poison(torch.empty(b, d, kk - 1, dtype=torch.int8, device="cuda")))
    wu, wm, wn = ref.quant_causal_conv1d(x.cpu(), w.cpu(), ws.cpu(), bias.cpu(), 0.03, 0.01, st.cpu(), s_out)
    assert torch.equal(u.cpu(), wu) and torch.equal(new.cpu(), wn)
    if dual:
        assert torch.equal(mask.cpu(), wm) and 0 < wm.float().mean() < 0.9
    # decode in place: one token continues the state exactly, the state read after or before the PDL wait
    for early in (False, True):
        x1 = torch.randint(-128, 128, (b, 1, d), dtype=torch.int8, device="cuda", generator=g)
        wu1, _, wn1 = ref.quant_causal_conv1d(x1.cpu(), w.cpu(), ws.cpu(), bias.cpu(), 0.03, 0.01, new.cpu(), s_out)
        u1, _, same = k.quant_causal_conv1d(x1, w, ws, bias, 0.03, 0.01, new, s_out, state_out=new,
                                            early_state=early)
        assert same.data_ptr() == new.data_ptr() and torch.equal(u1.cpu(), wu1) and torch.equal(new.cpu(), wn1)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("l", [2, 3, 8, 9, 37])
def test_conv_prefill_state_in_place(k, l):
    """The tile kernel writes the new state itself (from its first tile): in place over the old one, at L shorter
    than the state (part of the old state moves), one tile, and several."""
    b, d, kk = 2, 1536, 4
    g = _g(l)
    x = torch.randint(-128, 128, (b, l, d), dtype=torch.int8, device="cuda", generator=g)
    w = torch.randint(-128, 128, (d, kk), dtype=torch.int8, device="cuda", generator=g)
    ws = torch.rand(d, device="cuda", generator=g) * 0.01 + 1e-4
    bias = torch.randn(d, device="cuda", generator=g)
    st = torch.randint(-128, 128, (b, d, kk - 1), dtype=torch.int8, device="cuda", generator=g)
    wu, wm, wn = ref.quant_causal_conv1d(x.cpu(), w.cpu(), ws.cpu(), bias.cpu(), 0.03, 0.01, st.cpu(), 0.05)
    u, mask, new = k.quant_causal_conv1d(x, w, ws, bias, 0.03, 0.01, st, 0.05, state_out=st)
    assert new.data_ptr() == st.data_ptr()
    assert torch.equal(u.cpu(), wu) and torch.equal(mask.cpu(), wm) and torch.equal(st.cpu(), wn)


def _near_half_codes(scale: float, codes: range) -> torch.Tensor:
    """float32 conv pre-activations v whose silu_r(v) / scale lies within 0-200 ulps of a half-integer code: the
    conv kernel's float32 SiLU must fall back to float64 inside its error window and may not round wrongly outside."""
    vs = []
    for c in codes:
        target = (c + 0.5) * scale
        lo, hi = -1.2, 300.0  # silu is increasing above -1.28; targets here are > -0.27
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mid / (1 + torch.exp(torch.tensor(-mid, dtype=torch.float64)).item()) < target \
                else (lo, mid)
        v = torch.tensor(lo, dtype=torch.float32)
        for off in (0, 1, 2, 3, 8, 16, 20, 24, 30, 40, 60, 64, 70, 100, 200):  # dense near the 2^-19 window's edge
            for sign in (1, -1):
                w = v.clone()
                for _ in range(off):
                    w = torch.nextafter(w, torch.tensor(sign * float("inf")))
                vs.append(w.item())
    return torch.tensor(vs, dtype=torch.float32)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kk", [4, 3])  # 4: the tiled fast kernel; 3: the generic one
@pytest.mark.parametrize("case", ["single", "dual", "dual-negative"])
def test_conv_codes_at_rounding_boundaries(k, kk, case):
    dual = case != "single"
    if case == "single":  # negative codes too: v < 0 has the wider tolerance
        s_in, s_out = 0.01, 0.05
        v = _near_half_codes(s_in, range(-27, 12))
    elif case == "dual":  # outlier codes at s_out; code 25 of s_out sits on the threshold 127.5 of s_in
        s_in, s_out = 0.01, 0.05
        v = _near_half_codes(s_out, range(12, 60))
    else:  # the negative threshold -128.5 of s_in and negative outlier codes (silu >= -0.2785 needs a small s_in)
        s_in, s_out = 0.002, 0.0025
        v = torch.cat([_near_half_codes(s_in, range(-132, -125)), _near_half_codes(s_out, range(-111, -100))])
    d = (v.numel() + 3) // 4 * 4
    bias = torch.zeros(d)
    bias[: v.numel()] = v
    x = torch.zeros(1, 2, d, dtype=torch.int8)  # acc = 0, so v = bias exactly
    w = torch.randint(-128, 128, (d, kk), dtype=torch.int8)
    ws = torch.rand(d) * 0.01 + 1e-4
    args = (x, w, ws, bias, 0.03, s_in, None, s_out if dual else None)
    u, mask, _ = k.quant_causal_conv1d(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args))
    wu, wm, _ = ref.quant_causal_conv1d(*args)
    assert torch.equal(u.cpu(), wu)
    if dual:
        assert torch.equal(mask.cpu(), wm) and 0.3 < wm.float().mean() < 1
    # decode in place through the exact path: a zero state and a zero tap on the new token keep v = bias, and the
    # exact path must still read the old state (a shifted one would hold the new token, under nonzero taps)
    st = torch.zeros(1, d, kk - 1, dtype=torch.int8)
    x1 = torch.randint(1, 128, (1, 1, d), dtype=torch.int8)
    w1 = w.clone()
    w1[:, -1] = 0
    w1[:, :-1] = torch.randint(1, 128, (d, kk - 1), dtype=torch.int8)
    args1 = (x1, w1, ws, bias, 0.03, s_in, st, s_out if dual else None)
    st_gpu = st.cuda()
    u1, m1, same = k.quant_causal_conv1d(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args1),
                                         state_out=st_gpu)
    wu1, wm1, wn1 = ref.quant_causal_conv1d(*args1)
    assert torch.equal(u1.cpu(), wu1) and torch.equal(wu1, wu[:, :1])  # v = bias: the same codes as token 0
    assert same.data_ptr() == st_gpu.data_ptr() and torch.equal(st_gpu.cpu(), wn1)
    if dual:
        assert torch.equal(m1.cpu(), wm1)


@needs_gpu
@pytest.mark.gpu
# (1538, 4), (1536, 3), (64, 2): the generic kernel; (1000, 4) and (768, 4): the tile kernel with a partial block of
# channels (250 and 192 quads in 256-thread blocks); with 200 and 250 tiles (one wave on an H100), blocks spanning
# the row (250 threads: a partial warp; 192); (1536, 4, 160, 1): a decode step of 160 sequences in row-wide blocks
@pytest.mark.parametrize(("d", "kk", "b", "l"), [(1538, 4, 3, 37), (1536, 3, 3, 37), (64, 2, 3, 37), (1000, 4, 3, 37),
                                                 (768, 4, 3, 37), (1000, 4, 1, 1600), (768, 4, 2, 1000),
                                                 (1536, 4, 160, 1)])
def test_conv_generic_shapes_bit_exact(k, d, kk, b, l):
    g = _g(d + kk + l)
    x = torch.randint(-128, 128, (b, l, d), dtype=torch.int8, device="cuda", generator=g)
    w = torch.randint(-128, 128, (d, kk), dtype=torch.int8, device="cuda", generator=g)
    ws = torch.rand(d, device="cuda", generator=g) * 0.01 + 1e-4
    bias = torch.randn(d, device="cuda", generator=g)
    st = torch.randint(-128, 128, (b, d, kk - 1), dtype=torch.int8, device="cuda", generator=g)
    u, mask, new = k.quant_causal_conv1d(x, w, ws, bias, 0.03, 0.01, st, 0.05)
    wu, wm, wn = ref.quant_causal_conv1d(x.cpu(), w.cpu(), ws.cpu(), bias.cpu(), 0.03, 0.01, st.cpu(), 0.05)
    assert torch.equal(u.cpu(), wu) and torch.equal(mask.cpu(), wm) and torch.equal(new.cpu(), wn)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n", [8, 16, 32, 64])
# D not a multiple of 8; several chunks; B*D > 2048 (N != 16: two channels per warp; int8 N = 16 at B*D = 12288:
# lanes along the states)
@pytest.mark.parametrize(("d", "l"), [(100, 37), (4096, 37), (20, 300), (4096, 600)])
def test_scan_state_sizes(k, n, d, l):
    ins, h0, scales = _scan_inputs(3, l, d, n, n + d + l, True)
    y, h = k.dual_scale_selective_scan(*ins, initial_state=h0, **scales)
    wy, wh = ref.dual_scale_selective_scan(*ins, initial_state=h0, **scales)
    assert rel(y, wy) <= 1e-5 and rel(h, wh) <= 1e-5
    state = h0.clone()  # decode: every step through the state update kernel, in place
    for t in range(min(l, 5)):
        step = [x[:, t : t + 1].contiguous() if x is not None and x.dim() == 3 else x for x in ins]
        y1, _ = k.selective_state_update(state, *step, in_place=True, early_state=t % 2 == 1, **scales)
        assert rel(y1[:, 0], wy[:, t]) <= 1e-5
    head = [x[:, :5].contiguous() if x is not None and x.dim() == 3 else x for x in ins]
    _, wh5 = ref.dual_scale_selective_scan(*head, initial_state=h0, **scales)
    assert rel(state, wh5) <= 1e-5


def _scan_inputs(b, l, d, n, seed, dual):
    g = _g(seed)
    i8 = dict(dtype=torch.int8, device="cuda", generator=g)
    u = torch.randint(-128, 128, (b, l, d), **i8)
    mask = (torch.rand(b, l, d, device="cuda", generator=g) < 0.01).to(torch.uint8) if dual else None
    dt, z = torch.randint(-128, 128, (b, l, d), **i8), torch.randint(-128, 128, (b, l, d), **i8)
    bm, cm = torch.randint(-128, 128, (b, l, n), **i8), torch.randint(-128, 128, (b, l, n), **i8)
    a_log = torch.log(torch.arange(1, n + 1, device="cuda", dtype=torch.float32)).repeat(d, 1)
    a_log += 0.1 * torch.randn(d, n, device="cuda", generator=g)
    A = a_from_a_log(a_log.cpu()).cuda()
    D = torch.randn(d, device="cuda", generator=g)
    dt_bias = torch.rand(d, device="cuda", generator=g) * -4 - 2
    h0 = torch.randn(b, d, n, device="cuda", generator=g) * 0.1
    scales = dict(u_scale=0.02, u_outlier_scale=0.2 if dual else None, dt_scale=0.03, B_scale=0.02, C_scale=0.02,
                  z_scale=0.03)
    return (u, mask, dt, bm, cm, z, A, D, dt_bias), h0, scales


@needs_gpu
@pytest.mark.gpu
# B*D > 2048 takes the two-channels-per-warp configuration: (3, 300, 1000) ends in a half-empty block with vector
# loads, (3, 37, 1001) has no vector path at all. B*D >= 13312 with D % 16 == 0 takes the one-thread-per-channel
# kernel: (4, 37, 5600) and (6, 37, 5600) end in a partial block of 96 channels, (5, 2049, 4096) in a partial chunk;
# (8, 37, 4096) two blocks per SM, (3, 40, 5120) 15360 channels (one block per SM). On a
# 132-SM GPU (H100, H200) 1188-1584 channels take two warps per channel in 12-channel blocks: (1, 600, 1501) has no
# vector path and a last block of one channel, (3, 37, 500) partial blocks in every batch row, (1, 1537, 1536) is
# mamba-130m's d_inner with a one-step last chunk, (3, 600, 512) two chunks per batch row with a partial second one.
# 3072 <= B*D < 13312 takes lanes along the states (scan_lanes.cuh), 4 states per lane from 12288: (8, 300, 1536) a
# partial last chunk, (3, 77, 4100) a partial last block, (3, 45, 4099) byte loads (D % 4 != 0); 2 states per lane,
# in blocks of 2, 4 or 8 warps by the channel count (on 132 SMs): (2, 300, 2500) 2 warps, partial block and chunk,
# (2, 45, 3072) 4 warps, (1, 70, 4099) 8 warps, byte loads. The 12-channel blocks with D % 16 == 0 stage by
# the TMA on sm_90 (scan_tma.cuh): (1, 1537, 1536), (3, 600, 512), (2, 700, 768) (a box's rows run into the next
# sequence), (1, 520, 1536) (a second chunk of 8 steps).
@pytest.mark.parametrize(("b", "l", "d"), [(1, 1, 768), (3, 2, 768), (3, 7, 768), (1, 2048, 768), (3, 2049, 256),
                                           (1, 8192, 128), (3, 300, 1000), (3, 37, 1001), (5, 7, 4096),
                                           (5, 2049, 4096), (4, 37, 5600), (6, 37, 5600), (8, 37, 4096),
                                           (3, 40, 5120), (1, 600, 1501), (3, 37, 500),
                                           (1, 1537, 1536), (3, 600, 512), (8, 300, 1536), (3, 77, 4100),
                                           (3, 45, 4099), (2, 300, 2500), (2, 45, 3072), (1, 70, 4099), (2, 700, 768),
                                           (1, 520, 1536)])
@pytest.mark.parametrize("dual", [False, True])
def test_scan_matches_reference(k, b, l, d, dual):
    ins, h0, scales = _scan_inputs(b, l, d, 16, b * 100000 + l, dual)
    y, h = k.dual_scale_selective_scan(*ins, initial_state=h0, **scales)
    wy, wh = ref.dual_scale_selective_scan(*ins, initial_state=h0, **scales)
    assert torch.isfinite(y).all()
    assert rel(y, wy) <= 1e-5 and rel(h, wh) <= 1e-5
    y16, _ = k.dual_scale_selective_scan(*ins, initial_state=h0, y_dtype=torch.float16, **scales)
    assert rel(y16.float(), wy) <= 2e-3  # fp16 output rounding


def _offset_copy(x: torch.Tensor, offset: int) -> torch.Tensor:
    """x's values in a buffer that starts `offset` elements past its allocation (off 16-byte alignment for offset >
    0), for the kernels' alignment fallbacks."""
    flat = torch.empty(x.numel() + offset, dtype=x.dtype, device=x.device)
    flat[offset:] = x.flatten()
    return flat[offset:].view(x.shape)


@needs_gpu
@pytest.mark.gpu
# the 12-channel blocks (132 SMs) whose u, dt, z, mask rows come by the TMA, with B and C 16-byte aligned (vector
# loads, the first chunk's before the prologue) and one byte off (scalar loads); several chunks, the last one partial
@pytest.mark.parametrize(("b", "l", "d"), [(1, 1537, 1536), (3, 600, 512)])
@pytest.mark.parametrize("offset", [0, 1])
def test_scan_bc_alignment_matches_reference(k, b, l, d, offset):
    ins, h0, scales = _scan_inputs(b, l, d, 16, b + l + d + offset, True)
    u, mask, dt, bm, cm, z, A, D, dtb = ins
    bs, cs = _offset_copy(bm, offset), _offset_copy(cm, offset)
    assert (bs.data_ptr() % 16 != 0) == bool(offset) and (cs.data_ptr() % 16 != 0) == bool(offset)
    y, h = k.dual_scale_selective_scan(u, mask, dt, bs, cs, z, A, D, dtb, initial_state=h0, **scales)
    wy, wh = ref.dual_scale_selective_scan(*ins, initial_state=h0, **scales)
    assert rel(y, wy) <= 1e-5 and rel(h, wh) <= 1e-5


@needs_gpu
@pytest.mark.gpu
# the one-thread-per-channel kernel writes the final state through shared memory in 16-byte pieces: without an
# initial state, and with A, the initial and the final state one float off 16-byte alignment (the launcher then
# takes the chunked kernel); (6, 37, 5600) ends in a partial block
@pytest.mark.parametrize(("b", "l", "d"), [(6, 37, 5600), (4, 70, 4096)])
@pytest.mark.parametrize("case", ["no_initial_state", "rows_one_float_off"])
def test_scan_state_rows_match_reference(k, b, l, d, case):
    ins, h0, scales = _scan_inputs(b, l, d, 16, b + l + d + len(case), True)
    u, mask, dt, bm, cm, z, A, D, dtb = ins
    if case == "no_initial_state":
        y, h = k.dual_scale_selective_scan(*ins, **scales)
        wy, wh = ref.dual_scale_selective_scan(*ins, **scales)
    else:
        a_s, h0_s = _offset_copy(A, 1), _offset_copy(h0, 1)
        fs = _offset_copy(torch.full_like(h0, float("nan")), 1)  # poisoned: every element must be written
        assert a_s.data_ptr() % 16 and h0_s.data_ptr() % 16 and fs.data_ptr() % 16
        y, h = k.dual_scale_selective_scan(u, mask, dt, bm, cm, z, a_s, D, dtb, initial_state=h0_s, final_state=fs,
                                           **scales)
        assert h.data_ptr() == fs.data_ptr()
        wy, wh = ref.dual_scale_selective_scan(*ins, initial_state=h0, **scales)
    assert rel(y, wy) <= 1e-5 and rel(h, wh) <= 1e-5


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("b", "l", "d"), [(1, 600, 1536), (2, 300, 768), (1, 1100, 2048)])
@pytest.mark.parametrize("dual", [False, True])
def test_scan_without_gate_matches_reference(k, b, l, d, dual):
    """z absent (no SiLU gate): the staging must not read it, and the TMA staging (12-channel blocks) leaves its
    region alone; checked against the float reference on the dequantized inputs."""
    ins, h0, scales = _scan_inputs(b, l, d, 16, b * 7 + l + d, dual)
    u, mask, dt, bm, cm, _z, A, D, dtb = ins
    y, h = k.dual_scale_selective_scan(u, mask, dt, bm, cm, None, A, D, dtb, initial_state=h0, **scales)
    uf = ref.dequantize_dual(u.cpu(), None if mask is None else mask.cpu(), scales["u_scale"],
                             scales["u_outlier_scale"])
    bf, cf = dequantize(bm.cpu(), scales["B_scale"]), dequantize(cm.cpu(), scales["C_scale"])
    wy, wh = ref.selective_scan(uf, dequantize(dt.cpu(), scales["dt_scale"]), A.cpu(), bf, cf, D.cpu(), None, dtb.cpu(),
                                h0.cpu())
    assert rel(y.cpu(), wy) <= 1e-5 and rel(h.cpu(), wh) <= 1e-5


def _channel_major(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.transpose(1, 2).contiguous()


@needs_gpu
@pytest.mark.gpu
# channel-major u, dt, z, mask ([B, D, L]): 16-byte staging copies where L % 16 == 0 ((1, 2048, 1536): the K = 2
# kernel; (3, 608, 512): a partial second chunk; (1, 2048, 768); (3, 304, 1000): two channels per warp; (5, 2048, 4096):
# B * D where token-major runs the one-thread-per-channel kernel), element by element elsewhere ((1, 1537, 1536),
# (3, 600, 512), (3, 300, 1000), (3, 7, 768)); (1, 1, 768): one step, both layouts the same; N = 8, 32, 64. (1, 64,
# 1536) and (3, 32, 1000): short, so that compute-sanitizer's racecheck can run the vector paths.
# Lanes along the states (B*D >= 3072; channel-major also from 13312, where token-major runs one thread per
# channel): (8, 64, 1536), (3, 50, 4099) (byte loads: L % 4 != 0), (6, 96, 4096); 2 states per lane: (2, 64, 2500),
# (1, 52, 4098) (token-major by bytes).
@pytest.mark.parametrize(("b", "l", "d", "n"), [(1, 2048, 1536, 16), (1, 64, 1536, 16), (3, 32, 1000, 16),
                                                (8, 64, 1536, 16), (3, 50, 4099, 16), (6, 96, 4096, 16),
                                                (2, 64, 2500, 16), (1, 52, 4098, 16),
                                                (3, 608, 512, 16), (1, 2048, 768, 16),
                                                (3, 304, 1000, 16), (5, 2048, 4096, 16), (1, 1537, 1536, 16),
                                                (3, 600, 512, 16), (3, 300, 1000, 16), (3, 7, 768, 16),
                                                (1, 1, 768, 16), (2, 64, 128, 8), (2, 80, 96, 32), (2, 48, 64, 64)])
@pytest.mark.parametrize("dual", [False, True])
def test_channel_major_scan_equals_token_major(k, b, l, d, n, dual):
    ins, h0, scales = _scan_inputs(b, l, d, n, b * 1000 + l + d, dual)
    u, mask, dt, bm, cm, z, A, D, dtb = ins
    cm_ins = (_channel_major(u), _channel_major(mask), _channel_major(dt), bm, cm, _channel_major(z), A, D, dtb)
    y, h = k.dual_scale_selective_scan(*cm_ins, initial_state=h0, channel_major=True, **scales)
    wy, wh = ref.dual_scale_selective_scan(*ins, initial_state=h0, **scales)
    assert y.shape == (b, l, d) and torch.isfinite(y).all()
    assert rel(y, wy) <= 1e-5 and rel(h, wh) <= 1e-5
    if b * d < 13312:  # token-major runs the same kernel: the same bits
        ty, th = k.dual_scale_selective_scan(*ins, initial_state=h0, **scales)
        assert torch.equal(y, ty) and torch.equal(h, th)
    f = [x.float() * 0.05 for x in (u, dt)]
    fy, fh = k.selective_scan(*(_channel_major(x) for x in f), A, bm.float(), cm.float(), D, _channel_major(z.float()),
                              dtb, initial_state=h0, channel_major=True)
    wfy, wfh = ref.selective_scan(*f, A, bm.float(), cm.float(), D, z.float(), dtb, initial_state=h0)
    assert rel(fy, wfy) <= 1e-5 and rel(fh, wfh) <= 1e-5
    with pytest.raises(k.KernelError, match="dt must be \\[B, D, L\\]"):
        k.dual_scale_selective_scan(cm_ins[0], cm_ins[1], dt, *cm_ins[3:], channel_major=True, **scales)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("n", "d", "l"), [(16, 512, 33), (64, 100, 300), (8, 24, 1)])
def test_float_scan_and_decode_update(k, n, d, l):
    b = 3
    g = _g(7)
    f = [torch.randn(b, l, d, device="cuda", generator=g), torch.randn(b, l, d, device="cuda", generator=g)]
    A = -torch.rand(d, n, device="cuda", generator=g) - 0.1
    B, C = torch.randn(b, l, n, device="cuda", generator=g), torch.randn(b, l, n, device="cuda", generator=g)
    D, z, dtb = torch.randn(d, device="cuda", generator=g), torch.randn(b, l, d, device="cuda", generator=g), \
        torch.randn(d, device="cuda", generator=g)
    y, h = k.selective_scan(f[0], f[1], A, B, C, D, z, dtb)
    wy, wh = ref.selective_scan(f[0], f[1], A, B, C, D, z, dtb)
    assert rel(y, wy) <= 1e-5 and rel(h, wh) <= 1e-5
    ins, h0, scales = _scan_inputs(2, 5, d, n, 11, True)
    yy, hh = k.dual_scale_selective_scan(*ins, initial_state=h0, **scales)
    state = h0.clone()
    for t in range(5):
        step = [x[:, t : t + 1].contiguous() if x is not None and x.dim() == 3 else x for x in ins]
        y1, _ = k.selective_state_update(state, *step, in_place=True, **scales)
        assert rel(y1[:, 0], yy[:, t]) <= 1e-5
    assert rel(state, hh) <= 1e-6


@needs_gpu
@pytest.mark.gpu
# With more rows than SMs, 32-element threads (hadamard_wide.cuh) take m = 1 with p = 4096, 8192 and m = 12, 20, 28
# with p = 256 (3072, 5120, 7168) or 128 (1536, 2560, 3584); 2048 (m = 1) and 6144 (m = 12, p = 512) do not.
@pytest.mark.parametrize("d", [768, 1536, 4096, 5120, 48, 160, 448, 512, 1024, 2048, 8192, 12288, 3072, 6144, 7168,
                               2560, 3584])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [(3, 41), (4, 100)])  # fewer rows than SMs (decode's split mixing), and more
def test_hadamard_quant_bit_exact(k, d, dtype, rows):
    y = (torch.randn(*rows, d, device="cuda", generator=_g(d)) * 2).to(dtype)
    got = k.hadamard_quant(y, 0.01)
    want = ref.hadamard_quant(y.float().cpu(), 0.01)
    assert torch.equal(got.cpu(), want)


def _first_element_rows(v: torch.Tensor, d: int) -> torch.Tensor:
    """Rows of d zeros with v at element 0: their transform is +-v * c at every element."""
    y = torch.zeros(v.numel(), d)
    y[:, 0] = v
    return y


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("d", [4096, 5120, 3072, 1536])
def test_hadamard_quant_codes_at_rounding_boundaries(k, d):
    """Rows whose transform is +-v at every element (v at element 0 alone), v within a few ulps of where v * c / scale
    is a half-integer: the fast quantizers' reciprocal multiplies must leave those codes to the IEEE path."""
    s = 0.01
    c = inv_sqrt(d)  # the spec's c
    base = ((torch.arange(-130, 130, dtype=torch.float64) + 0.5) * s / c.double()).float()
    vs = [base]
    for direction in (math.inf, -math.inf):
        v = base
        for _ in range(3):
            v = torch.nextafter(v, torch.tensor(direction))
            vs.append(v)
    y = _first_element_rows(torch.cat(vs), d)  # 1820 rows
    want = ref.hadamard_quant(y, s)
    per_target = want[:, 0].view(7, -1)
    assert (per_target != per_target[0]).any(), "the offsets cross no rounding boundary: the test tests nothing"
    got = k.hadamard_quant(y.cuda(), s)
    assert torch.equal(got.cpu(), want)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("d", [4096, 5120, 3072, 1536])
def test_hadamard_quant_saturated_codes(k, d):
    """Quotients beyond the int8 range, half-integers among them (129.5, ..., 2^25 + 0.5), and +-inf or near-float-max
    inputs: the codes saturate as the spec's clamp does, and the fast quantizer (F2I.S8 on the unclamped quotient)
    sends what it cannot decide to the IEEE path. Tiled to more rows than SMs, so the many-row kernels run too."""
    s = 0.01
    c = inv_sqrt(d)
    n = torch.cat([torch.arange(127, 140), torch.tensor([1000, 65535, 1 << 20, 1 << 23, 1 << 25])]).double()
    n = torch.cat([n, -n - 1])
    v = torch.cat([((n + 0.5) * s / c.double()).float(), torch.tensor([math.inf, -math.inf, 3.0e38, -3.0e38])])
    y = _first_element_rows(v.repeat(8), d)  # 320 rows
    want = ref.hadamard_quant(y, s)
    assert (want == 127).any() and (want == -128).any()
    got = k.hadamard_quant(y.cuda(), s)
    assert torch.equal(got.cpu(), want)


@needs_gpu
@pytest.mark.gpu
def test_invalid_arguments_are_reported(k):
    y = torch.randn(2, 21, device="cuda")
    with pytest.raises(k.KernelError, match="unsupported: .*dim=21"):
        k.hadamard_quant(y, 0.1)
    with pytest.raises(k.KernelError, match="scale must be positive"):
        k.hadamard_quant(torch.randn(2, 16, device="cuda"), -1.0)
    with pytest.raises(k.KernelError, match=r"unsupported: .*dim=57344 needs 458752 bytes of shared memory"):
        k.hadamard_quant(torch.randn(1, 28 * 2048, device="cuda"), 0.1)  # a valid order, but no GPU holds its row
    x = torch.randint(-128, 128, (1, 4, 8), dtype=torch.int8, device="cuda")
    w = torch.randint(-128, 128, (8, 9), dtype=torch.int8, device="cuda")
    with pytest.raises(k.KernelError, match="kernel_size=9"):
        k.quant_causal_conv1d(x, w, torch.ones(8, device="cuda"), torch.zeros(8, device="cuda"), 0.1, 0.1)
    lib = k.load_library()
    import ctypes

    f = ctypes.c_float
    assert lib.qm_rmsnorm_quant(None, None, None, ctypes.c_int64(1), 8, f(1e-5), f(0.1), None) == 1
    assert b"non-null" in lib.qm_last_error()


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 3, 40])
# few columns (< 2048): 4 warps per column; many: 1. 1504 and 9000 need more blocks than the persistent grid of
# 4 per SM holds, so for rows 2-4 each warp walks several columns; one row takes 2 columns per warp there (9001:
# a last warp with one column), and 2 warps per column at 2056 (under half a wave of one-warp blocks on 132 SMs).
@pytest.mark.parametrize("ncols", [56, 1504, 2056, 9000, 9001])
@pytest.mark.parametrize("dual", [False, True])
def test_int8_linear_epilogue_bit_exact(k, rows, ncols, dual):
    from qmamba.ops.specmath import quantize, scale_product

    g = _g(rows * 10 + dual + ncols)
    kdim, widths, scales = 96, (ncols - 32, 16, 16), (0.5, 0.3, 0.7)
    x = torch.randint(-128, 128, (rows, kdim), dtype=torch.int8, generator=g, device="cuda")
    w = torch.randint(-128, 128, (sum(widths), kdim), dtype=torch.int8, generator=g, device="cuda")
    ws = torch.rand(sum(widths), generator=g, device="cuda") * 0.01 + 1e-3
    mask = (torch.rand(rows, kdim, generator=g, device="cuda") < 0.05).to(torch.uint8) if dual else None
    s_in, s_out = 0.02, 0.3
    m_in = scale_product(s_in, ws.cpu()).cuda()
    m_out = scale_product(s_out, ws.cpu()).cuda() if dual else None
    acc = {}
    if rows > k.GEMV_MAX_ROWS:  # the GEMM path: accumulators from cuBLASLt, epilogue from the kernel
        # cuBLASLt's int8 GEMM takes column counts that are multiples of 8; others get exact float64 sums here
        def int_mm(a: torch.Tensor) -> torch.Tensor:
            if ncols % 8 == 0:
                return torch._int_mm(a, w.t())
            return (a.cpu().double() @ w.cpu().double().t()).to(torch.int32).cuda()

        xm = x if mask is None else torch.where(mask.bool(), torch.zeros((), dtype=torch.int8, device="cuda"), x)
        acc["acc_in"] = int_mm(xm)
        if dual:
            acc["acc_out"] = int_mm(torch.where(mask.bool(), x, torch.zeros_like(x)))
    outs = k.int8_linear(x, w, m_in, list(zip(widths, scales, strict=True)), mask, m_out, **acc)
    y = ref.quant_linear(x.cpu(), w.cpu(), s_in, ws.cpu(), None, None if mask is None else mask.cpu(), s_out)
    c = 0
    for o, wd, sc in zip(outs, widths, scales, strict=True):
        assert torch.equal(o.cpu(), quantize(y[:, c : c + wd], sc))
        c += wd
    res = torch.randn(rows, sum(widths), generator=g, device="cuda")
    want, res_early = res.cpu() + y, res.clone()
    (same,) = k.int8_linear(x, w, m_in, [(sum(widths), None)], mask, m_out, residual=res, **acc)
    assert same.data_ptr() == res.data_ptr() and torch.equal(res.cpu(), want)
    if rows == 1:  # the residual read before the dependency wait: the same bits
        k.int8_linear(x, w, m_in, [(sum(widths), None)], mask, m_out, residual=res_early, early_residual=True)
        assert torch.equal(res_early.cpu(), want)


@needs_gpu
@pytest.mark.gpu
def test_early_residual_needs_one_row_a_residual_and_the_gemv(k):
    x = torch.zeros(2, 64, dtype=torch.int8, device="cuda")
    w = torch.zeros(32, 64, dtype=torch.int8, device="cuda")
    m, res = torch.ones(32, device="cuda"), torch.zeros(2, 32, device="cuda")
    with pytest.raises(k.KernelError, match=r"early_residual=1 must be 0, or 1 with a residual, one row and the GEMV"):
        k.int8_linear(x[:1], w, m, [(32, None)], early_residual=True)
    with pytest.raises(k.KernelError, match=r"early_residual=1 must be 0, or 1 with a residual, one row"):
        k.int8_linear(x, w, m, [(32, None)], residual=res, early_residual=True)
    with pytest.raises(k.KernelError, match=r"one row and the GEMV \(no acc_in\)"):
        k.int8_linear(x[:1], w, m, [(32, None)], residual=res[:1], early_residual=True,
                      acc_in=torch.zeros(1, 32, dtype=torch.int32, device="cuda"))


@needs_gpu
@pytest.mark.gpu
# one row at decode shapes with K in the thousands: x_proj (4 warps per column), out_proj (2 warps per column where one
# per column fills at most half a wave: 2560 and 2056 columns on a 132-SM GPU, the latter with a partial last block),
# in_proj (2 columns per warp), a wide K; 9001 columns: a last warp with one column
@pytest.mark.parametrize(("kdim", "ncols"), [(5120, 192), (5120, 2560), (2560, 10240), (8192, 2056), (16, 9001)])
@pytest.mark.parametrize("dual", [False, True])
def test_int8_linear_one_row_at_decode_shapes(k, kdim, ncols, dual):
    from qmamba.ops.specmath import quantize, scale_product

    g = _g(kdim + ncols + dual)
    x = torch.randint(-128, 128, (1, kdim), dtype=torch.int8, generator=g, device="cuda")
    w = torch.randint(-128, 128, (ncols, kdim), dtype=torch.int8, generator=g, device="cuda")
    ws = torch.rand(ncols, generator=g, device="cuda") * 0.001 + 1e-4
    mask = (torch.rand(1, kdim, generator=g, device="cuda") < 0.05).to(torch.uint8) if dual else None
    s_in, s_out = 0.02, 0.3
    m_in = scale_product(s_in, ws.cpu()).cuda()
    m_out = scale_product(s_out, ws.cpu()).cuda() if dual else None
    (out,) = k.int8_linear(x, w, m_in, [(ncols, 0.05)], mask, m_out)
    y = ref.quant_linear(x.cpu(), w.cpu(), s_in, ws.cpu(), None, None if mask is None else mask.cpu(), s_out)
    assert torch.equal(out.cpu(), quantize(y, 0.05))
    assert (out.cpu() != 0).float().mean() > 0.5  # the scale keeps most codes away from 0: a wrong sum shows


@needs_gpu
@pytest.mark.gpu
def test_early_state_must_be_0_or_1(k):
    import ctypes

    lib = k.load_library()
    ins, h0, scales = _scan_inputs(1, 1, 64, 16, 5, False)
    y = torch.empty(1, 1, 64, device="cuda")
    args = k.ScanArgs(input_dtype=2, u=ins[0].data_ptr(), dt=ins[2].data_ptr(), B=ins[3].data_ptr(),
                      C=ins[4].data_ptr(), A=ins[6].data_ptr(), initial_state=h0.data_ptr(), final_state=h0.data_ptr(),
                      y=y.data_ptr(), batch=1, seqlen=1, dim=64, dstate=16, u_scale=0.1, dt_scale=0.1, B_scale=0.1,
                      C_scale=0.1, z_scale=0.1, early_state=2)
    assert lib.qm_selective_state_update(ctypes.byref(args), None) == 1
    assert "early_state=2 must be 0 or 1" in lib.qm_last_error().decode()
    x = torch.zeros(1, 1, 64, dtype=torch.int8, device="cuda")
    w = torch.zeros(64, 4, dtype=torch.int8, device="cuda")
    f = torch.ones(64, device="cuda")
    rc = lib.qm_quant_causal_conv1d(*(ctypes.c_void_p(t.data_ptr()) for t in (x, w, f, f)), None,
                                    ctypes.c_void_p(x.data_ptr()), None, None, 1, 1, 64, 4, ctypes.c_float(0.1),
                                    ctypes.c_float(0.1), ctypes.c_float(0.0), 0, 3, None)
    assert rc == 1 and "early_state=3 must be 0 or 1" in lib.qm_last_error().decode()


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("rows", "kdim", "vocab"), [(1, 768, 50280), (3, 2560, 1000), (4, 16, 33), (9, 4096, 517), (4, 2560, 50280)]
)
@pytest.mark.parametrize("norm", [False, True])
def test_tied_logits_match_reference(k, rows, kdim, vocab, norm):
    """norm: the kernel applies the final RMSNorm to h first; the normed rows must equal specmath.rmsnorm's."""
    from qmamba.ops.specmath import rmsnorm

    g = _g(rows + kdim + vocab)
    h = torch.randn(rows, kdim, generator=g, device="cuda")
    w = torch.rand(kdim, generator=g, device="cuda") + 0.5
    e_q = torch.randint(-128, 128, (vocab, kdim), dtype=torch.int8, generator=g, device="cuda")
    e_q[0] = -128  # extreme codes: the byte-to-float conversion must be exact at both ends
    e_q[-1] = 127
    e_s = torch.rand(vocab, generator=g, device="cuda") * 0.01 + 1e-4
    out = _poison(torch.empty(rows, vocab, device="cuda"))
    k.tied_logits(h, e_q, e_s, out=out, norm=(w, 1e-5) if norm else None)
    hn = rmsnorm(h.cpu(), w.cpu(), 1e-5) if norm else h.cpu()
    want = (hn.double() @ e_q.cpu().double().T) * e_s.cpu().double()  # exact sums: the spec's formula
    assert rel(out.cpu(), want) < 1e-6 and not out.isnan().any()
    if norm:  # the same normed rows: the same kernel then gives the same bits
        assert torch.equal(out, k.tied_logits(hn.cuda(), e_q, e_s))
    with pytest.raises(k.KernelError, match="k % 16 == 0"):
        k.tied_logits(h[:, :-1], e_q[:, :-1].contiguous(), e_s)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("rows", "kdim", "ncols"),
    [(1, 768, 3072), (3, 2560, 56), (4, 64, 2056), (2, 8192, 40), (3, 2560, 10240), (4, 768, 3072),
     (1, 2560, 10240), (1, 8192, 2056), (1, 5120, 192), (1, 768, -3072), (1, 2048, 8192), (1, 2576, 64),
     (1, 16, 40)],  # -: norm_w not 16-byte aligned; one row of k <= 2560: the prologue that loads the row at once
)
def test_int8_linear_with_fused_rmsnorm_bit_exact(k, rows, kdim, ncols):
    from qmamba.ops.specmath import quantize, scale_product

    unaligned, ncols = ncols < 0, abs(ncols)
    g = _g(rows + kdim + ncols + unaligned)
    r = torch.randn(rows, kdim, generator=g, device="cuda") * 3
    nw = (torch.rand(kdim + 1, generator=g, device="cuda") + 0.5)[1:] if unaligned else \
        torch.rand(kdim, generator=g, device="cuda") + 0.5
    assert (nw.data_ptr() % 16 != 0) == unaligned
    eps, s_norm = 1e-5, 0.05
    w = torch.randint(-128, 128, (ncols, kdim), dtype=torch.int8, generator=g, device="cuda")
    ws = torch.rand(ncols, generator=g, device="cuda") * 0.01 + 1e-3
    m_in = scale_product(s_norm, ws.cpu()).cuda()
    segs = [(ncols - 16, 0.5), (16, None)]
    outs = k.int8_linear(None, w, m_in, segs, norm=(r, nw, eps, s_norm))
    codes = ref.rms_norm_quant(r.cpu(), nw.cpu(), eps, s_norm)
    y = ref.quant_linear(codes, w.cpu(), s_norm, ws.cpu(), None, None, None)
    assert torch.equal(outs[0].cpu(), quantize(y[:, : ncols - 16], 0.5))
    assert torch.equal(outs[1].cpu(), y[:, ncols - 16 :])


@needs_gpu
@pytest.mark.gpu
# ranks that are multiples of 16 take 16-byte pieces (272: a second round of pieces at N = 16); 7: byte by byte
@pytest.mark.parametrize(("b", "d", "rank"), [(1, 1536, 48), (3, 5120, 160), (2, 100, 7), (2, 64, 272), (2, 64, 16)])
@pytest.mark.parametrize("n", [16, 64])
def test_state_update_with_fused_dt_proj_equals_separate(k, b, d, rank, n):
    from qmamba.ops.specmath import quantize, scale_product

    ins, h0, scales = _scan_inputs(b, 1, d, n, b + d + rank + n, True)
    g = _g(d * rank)
    lr = torch.randint(-128, 128, (b, 1, rank), dtype=torch.int8, generator=g, device="cuda")
    w = torch.randint(-128, 128, (d, rank), dtype=torch.int8, generator=g, device="cuda")
    ws = torch.rand(d, generator=g, device="cuda") * 0.01 + 1e-3
    s_lr = 0.05
    dt_codes = quantize(ref.quant_linear(lr.cpu(), w.cpu(), s_lr, ws.cpu(), None, None, None), scales["dt_scale"])
    sep, fused = list(ins), list(ins)
    sep[2], fused[2] = dt_codes.cuda(), None
    s1, s2 = h0.clone(), h0.clone()
    y1, _ = k.selective_state_update(s1, *sep, in_place=True, **scales)
    y2, _ = k.selective_state_update(s2, *fused, in_place=True, dt_proj=(lr, w, scale_product(s_lr, ws.cpu()).cuda()),
                                     early_state=True, **scales)  # as the decode step calls it
    assert torch.equal(y1, y2) and torch.equal(s1, s2)
    wy, _ = ref.dual_scale_selective_scan(*sep, initial_state=h0, **scales)
    assert rel(y2, wy) <= 1e-5


def _fused_conv_inputs(rows: int, d: int, ncols: int, dual: bool, seed: int, boundary: bool = False):
    """Decode conv + x_proj inputs. boundary: zero x and state, so v = bias exactly, and biases whose codes sit
    next to rounding ties and outlier thresholds (the prologue's exact path must decide them)."""
    g = _g(seed)
    if boundary:
        v = torch.cat([_near_half_codes(0.01, range(-27, 12)), _near_half_codes(0.05, range(20, 30))])
        d = (v.numel() + 15) // 16 * 16
        bias = torch.zeros(d, device="cuda")
        bias[: v.numel()] = v.cuda()
        x = torch.zeros(rows, 1, d, dtype=torch.int8, device="cuda")
        st = torch.zeros(rows, d, 3, dtype=torch.int8, device="cuda")
    else:
        bias = torch.randn(d, device="cuda", generator=g)
        x = torch.randint(-128, 128, (rows, 1, d), dtype=torch.int8, device="cuda", generator=g)
        st = torch.randint(-128, 128, (rows, d, 3), dtype=torch.int8, device="cuda", generator=g)
    w = torch.randint(-128, 128, (d, 4), dtype=torch.int8, device="cuda", generator=g)
    ws = torch.rand(d, device="cuda", generator=g) * 0.01 + 1e-4
    wx = torch.randint(-128, 128, (ncols, d), dtype=torch.int8, device="cuda", generator=g)
    wsx = torch.rand(ncols, device="cuda", generator=g) * 0.01 + 1e-3
    return x, w, ws, bias, st, wx, wsx, d


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("rows", "d", "ncols"),
    # 80 / 192: x_proj of 130m / 2.8b; 2056 columns: the one-warp-per-column instantiation; 6144 at 4 rows: the
    # shared-memory limit; 24576 at one row likewise; -1: biases at rounding boundaries
    [(1, 1536, 80), (1, 5120, 192), (3, 2560, 56), (4, 6144, 40), (2, 64, 2056), (1, 24576, 24), (1, -1, 40)],
)
@pytest.mark.parametrize("dual", [False, True])
@pytest.mark.parametrize("early", [False, True])
def test_int8_linear_with_fused_conv_equals_separate(k, rows, d, ncols, dual, early):
    from qmamba.ops.specmath import quantize, scale_product

    boundary = d < 0
    x, w, ws, bias, st, wx, wsx, d = _fused_conv_inputs(rows, abs(d), ncols, dual, rows + d + ncols + dual, boundary)
    s_in, s_u = 0.03, 0.01
    s_out = 0.05 if dual else None
    wu, wm, wn = ref.quant_causal_conv1d(x.cpu(), w.cpu(), ws.cpu(), bias.cpu(), s_in, s_u, st.cpu(), s_out)
    segs = [(ncols - 16, 0.5), (8, 0.25), (8, None)]
    y = ref.quant_linear(wu, wx.cpu(), s_u, wsx.cpu(), None, wm, s_out)
    u = _poison(torch.empty_like(x))
    mask = _poison(torch.empty(x.shape, dtype=torch.uint8, device="cuda")) if dual else None
    state = st.clone()
    conv = k.FusedConv(x, w, ws, bias, state, u, mask, s_in, s_u, s_out, early_state=early)
    outs = k.int8_linear(None, wx, scale_product(s_u, wsx.cpu()).cuda(), segs,
                         m_out=scale_product(s_out, wsx.cpu()).cuda() if dual else None, conv=conv)
    assert torch.equal(u.cpu(), wu), "conv codes differ"
    if dual:
        assert torch.equal(mask.cpu(), wm) and 0 < wm.float().mean() < 0.9
    assert torch.equal(state, st), "the fused conv must only read the state"
    assert torch.equal(outs[0].cpu(), quantize(y[..., : ncols - 16], 0.5))
    assert torch.equal(outs[1].cpu(), quantize(y[..., ncols - 16 : ncols - 8], 0.25))
    assert torch.equal(outs[2].cpu(), y[..., ncols - 8 :])
    if boundary:  # some codes were decided by the exact path, and the test would see a wrong one
        assert (wu != 0).any()
    # the state update then shifts the conv state by the same token: equal to the conv kernel's new state
    if rows * d * 16 <= 1 << 24:
        ins, h0, scales = _scan_inputs(rows, 1, d, 16, d + rows, dual)
        rank = 16
        g = _g(d)
        lr = torch.randint(-128, 128, (rows, 1, rank), dtype=torch.int8, generator=g, device="cuda")
        wdt = torch.randint(-128, 128, (d, rank), dtype=torch.int8, generator=g, device="cuda")
        mdt = (torch.rand(d, generator=g, device="cuda") * 1e-4).contiguous()
        ins = list(ins)
        ins[2] = None
        plain, shifted = h0.clone(), h0.clone()
        y1, _ = k.selective_state_update(plain, *ins, in_place=True, dt_proj=(lr, wdt, mdt), **scales)
        y2, _ = k.selective_state_update(shifted, *ins, in_place=True, dt_proj=(lr, wdt, mdt), early_state=early,
                                         conv_shift=(x, state), **scales)
        assert torch.equal(y1, y2) and torch.equal(plain, shifted)
        assert torch.equal(state.cpu(), wn), "the deferred conv-state shift differs from the conv kernel's"


@needs_gpu
@pytest.mark.gpu
def test_embedding_lookup_matches_reference(k):
    g = _g(78)
    e_q = torch.randint(-128, 128, (1000, 384), dtype=torch.int8, generator=g, device="cuda")
    e_q[0], e_q[-1] = -128, 127
    e_s = torch.rand(1000, generator=g, device="cuda") * 0.01 + 1e-4
    ids = torch.tensor([[0, 999, 5], [17, 0, 998]], device="cuda")
    out = k.embedding_lookup(ids, e_q, e_s)
    assert torch.equal(out.cpu(), ref.embedding_lookup(ids.cpu(), e_q.cpu(), e_s.cpu()))
    bad = k.embedding_lookup(torch.tensor([[3, 1000, -1]], device="cuda"), e_q, e_s)
    assert not bad[0, 0].isnan().any() and bad[0, 1:].isnan().all(), "an id out of range gives a NaN row"
    with pytest.raises(k.KernelError, match="ids must be int64"):
        k.embedding_lookup(ids.int(), e_q, e_s)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("kdim", "d", "rank", "n"),
    # 130m (8 channels per block, 80 sums), 2.8b (two columns per warp: 16 channels per block, 192 sums: a second
    # round of the update's multipliers), a small model (its 128 columns would otherwise take 4 warps per column),
    # 384 sums (beyond the update's preloaded rounds and the GEMV's 256 threads)
    [(768, 1536, 48, 16), (2560, 5120, 160, 16), (64, 64, 16, 8), (256, 512, 256, 64)],
)
@pytest.mark.parametrize("dual", [False, True])
@pytest.mark.parametrize("early", [False, True])
def test_in_proj_with_conv_and_x_proj_behind_equals_reference(k, kdim, d, rank, n, dual, early):
    """in_proj (RMSNorm in front) with the decode conv and x_proj's sums behind, then the state update with x_proj's
    epilogue and dt_proj fused: every code equals the reference chain, and y / the SSM state equal the update fed
    with the reference codes. A later GEMV's clear zeroes the sums again."""
    from qmamba.ops.specmath import quantize, scale_product

    g = _g(kdim + d + rank + 10 * dual + early)
    f32 = dict(device="cuda", generator=g)
    i8 = dict(dtype=torch.int8, device="cuda", generator=g)
    r = torch.randn(1, 1, kdim, **f32)
    nw = torch.rand(kdim, **f32) + 0.5
    w_in, ws_in = torch.randint(-128, 128, (2 * d, kdim), **i8), torch.rand(2 * d, **f32) * 0.01 + 1e-3
    cw, cws, cb = torch.randint(-128, 128, (d, 4), **i8), torch.rand(d, **f32) * 0.01 + 1e-4, torch.randn(d, **f32)
    st = torch.randint(-128, 128, (1, d, 3), **i8)
    xp_n = rank + 2 * n
    wx, wsx = torch.randint(-128, 128, (xp_n, d), **i8), torch.rand(xp_n, **f32) * 0.01 + 1e-3
    s_norm, s_x, s_z, s_u, s_lr = 0.02, 0.05, 0.05, 0.01, 0.5
    s_out = 0.05 if dual else None
    # the reference chain
    h = ref.rms_norm_quant(r.cpu(), nw.cpu(), 1e-5, s_norm)
    xz = ref.quant_linear(h, w_in.cpu(), s_norm, ws_in.cpu())
    wxc, wzc = quantize(xz[..., :d], s_x), quantize(xz[..., d:], s_z)
    wu, wm, wn = ref.quant_causal_conv1d(wxc, cw.cpu(), cws.cpu(), cb.cpu(), s_x, s_u, st.cpu(), s_out)
    y = ref.quant_linear(wu, wx.cpu(), s_u, wsx.cpu(), None, wm, s_out)
    want_lr, want_b, want_c = quantize(y[..., :rank], s_lr), quantize(y[..., rank : rank + n], 0.25), \
        quantize(y[..., rank + n :], 0.25)
    assert 0 < (want_lr.abs() < 127).float().mean() and (want_b != 0).any()
    # the fused in_proj
    u = _poison(torch.empty(1, 1, d, dtype=torch.int8, device="cuda"))
    mask = _poison(torch.empty(1, 1, d, dtype=torch.uint8, device="cuda")) if dual else None
    state = st.clone()
    acc = torch.zeros((2, xp_n) if dual else (xp_n,), dtype=torch.int32, device="cuda")
    behind = k.ConvXProjBehind(cw, cws, cb, state, u, mask, s_u, s_out, wx, acc, early_state=early)
    x, z = k.int8_linear(None, w_in, scale_product(s_norm, ws_in.cpu()).cuda(), [(d, s_x), (d, s_z)],
                         norm=(r, nw, 1e-5, s_norm), behind=behind)
    assert torch.equal(x.cpu(), wxc) and torch.equal(z.cpu(), wzc)
    assert torch.equal(u.cpu(), wu), "conv codes differ"
    if dual:
        assert torch.equal(mask.cpu(), wm) and 0 < wm.float().mean() < 0.9
    assert torch.equal(state.cpu(), wn), "the shifted conv state differs from the conv's"
    # the update with x_proj's epilogue, against the update fed with the reference codes
    A = a_from_a_log(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1)).cuda()
    D, dt_bias = torch.randn(d, **f32), torch.rand(d, **f32) * -4 - 2
    wdt, mdt = torch.randint(-128, 128, (d, rank), **i8), (torch.rand(d, **f32) * 1e-4).contiguous()
    h0 = torch.randn(1, d, n, **f32) * 0.1
    scales = dict(u_scale=s_u, u_outlier_scale=s_out, dt_scale=0.03, B_scale=0.25, C_scale=0.25, z_scale=s_z)
    m_in = scale_product(s_u, wsx.cpu()).cuda()
    m_out = scale_product(s_out, wsx.cpu()).cuda() if dual else None
    lr, bq, cq = (_poison(torch.empty(1, 1, m, dtype=torch.int8, device="cuda")) for m in (rank, n, n))
    fused_h, plain_h = h0.clone(), h0.clone()
    y1, _ = k.selective_state_update(fused_h, u, mask, None, bq, cq, z, A, D, dt_bias, in_place=True,
                                     dt_proj=(lr, wdt, mdt), x_proj=(acc, m_in, m_out, s_lr), early_state=early,
                                     **scales)
    assert torch.equal(lr.cpu(), want_lr) and torch.equal(bq.cpu(), want_b) and torch.equal(cq.cpu(), want_c)
    y2, _ = k.selective_state_update(plain_h, u, mask, None, want_b.cuda(), want_c.cuda(), z, A, D, dt_bias,
                                     in_place=True, dt_proj=(want_lr.cuda(), wdt, mdt), **scales)
    assert torch.equal(y1, y2) and torch.equal(fused_h, plain_h)
    # a later GEMV clears the sums for the next step
    res = torch.zeros(1, 8, device="cuda")
    # (a weight of d columns for z's d: the binding now refuses the [8, kdim] slice this test used to pass here)
    k.int8_linear(z, torch.zeros(8, d, dtype=torch.int8, device="cuda"), ws_in[:8].contiguous(), [(8, None)],
                  residual=res, clear=acc)
    assert not acc.any()


@needs_gpu
@pytest.mark.gpu
def test_conv_and_x_proj_behind_reject_bad_arguments(k):
    from qmamba.ops.specmath import scale_product

    d, kdim = 64, 64
    x = torch.zeros(2, 1, kdim, dtype=torch.int8, device="cuda")
    w_in = torch.zeros(2 * d, kdim, dtype=torch.int8, device="cuda")
    m = scale_product(0.02, torch.ones(2 * d)).cuda()
    cw, cws, cb = torch.zeros(d, 4, dtype=torch.int8, device="cuda"), torch.ones(d, device="cuda"), \
        torch.zeros(d, device="cuda")
    st, u = torch.zeros(1, d, 3, dtype=torch.int8, device="cuda"), torch.empty(1, 1, d, dtype=torch.int8, device="cuda")
    wx, acc = torch.zeros(32, d, dtype=torch.int8, device="cuda"), torch.zeros(32, dtype=torch.int32, device="cuda")
    behind = k.ConvXProjBehind(cw, cws, cb, st, u, None, 0.01, None, wx, acc)
    with pytest.raises(k.KernelError, match="take one row and no fused Hadamard, got rows=2"):
        k.int8_linear(x, w_in, m, [(d, 0.05), (d, 0.05)], behind=behind)
    with pytest.raises(k.KernelError, match=r"width % 16 == 0 \(got 56\)"):
        k.int8_linear(x[:1], w_in, m, [(56, 0.05), (2 * d - 56, 0.05)], behind=behind)
    with pytest.raises(k.KernelError, match="segment 0 as int8 codes"):
        k.int8_linear(x[:1], w_in, m, [(d, None), (d, 0.05)], behind=behind)
    with pytest.raises(k.KernelError, match="behind.acc must be int32 with 32 sums"):
        k.int8_linear(x[:1], w_in, m, [(d, 0.05), (d, 0.05)],
                      behind=k.ConvXProjBehind(cw, cws, cb, st, u, None, 0.01, None, wx, acc.float()))
    with pytest.raises(k.KernelError, match="xp_acc or clear needs the GEMV, not acc_in"):
        k.int8_linear(x[:1], w_in, m, [(d, 0.05), (d, 0.05)], acc_in=torch.zeros(1, 2 * d, dtype=torch.int32,
                                                                                   device="cuda"), clear=acc)
    ins, h0, scales = _scan_inputs(1, 1, d, 16, 9, False)
    lr = torch.zeros(1, 1, 16, dtype=torch.int8, device="cuda")
    wdt, mdt = torch.zeros(d, 16, dtype=torch.int8, device="cuda"), torch.ones(d, device="cuda")
    ins = list(ins)
    ins[2] = None
    with pytest.raises(k.KernelError, match=r"xp_n == dt_rank \+ 2 dstate <= 1024 \(got 32\)"):
        k.selective_state_update(h0, *ins, in_place=True, dt_proj=(lr, wdt, mdt),
                                 x_proj=(acc, torch.ones(32, device="cuda"), None, 0.5), **scales)
    with pytest.raises(k.KernelError, match="needs a fused dt_proj"):
        k.selective_state_update(h0, *ins[:2], torch.zeros(1, 1, d, dtype=torch.int8, device="cuda"), *ins[3:],
                                 in_place=True, x_proj=(torch.zeros(48, dtype=torch.int32, device="cuda"),
                                                        torch.ones(48, device="cuda"), None, 0.5), **scales)


@needs_gpu
@pytest.mark.gpu
def test_fused_conv_and_conv_shift_reject_bad_arguments(k):
    from qmamba.ops.specmath import scale_product

    x, w, ws, bias, st, wx, wsx, d = _fused_conv_inputs(4, 6160, 40, True, 7)
    u, mask = torch.empty_like(x), torch.empty(x.shape, dtype=torch.uint8, device="cuda")
    m = scale_product(0.01, wsx.cpu()).cuda()
    with pytest.raises(k.KernelError, match=r"k <= 6144 \(24576 for one row\), k=6160"):
        k.int8_linear(None, wx, m, [(40, None)], m_out=m,
                      conv=k.FusedConv(x, w, ws, bias, st, u, mask, 0.03, 0.01, 0.05))
    x, w, ws, bias, st, wx, wsx, d = _fused_conv_inputs(1, 64, 40, True, 8)
    u, mask = torch.empty_like(x), torch.empty(x.shape, dtype=torch.uint8, device="cuda")
    with pytest.raises(k.KernelError, match="conv_mask \\(and m_out\\) must be non-null exactly when"):
        k.int8_linear(None, wx, m, [(40, None)], conv=k.FusedConv(x, w, ws, bias, st, u, mask, 0.03, 0.01, 0.05))
    with pytest.raises(k.KernelError, match=r"x_q, norm, conv and hadamard are alternatives .*got \['conv', 'x_q'\]"):
        k.int8_linear(x, wx, m, [(40, None)], m_out=m, conv=k.FusedConv(x, w, ws, bias, st, u, mask, 0.03, 0.01,
                                                                         0.05))
    ins, h0, scales = _scan_inputs(1, 1, 64, 16, 9, False)
    with pytest.raises(k.KernelError, match="conv-state shift \\(conv_state\\) needs a fused dt_proj"):
        k.selective_state_update(h0, *ins, in_place=True, conv_shift=(x, st), **scales)


@needs_gpu
@pytest.mark.gpu
# 1536 = 12 x 128 (130m: 768 columns, 4 warps per column; 2056: one warp per column), 2048 = 2^11 (the p > 256 path),
# 128 (registers and shuffles only), 96 = 12 x 8 (the smallest p); above 2048 the weights wait in shared memory (sm_90):
# 5120 = 20 x 256 (2.8b), 4096 = 2^12 (1.4b), 3584 = 28 x 128 (100 columns: blocks of 1), 6144 = 12 x 512 (40)
@pytest.mark.parametrize(("kdim", "ncols"), [(1536, 768), (1536, 2056), (2048, 1024), (128, 64), (96, 40),
                                             (5120, 2560), (4096, 2048), (3584, 100), (6144, 40)])
def test_int8_linear_with_fused_hadamard_equals_separate(k, kdim, ncols):
    from qmamba.ops.specmath import scale_product

    g = _g(kdim + ncols)
    y = torch.randn(1, kdim, generator=g, device="cuda") * 2
    w = torch.randint(-128, 128, (ncols, kdim), dtype=torch.int8, generator=g, device="cuda")
    ws = torch.rand(ncols, generator=g, device="cuda") * 0.01 + 1e-3
    s_h = 0.02  # a few codes clamp, most do not
    codes = ref.hadamard_quant(y.cpu(), s_h)
    assert 0 < (codes.abs() == 127).float().mean() < 0.2
    want = ref.quant_linear(codes, w.cpu(), s_h, ws.cpu(), None, None, None)
    res = torch.randn(1, ncols, generator=g, device="cuda")
    res0, res_sep = res.cpu(), res.clone()
    (out,) = k.int8_linear(None, w, scale_product(s_h, ws.cpu()).cuda(), [(ncols, None)], residual=res,
                           hadamard=(y, s_h))
    (sep,) = k.int8_linear(k.hadamard_quant(y, s_h), w, scale_product(s_h, ws.cpu()).cuda(), [(ncols, None)],
                           residual=res_sep)
    assert out.data_ptr() == res.data_ptr() and torch.equal(out, sep)
    assert torch.equal(out.cpu(), res0 + want)
    res_early = res0.cuda()  # the residual read before the dependency wait: the same bits
    k.int8_linear(None, w, scale_product(s_h, ws.cpu()).cuda(), [(ncols, None)], residual=res_early,
                  hadamard=(y, s_h), early_residual=True)
    assert torch.equal(res_early, out)


@needs_gpu
@pytest.mark.gpu
def test_fused_hadamard_rejects_what_it_does_not_cover(k):
    w = torch.zeros(64, 5120, dtype=torch.int8, device="cuda")
    m = torch.ones(64, device="cuda")
    with pytest.raises(k.KernelError, match=r"m 1, 12, 20 or 28 up to k = 6144 with one float32 segment \(k=8192\)"):
        k.int8_linear(None, torch.zeros(64, 8192, dtype=torch.int8, device="cuda"), m, [(64, None)],
                      hadamard=(torch.zeros(1, 8192, device="cuda"), 0.1))
    with pytest.raises(k.KernelError, match=r"with one float32 segment \(k=5120\)"):  # int8 codes out
        k.int8_linear(None, w, m, [(64, 0.5)], hadamard=(torch.zeros(1, 5120, device="cuda"), 0.1))
    with pytest.raises(k.KernelError, match=r"m 1 or 12 up to k = 2048.*\(k=1280\)"):  # 1280 = 20 x 64
        k.int8_linear(None, w[:, :1280].contiguous(), m, [(64, None)],
                      hadamard=(torch.zeros(1, 1280, device="cuda"), 0.1))
    with pytest.raises(k.KernelError, match="a fused Hadamard takes one row, got rows=2"):
        k.int8_linear(None, w[:, :1536].contiguous(), m, [(64, None)],
                      hadamard=(torch.zeros(2, 1536, device="cuda"), 0.1))


@needs_gpu
@pytest.mark.gpu
# 130m (d_inner 1536 = 12 x 128, 768 columns), the tiny model (768 = 12 x 64, 384 columns), 2048 = 2^11 (the p > 256
# path of the Hadamard, 1024 columns), 128 = 2^7 (registers only; 40 columns: blocks with 3 columns and with none)
@pytest.mark.parametrize(("d", "ncols", "rank"), [(1536, 768, 48), (768, 384, 24), (2048, 1024, 128), (128, 40, 16)])
@pytest.mark.parametrize("xp", [False, True])
@pytest.mark.parametrize("dual", [False, True])
def test_update_out_proj_equals_update_then_out_proj(k, d, ncols, rank, xp, dual):
    """qm_update_out_proj (one cluster kernel) against qm_selective_state_update then qm_int8_linear with the fused
    Hadamard and the residual: the same residual, SSM state, y, conv state and x_proj codes, bit for bit, with x_proj's
    epilogue in the update (xp) or a conv shift, and the residual read before or after the wait. The sums it read
    are zeroed."""
    from qmamba.ops.specmath import scale_product

    n, seed = 16, d + ncols + 2 * xp + dual
    (u, mask, _, bq, cq, z, A, D, dt_bias), h0, scales = _scan_inputs(1, 1, d, n, seed, dual)
    g = _g(seed + 1)
    i8 = dict(dtype=torch.int8, device="cuda", generator=g)
    wdt, mdt = torch.randint(-128, 128, (d, rank), **i8), torch.rand(d, device="cuda", generator=g) * 1e-4
    lr = torch.randint(-128, 128, (1, 1, rank), **i8)
    w = torch.randint(-128, 128, (ncols, d), **i8)
    s_h = 0.02
    m = scale_product(s_h, (torch.rand(ncols, device="cuda", generator=g) * 0.01 + 1e-3).cpu()).cuda()
    res0 = torch.randn(1, 1, ncols, device="cuda", generator=g)
    xp_n = rank + 2 * n
    acc0 = torch.randint(-3000, 3000, (2, xp_n) if dual else (xp_n,), dtype=torch.int32, device="cuda", generator=g)
    xm_in = torch.rand(xp_n, device="cuda", generator=g) * 1e-3
    xm_out = torch.rand(xp_n, device="cuda", generator=g) * 1e-2 if dual else None
    cx, cs0 = torch.randint(-128, 128, (1, 1, d), **i8), torch.randint(-128, 128, (1, d, 3), **i8)
    early = xp != dual

    def run(fused: bool):
        h, res, cs, acc = h0.clone(), res0.clone(), cs0.clone(), acc0.clone()
        codes = [_poison(t.clone()) for t in (lr, bq, cq)] if xp else [lr, bq, cq]
        extra = dict(dt_proj=(codes[0], wdt, mdt), conv_shift=None if xp else (cx, cs),
                     x_proj=(acc, xm_in, xm_out, 0.5) if xp else None)
        if fused:
            out = k.update_out_proj(h, u, mask, codes[1], codes[2], z, A, D, dt_bias, out_proj=(w, m, s_h),
                                    residual=res, clear=acc if xp else None, early_residual=early, **extra, **scales)
            assert out.data_ptr() == res.data_ptr()
        else:
            y, _ = k.selective_state_update(h, u, mask, None, codes[1], codes[2], z, A, D, dt_bias, in_place=True,
                                            early_state=True, **extra, **scales)
            k.int8_linear(None, w, m, [(ncols, None)], residual=res, hadamard=(y, s_h))
        return h, res, cs, acc, codes

    want, got = run(False), run(True)
    for name, a, b in zip(("SSM state", "residual", "conv state", "", "x_proj codes"), want, got, strict=True):
        if name == "x_proj codes":
            assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True)), name
        elif name:
            assert torch.equal(a, b), f"{name} differs"
    assert not torch.equal(want[1], res0), "out_proj added nothing"
    if xp:
        assert not got[3].any(), "the sums it read are not zeroed"
    else:
        assert torch.equal(got[3], acc0)


@needs_gpu
@pytest.mark.gpu
def test_update_out_proj_rejects_what_it_does_not_cover(k):
    (u, mask, _, bq, cq, z, A, D, dt_bias), h0, scales = _scan_inputs(1, 1, 96, 16, 3, False)
    lr, wdt, mdt = torch.zeros(1, 1, 16, dtype=torch.int8, device="cuda"), \
        torch.zeros(96, 16, dtype=torch.int8, device="cuda"), torch.ones(96, device="cuda")
    w, m, res = torch.zeros(64, 96, dtype=torch.int8, device="cuda"), torch.ones(64, device="cuda"), \
        torch.zeros(1, 1, 64, device="cuda")
    kw = dict(dt_proj=(lr, wdt, mdt), out_proj=(w, m, 0.02), residual=res, **scales)
    with pytest.raises(k.KernelError, match="d_inner=96 must be a multiple of 128 up to 2048"):
        k.update_out_proj(h0, u, mask, bq, cq, z, A, D, dt_bias, **kw)
    (u, mask, _, bq, cq, z, A, D, dt_bias), h0, scales = _scan_inputs(2, 1, 128, 16, 4, False)
    wdt, mdt = torch.zeros(128, 16, dtype=torch.int8, device="cuda"), torch.ones(128, device="cuda")
    kw = dict(dt_proj=(lr.expand(2, 1, 16).contiguous(), wdt, mdt), out_proj=(w[:, :1].expand(64, 128).contiguous(), m,
              0.02), residual=res, **scales)
    with pytest.raises(k.KernelError, match=r"one token of one sequence .*\(got batch=2"):
        k.update_out_proj(h0, u, mask, bq, cq, z, A, D, dt_bias, **kw)
    (u, mask, _, bq, cq, z, A, D, dt_bias), h0, scales = _scan_inputs(1, 1, 128, 16, 5, False)
    big, mbig = torch.zeros(4096, 128, dtype=torch.int8, device="cuda"), torch.ones(4096, device="cuda")
    kw = dict(dt_proj=(lr, wdt, mdt), out_proj=(big, mbig, 0.02), residual=torch.zeros(1, 1, 4096, device="cuda"),
              **scales)
    with pytest.raises(k.KernelError, match="n=4096 must be at most 2048"):
        k.update_out_proj(h0, u, mask, bq, cq, z, A, D, dt_bias, **kw)
