"""TensorRT plugins driven through their creators without TensorRT's runtime (trt_plugins/harness).

Needs TensorRT's headers (.deps/tensorrt-*/include or the standard paths) and nvcc + cmake to build; skips
with the reason otherwise. Enqueue tests are marked `gpu` and compare every plugin with qmamba/ops/ref.py on
fresh random inputs with poisoned outputs: integer outputs bit-identical, floats within 1e-5 relative L2.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from plugin_harness import FLOAT, HALF, INT8, NO_HEADERS, TORCH_TO_TRT, UINT8, Harness, build, header_roots

from qmamba.ops import ref
from qmamba.ops.specmath import a_from_a_log

ROOTS = header_roots()
needs_headers = pytest.mark.skipif(not ROOTS, reason=NO_HEADERS)
needs_tools = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is needed to build the plugin library")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: enqueue tests run on the H100")
pytestmark = [needs_headers, needs_tools]


def bit(*codes: int) -> int:
    return sum(1 << c for c in codes)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plugins")
    r = build(ROOTS[-1], out, targets=("qmamba_plugins", "qmamba_plugin_harness"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def harness(built) -> Harness:
    return Harness(built)


@pytest.mark.parametrize("root", ROOTS, ids=[p.name for p in ROOTS])
def test_plugin_library_builds_with_each_tensorrt_header_version(tmp_path, root):
    r = build(root, tmp_path, targets=("qmamba_plugins",))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "libqmamba_plugins.so").is_file()


def test_library_exports_the_dynamic_plugin_abi_and_needs_no_libnvinfer(built):
    lib = str(built / "libqmamba_plugins.so")
    undefined = subprocess.run(["nm", "-D", "-C", "--undefined-only", lib], capture_output=True, text=True,
                               check=True).stdout
    bad = [line for line in undefined.splitlines() if "nvinfer" in line.lower() or "createInfer" in line]
    assert not bad, f"libnvinfer symbols needed: {bad}"
    needed = subprocess.run(["readelf", "-d", lib], capture_output=True, text=True, check=True).stdout
    assert "libnvinfer" not in needed and "libqmamba_kernels" not in needed  # self-contained: kernels linked in
    defined = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in defined.splitlines() if " T " in line}
    assert {"getCreators", "setLoggerFinder"} <= exported


def test_field_fuzzing_under_address_sanitizer(tmp_path):
    r = build(ROOTS[-1], tmp_path, sanitize=True, targets=("qmamba_plugins", "qmamba_plugin_fuzz"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for seed in (1, 2):
        f = subprocess.run([str(tmp_path / "qmamba_plugin_fuzz"), str(tmp_path / "libqmamba_plugins.so"), "20000",
                            str(seed)], capture_output=True, text=True, timeout=600,
                           env={"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "PATH": "/usr/bin:/bin"})
        assert f.returncode == 0, f.stdout + f.stderr[-4000:]
        assert "AddressSanitizer" not in f.stderr and "runtime error" not in f.stderr, f.stderr[-4000:]
        assert "without a logged reason: 0" in f.stdout and "round-trip failures 0" in f.stdout, f.stdout


# --- one case per op: fields, input tensors, documented types per position, reference -----------------------

def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _i8(g, *shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)


def as_y(outs, y16: bool) -> list[torch.Tensor]:
    """(y, state) of a float32 reference, y rounded to float16 when the plugin writes float16."""
    y, h = outs
    return [y.half() if y16 else y, h]


def case(op: str, variant: str, b: int = 2, l: int = 37, seed: int = 0):
    g = _g(seed)
    if op == "RMSNormQuant":
        x, w = torch.randn(b, l, 64, generator=g) * 3, torch.rand(64, generator=g) + 0.5
        fields = {"eps": 1e-5, "scale": 0.02}
        return fields, [x, w], [bit(FLOAT), bit(FLOAT), bit(INT8)], lambda: [ref.rms_norm_quant(x, w, 1e-5, 0.02)]
    if op == "QuantCausalConv1d":
        dual = variant == "dual"
        d, k = 96, 4
        x, w = _i8(g, b, l, d), _i8(g, d, k)
        ws, bias, st = torch.rand(d, generator=g) * 0.01 + 1e-3, torch.randn(d, generator=g), _i8(g, b, d, k - 1)
        fields = {"in_scale": 0.03, "out_scale": 0.01, "outlier_scale": 0.08 if dual else 0.0,
                  "dual_scale": int(dual), "kernel_size": k}
        types = [bit(INT8), bit(INT8), bit(FLOAT), bit(FLOAT), bit(INT8), bit(INT8)] + \
            ([bit(UINT8)] if dual else []) + [bit(INT8)]

        def want():
            u, m, s = ref.quant_causal_conv1d(x, w, ws, bias, 0.03, 0.01, st, 0.08 if dual else None)
            return [u, m, s] if dual else [u, s]
        return fields, [x, w, ws, bias, st], types, want
    if op in ("DualScaleSelectiveScan", "SelectiveStateUpdate", "SelectiveScan"):
        dual = variant.startswith("dual")
        y16 = variant.endswith("fp16")
        if op == "SelectiveStateUpdate":
            l = 1
        d, n = 72, 16
        a_log = torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1)
        a_log += 0.1 * torch.randn(d, n, generator=g)
        A, D = a_from_a_log(a_log), torch.randn(d, generator=g)
        dtb, h0 = torch.rand(d, generator=g) * -4 - 2, torch.randn(b, d, n, generator=g) * 0.1
        ydt = 10 if y16 else 1
        yb = bit(HALF) if y16 else bit(FLOAT)
        if op == "SelectiveScan":
            u, dt, z = (torch.randn(b, l, d, generator=g) for _ in range(3))
            bm, cm = torch.randn(b, l, n, generator=g), torch.randn(b, l, n, generator=g)
            ins = [u, dt, bm, cm, z, A, D, dtb, h0]
            return {"y_dtype": ydt}, ins, [bit(FLOAT)] * 9 + [yb, bit(FLOAT)], \
                lambda: as_y(ref.selective_scan(u, dt, A, bm, cm, D, z, dtb, initial_state=h0), y16)
        u, dt, z = _i8(g, b, l, d), _i8(g, b, l, d), _i8(g, b, l, d)
        mask = (torch.rand(b, l, d, generator=g) < 0.02).to(torch.uint8)
        bm, cm = _i8(g, b, l, n), _i8(g, b, l, n)
        scales = dict(u_scale=0.02, u_outlier_scale=0.2 if dual else 0.0, dt_scale=0.03, B_scale=0.02, C_scale=0.02,
                      z_scale=0.03)
        fields = {**scales, "dual_scale": int(dual), "y_dtype": ydt}
        ins = [u] + ([mask] if dual else []) + [dt, bm, cm, z, A, D, dtb, h0]
        types = [bit(INT8)] + ([bit(UINT8)] if dual else []) + [bit(INT8)] * 4 + [bit(FLOAT)] * 4 + [yb, bit(FLOAT)]
        rs = {**scales, "u_outlier_scale": scales["u_outlier_scale"] or None}
        return fields, ins, types, lambda: as_y(ref.dual_scale_selective_scan(
            u, mask if dual else None, dt, bm, cm, z, A, D, dtb, initial_state=h0, **rs), y16)
    assert op == "HadamardQuant"
    x = torch.randn(b, l, 768, generator=g) * 2
    if variant == "fp16":
        x = x.half()
    return {"scale": 0.01}, [x], [bit(FLOAT, HALF), bit(INT8)], lambda: [ref.hadamard_quant(x.float(), 0.01)]


CASES = [("RMSNormQuant", ""), ("QuantCausalConv1d", "single"), ("QuantCausalConv1d", "dual"),
         ("DualScaleSelectiveScan", "dual"), ("DualScaleSelectiveScan", "single-fp16"),
         ("SelectiveStateUpdate", "dual"), ("SelectiveScan", "fp32"), ("SelectiveScan", "fp16"),
         ("HadamardQuant", "fp32"), ("HadamardQuant", "fp16")]


@pytest.mark.parametrize(("op", "variant"), CASES)
def test_lifecycle_types_shapes_and_formats(harness, op, variant):
    fields, ins, types, want = case(op, variant)
    expected = want()
    r = harness.run(op, fields, ins, len(expected))
    assert r.status == 0, r.message
    assert r.out_shapes == [tuple(t.shape) for t in expected]
    assert r.out_types == [TORCH_TO_TRT[t.dtype] for t in expected]
    assert r.supported == types, f"accepted types per position {r.supported}, documented {types}"
    assert r.workspace >= 0


def test_bad_fields_and_shapes_are_refused_with_the_reason(harness):
    fields, ins, _, _ = case("RMSNormQuant", "")
    r = harness.run("RMSNormQuant", {"eps": 1e-5}, ins, 1)
    assert r.status == -3 and "missing field 'scale'" in r.message
    r = harness.run("RMSNormQuant", {**fields, "scale": -1.0}, ins, 1)
    assert r.status == -3 and "'scale' = -1 is out of range" in r.message
    r = harness.run("RMSNormQuant", {**fields, "bogus": 1}, ins, 1)
    assert r.status == -3 and "unknown field 'bogus'" in r.message
    r = harness.run("RMSNormQuant", {"eps": 1e-5, "scale": 3}, ins, 1)  # INT where FLOAT is declared
    assert r.status == -3 and "has type INT32, expected FLOAT32" in r.message
    r = harness.run("RMSNormQuant", fields, [ins[0], torch.ones(63)], 1)
    assert r.status == -9 and "weight [63] does not match d_model" in r.message
    fields, ins, _, _ = case("QuantCausalConv1d", "dual")
    r = harness.run("QuantCausalConv1d", {**fields, "outlier_scale": 0.0}, ins, 3)
    assert r.status == -3 and "dual_scale=1 needs outlier_scale > 0" in r.message
    fields, ins, _, _ = case("DualScaleSelectiveScan", "dual")
    r = harness.run("DualScaleSelectiveScan", {**fields, "y_dtype": 7}, ins, 2)
    assert r.status == -3 and "y_dtype must be 1 (float32) or 10 (float16)" in r.message
    wide_mask = [ins[0], ins[1].unsqueeze(-1).repeat(1, 1, 1, 2), *ins[2:]]  # [B, L, D, 2]: not U's shape
    r = harness.run("DualScaleSelectiveScan", fields, wide_mask, 2)
    assert r.status == -9 and "U_mask [B, L, D]" in r.message and "U_mask [" in r.message.split("got")[1], r.message
    fields, ins, _, _ = case("SelectiveStateUpdate", "dual", l=1)
    long = [t.repeat(1, 3, 1) if t.dim() == 3 and t.shape[1] == 1 else t for t in ins]
    r = harness.run("SelectiveStateUpdate", fields, long, 2)
    assert r.status == -9 and "L = 1" in r.message
    x = torch.randn(1, 2, 36)
    r = harness.run("HadamardQuant", {"scale": 0.1}, [x], 1)
    assert r.status == -9 and "D = 36 has no spec Hadamard matrix" in r.message


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("op", "variant"), CASES)
@pytest.mark.parametrize(("b", "l"), [(1, 1), (3, 2049)])
def test_enqueue_matches_reference(harness, op, variant, b, l):
    fields, ins, _, want = case(op, variant, b=b, l=l, seed=b * 1000 + l)
    expected = want()
    cuda_in = [t.cuda() for t in ins]
    outs = []
    for t in expected:  # poisoned outputs: NaN for floats, 0x55 bytes for integers
        o = torch.empty(t.shape, dtype=t.dtype, device="cuda")
        o.fill_(float("nan")) if t.is_floating_point() else o.fill_(0x55)
        outs.append(o)
    r = harness.run(op, fields, cuda_in, len(expected), outputs=outs)
    assert r.status == 0, r.message
    for got, w in zip(outs, expected, strict=True):
        got = got.cpu()
        if w.is_floating_point():
            tol = 2e-3 if w.dtype == torch.float16 else 1e-5
            rel = ((got.float() - w.float()).norm() / w.float().norm().clamp_min(1e-30)).item()
            assert rel <= tol, f"{op} {variant}: relative L2 {rel:.2e}"
        else:
            assert torch.equal(got, w), f"{op} {variant}: integer output differs"
