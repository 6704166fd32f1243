"""Kernel benchmarks on a CUDA GPU (not a test). Writes a markdown table to stdout and --out.

Times (CUDA events, warm-up, rotating input sets, median of --reps) the qmamba kernels and the PyTorch reference
(qmamba.ops.ref, eager: see ref_ms), and reports the fraction of the floor:
floor = max(bytes moved once / measured HBM bandwidth, B*D*L*N exponentials / exp throughput).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from qmamba import cuda as k
from qmamba.ops import ref


def timeit(fn, sets, reps=30, warmup=5, calls=10, graph: bool = True) -> float:
    """Median GPU time of one call, in ms. The calls are captured in a CUDA graph (`calls` per replay, inputs
    rotating over `sets`) so that Python and launch overhead do not count; falls back to eager launches
    (each timed with events) for functions that cannot be captured or when graph=False."""
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    try:
        if not graph:
            raise RuntimeError("eager timing requested")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                fn(*sets[i % len(sets)])
        graph.replay()
        torch.cuda.synchronize()
    except RuntimeError:
        graph = None
    times = []
    for i in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        if graph is not None:
            graph.replay()
        else:
            fn(*sets[i % len(sets)])
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / (calls if graph is not None else 1))
    return statistics.median(times)


def ref_ms(fn, sets, seqlen: int) -> str:
    """The PyTorch reference's time for a table row, in ms: eager calls timed with events (Python and launches
    included: it is how the reference runs), median of 3 after one warm-up; one call without warm-up from L = 2048,
    where its per-step Python loop takes seconds."""
    long = seqlen >= 2048
    return f"{timeit(fn, sets, 1 if long else 3, 0 if long else 1, graph=False):.2f}"


def hbm_bandwidth() -> float:
    x = torch.empty(2 * 1024**3 // 4, device="cuda")
    y = torch.empty_like(x)
    ms = timeit(lambda a, b: b.copy_(a), [(x, y)], reps=20, graph=False)
    return 2 * x.numel() * 4 / (ms * 1e-3)


def launch_floor() -> float:
    """ms per call of a kernel that moves 4 bytes (`add_` on one float), timed like the kernels (timeit, calls in a
    CUDA graph): no kernel timed here can take less, whatever its floor says (the decode rows at B1)."""
    x = torch.zeros(1, device="cuda")
    return timeit(lambda t: t.add_(1.0), [(x,)], reps=30)


def exp_throughput() -> float:
    """exp2/s of this GPU, from trt_plugins/bench/exp_throughput.cu (built here with nvcc)."""
    src = Path(__file__).with_name("exp_throughput.cu")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "exp_throughput"
        subprocess.run(["nvcc", "-O3", "-gencode", "arch=compute_90,code=sm_90", str(src), "-o", str(exe)], check=True)
        return float(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout)


def import_mamba_ssm(build_dir: str | None):
    """mamba_ssm's selective_scan_cuda if importable (installed, or a local build dir); else (None, reason)."""
    if build_dir:
        sys.path.insert(0, build_dir)
    try:
        return importlib.import_module("selective_scan_cuda"), ""
    except ImportError as e:
        return None, f"selective_scan_cuda not importable ({e})"


def mamba_ssm_sets(sets):
    """The same problems in mamba_ssm's fp16 layout: u/delta/z [B, D, L], B/C [B, 1 group, N, L]."""
    out = []
    for u, _mask, dt, bm, cm, z, A, D, dtb in sets:
        def chan(x, s):
            return (x.float() * s).transpose(1, 2).contiguous().half()
        out.append((chan(u, 0.02), chan(dt, 0.03), A, chan(bm, 0.02).unsqueeze(1), chan(cm, 0.02).unsqueeze(1), D,
                    chan(z, 0.03), dtb))
    return out


def scan_sets(b, l, d, n, count):
    sets = []
    for i in range(count):
        g = torch.Generator(device="cuda").manual_seed(i)
        i8 = dict(dtype=torch.int8, device="cuda", generator=g)
        u, dt, z = (torch.randint(-128, 128, (b, l, d), **i8) for _ in range(3))
        mask = (torch.rand(b, l, d, device="cuda", generator=g) < 0.001).to(torch.uint8)
        bm, cm = torch.randint(-128, 128, (b, l, n), **i8), torch.randint(-128, 128, (b, l, n), **i8)
        A = -torch.rand(d, n, device="cuda", generator=g) - 0.1
        D, dtb = torch.randn(d, device="cuda", generator=g), torch.rand(d, device="cuda", generator=g) * -4 - 2
        sets.append((u, mask, dt, bm, cm, z, A, D, dtb))
    return sets


def channel_major_sets(sets):
    """The same problems with u, mask, dt, z channel-major ([B, D, L])."""
    cm = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731
    return [(cm(u), cm(mask), cm(dt), bm, cmat, cm(z), *rest) for u, mask, dt, bm, cmat, z, *rest in sets]


SCALES = dict(u_scale=0.02, u_outlier_scale=0.2, dt_scale=0.03, B_scale=0.02, C_scale=0.02, z_scale=0.03)


SIZES = {"130m": (768, 1536, 48), "1.4b": (2048, 4096, 128), "2.8b": (2560, 5120, 160)}  # d_model, d_inner, dt_rank


def decode_linears(ops: set[str], bw: float, reps: int, sizes: tuple[str, ...] = tuple(SIZES)) -> list[str]:
    """Decode-step GEMVs at model sizes: in_proj with the fused RMSNormQuant, x_proj (3 int8 segments), out_proj
    (+ residual) and the tied int8 logits. Enough weight copies rotate that they never sit in the 50 MB L2 (as in a
    real decode step, where 24-64 layers' weights pass through it)."""
    from qmamba.ops.specmath import scale_product

    out = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for size in sizes:
        dm, di, r = SIZES[size]
        shapes = []
        if "linear" in ops:
            shapes += [("in_proj + RMSNormQuant", dm, 2 * di, [(di, 0.1), (di, 0.1)], "norm"),
                       ("x_proj", di, r + 32, [(r, 0.1), (16, 0.1), (16, 0.1)], "x"),
                       ("out_proj + residual", di, dm, [(dm, None)], "residual")]
        if "logits" in ops:
            shapes.append(("tied logits (int8 table)", dm, 50280, None, "logits"))
        for name, kdim, n, segs, kind in shapes:
            copies = max(3, -(-150_000_000 // (n * kdim)))
            ws = [torch.randint(-128, 128, (n, kdim), dtype=torch.int8, device="cuda", generator=g)
                  for _ in range(copies)]
            wscale = torch.rand(n, device="cuda") * 0.01 + 1e-3
            m_in = scale_product(0.05, wscale.cpu()).cuda()
            for rows in (1, 4):
                x = torch.randint(-128, 128, (rows, kdim), dtype=torch.int8, device="cuda", generator=g)
                xf = torch.randn(rows, kdim, device="cuda")
                nw = torch.rand(kdim, device="cuda") + 0.5
                res = torch.randn(rows, n, device="cuda")
                if kind == "logits":
                    fn = lambda w_, xf=xf, s_=wscale: k.tied_logits(xf, w_, s_)  # noqa: E731
                elif kind == "norm":
                    fn = lambda w_, xf=xf, nw=nw, m=m_in, sg=segs: k.int8_linear(  # noqa: E731
                        None, w_, m, sg, norm=(xf, nw, 1e-5, 0.05))
                elif kind == "residual":
                    fn = lambda w_, x=x, m=m_in, sg=segs, res=res: k.int8_linear(x, w_, m, sg, residual=res)  # noqa: E731
                else:
                    fn = lambda w_, x=x, m=m_in, sg=segs: k.int8_linear(x, w_, m, sg)  # noqa: E731
                ms = timeit(fn, [(w_,) for w_ in ws], reps)
                floor = n * kdim / bw * 1e3
                out.append(f"| decode {name} | {size} B{rows} K{kdim} N{n} | {ms:.4f} | {floor:.4f} | "
                           f"{100 * floor / ms:.0f}% | | | |")
                print(out[-1], flush=True)
            del ws
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--exp-rate", type=float, default=None, help="exp2/s; default: measured (exp_throughput.cu)")
    ap.add_argument("--ops", default="scan,update,conv,hadamard",
                    help="which kernels to time, comma list of scan, update, conv, hadamard, linear, logits")
    ap.add_argument("--mamba-ssm-build", default=None, help="directory holding a built selective_scan_cuda module")
    args = ap.parse_args()
    bw = hbm_bandwidth()
    launch_ms = launch_floor()
    measured_exp = args.exp_rate is None
    if measured_exp:
        args.exp_rate = exp_throughput()
    mssm, why = import_mamba_ssm(args.mamba_ssm_build)
    # "-dirty" marks a working tree that differs from its commit (e.g. a copy sent to a GPU machine)
    git = ["git", "describe", "--always", "--dirty", "--abbrev=7"]
    commit = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    lines = [f"device {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, torch {torch.__version__}, "
             f"{datetime.date.today()}, commit {commit or 'n/a'}; measured HBM copy bandwidth "
             f"{bw / 1e12:.2f} TB/s (read + write); exp2 throughput {args.exp_rate / 1e12:.2f} T/s "
             f"({'measured: exp_throughput.cu, best of 10' if measured_exp else 'given with --exp-rate'}); "
             f"launch floor {launch_ms * 1e3:.2f} us (a 4-byte kernel in the same harness); "
             f"mamba_ssm: {'selective_scan_cuda.fwd, fp16, z + delta_bias + softplus' if mssm else why}; "
             "PyTorch ref: qmamba.ops.ref run eagerly (Python and launches included), median of 3, one call from "
             "L = 2048", "",
             "| op | shape | ours ms | floor ms | % of floor | mamba_ssm fp16 ms | speed-up | PyTorch ref ms |",
             "|---|---|---|---|---|---|---|---|"]
    scan_lines = ["", "Scan inputs u, dt, z, mask channel-major ([B, D, L], `channel_major=True`: mamba_ssm's own "
                  "layout; B, C, y as above)", "",
                  "| op | shape | ours channel-major ms | % of floor | mamba_ssm fp16 ms | speed-up |",
                  "|---|---|---|---|---|---|"]
    n = 16
    ops = set(args.ops.split(","))
    for d in (1536, 4096, 5120) if "scan" in ops else ():
        for b in (1, 8):
            for l in (1, 512, 2048, 8192):
                sets = scan_sets(b, l, d, n, 3)
                ms = timeit(lambda *a: k.dual_scale_selective_scan(*a, y_dtype=torch.float16, **SCALES), sets,
                            args.reps)
                by = b * l * d * (1 + 1 + 1 + 1 + 2) + 2 * b * l * n + b * d * n * 4 * 2 + d * n * 4
                floor = max(by / bw, b * d * l * n / args.exp_rate) * 1e3
                mms = speed = ""
                refms = ref_ms(lambda *a: ref.dual_scale_selective_scan(*a, **SCALES), sets, l)
                if mssm is not None:
                    m = timeit(lambda *a: mssm.fwd(*a, True), mamba_ssm_sets(sets), args.reps)
                    mms, speed = f"{m:.4f}", f"{m / ms:.2f}x"
                lines.append(f"| scan (int8 dual-scale in, fp16 y) | B{b} D{d} L{l} | {ms:.4f} | {floor:.4f} | "
                             f"{100 * floor / ms:.0f}% | {mms} | {speed} | {refms} |")
                print(lines[-1], flush=True)
                if l > 1:  # one step: both layouts are the same
                    cms = timeit(lambda *a: k.dual_scale_selective_scan(*a, channel_major=True, y_dtype=torch.float16,
                                                                    **SCALES),
                                 channel_major_sets(sets), args.reps)
                    cspeed = f"{float(mms) / cms:.2f}x" if mms else ""
                    scan_lines.append(f"| scan (int8 dual-scale in, fp16 y) | B{b} D{d} L{l} | {cms:.4f} | "
                                      f"{100 * floor / cms:.0f}% | {mms} | {cspeed} |")
                    print(scan_lines[-1], flush=True)
    for d, b in ((1536, 1), (1536, 16), (1536, 64), (5120, 1), (5120, 16), (5120, 64)) if "update" in ops else ():
        # one state per input set, 3 sets: at B64 D5120 they (63 MB) exceed the 50 MB L2, as in serving
        sets = [(torch.randn(b, d, n, device="cuda"), *s) for s in scan_sets(b, 1, d, n, 3)]
        ms = timeit(lambda st, *a: k.selective_state_update(st, *a, in_place=True, **SCALES), sets, args.reps)
        refms = ref_ms(lambda st, *a: ref.selective_state_update(st, *a, **SCALES), sets, 1)
        by = b * d * 6 + b * 2 * n + b * d * n * 4 * 2 + d * n * 4
        lines.append(f"| state update (decode) | B{b} D{d} | {ms:.4f} | {by / bw * 1e3:.4f} | "
                     f"{100 * by / bw * 1e3 / ms:.0f}% | | | {refms} |")
        print(lines[-1], flush=True)
    for b, l, d in ((1, 2048, 1536), (8, 2048, 1536), (8, 2048, 4096), (8, 2048, 5120)):
        g = torch.Generator(device="cuda").manual_seed(0)
        if "conv" in ops:  # 3 rotating input sets
            xs = [(torch.randint(-128, 128, (b, l, d), dtype=torch.int8, device="cuda", generator=g),)
                  for _ in range(3)]
            w = torch.randint(-128, 128, (d, 4), dtype=torch.int8, device="cuda", generator=g)
            ws, bias = torch.rand(d, device="cuda") * 0.01, torch.randn(d, device="cuda")
            ms = timeit(lambda x_, w=w, ws=ws, bias=bias: k.quant_causal_conv1d(x_, w, ws, bias, 0.03, 0.01, None,
                                                                                0.05), xs, args.reps)
            refms = ref_ms(lambda x_, w=w, ws=ws, bias=bias: ref.quant_causal_conv1d(x_, w, ws, bias, 0.03, 0.01, None,
                                                                                     0.05), xs, 1)
            by = b * l * d * 3  # int8 x in, int8 u + uint8 mask out
            lines.append(f"| conv1d + SiLU + dual-scale quant | B{b} D{d} L{l} | {ms:.4f} | {by / bw * 1e3:.4f} | "
                         f"{100 * by / bw * 1e3 / ms:.0f}% | | | {refms} |")
            print(lines[-1], flush=True)
        if "hadamard" not in ops:
            continue
        ys = [(torch.randn(b, l, d, device="cuda", dtype=torch.float16),) for _ in range(3)]
        ms = timeit(lambda y_: k.hadamard_quant(y_, 0.01), ys, args.reps)
        refms = ref_ms(lambda y_: ref.hadamard_quant(y_, 0.01), ys, 1)
        by = b * l * d * 3
        lines.append(f"| Hadamard + quant (fp16 in) | B{b} D{d} L{l} | {ms:.4f} | {by / bw * 1e3:.4f} | "
                     f"{100 * by / bw * 1e3 / ms:.0f}% | | | {refms} |")
        print(lines[-1], flush=True)
    if "linear" in ops or "logits" in ops:
        lines += decode_linears(ops, bw, args.reps)
    if "scan" in ops:
        lines += scan_lines
    text = "\n".join(lines) + "\n"
    if args.out:
        open(args.out, "w").write(text)


if __name__ == "__main__":
    main()
