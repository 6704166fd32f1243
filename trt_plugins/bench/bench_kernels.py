"""Kernel benchmarks on a CUDA GPU (not a test). Writes a markdown table to stdout and --out.

Times (CUDA events, warm-up, rotating input sets, median of --reps) the qmamba kernels, the PyTorch
reference where it is affordable, and reports the fraction of the floor:
floor = max(bytes moved once / measured HBM bandwidth, B*D*L*N exponentials / exp throughput).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess

import torch

from qmamba import cuda as k
from qmamba.ops import ref


def timeit(fn, sets, reps=30, warmup=5) -> float:
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(*sets[i % len(sets)])
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def hbm_bandwidth() -> float:
    x = torch.empty(2 * 1024**3 // 4, device="cuda")
    y = torch.empty_like(x)
    ms = timeit(lambda a, b: b.copy_(a), [(x, y)], reps=20)
    return 2 * x.numel() * 4 / (ms * 1e-3)


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


SCALES = dict(u_scale=0.02, u_outlier_scale=0.2, dt_scale=0.03, B_scale=0.02, C_scale=0.02, z_scale=0.03)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--exp-rate", type=float, default=4.0e12, help="exp2/s (issue's measured H100 figure)")
    args = ap.parse_args()
    bw = hbm_bandwidth()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"device {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, torch {torch.__version__}, "
             f"{datetime.date.today()}, commit {commit or 'n/a'}; measured HBM copy bandwidth "
             f"{bw / 1e12:.2f} TB/s (read + write); exp throughput {args.exp_rate / 1e12:.1f} T/s (issue's "
             f"measurement, not re-measured)", "",
             "| op | shape | ours ms | floor ms | % of floor | PyTorch ref ms |", "|---|---|---|---|---|---|"]
    n = 16
    for d in (1536, 4096, 5120):
        for b in (1, 8):
            for l in (1, 512, 2048, 8192):
                sets = scan_sets(b, l, d, n, 3)
                ms = timeit(lambda *a: k.dual_scale_selective_scan(*a, **SCALES), sets, args.reps)
                by = b * l * d * (1 + 1 + 1 + 1 + 2) + 2 * b * l * n + b * d * n * 4 * 2 + d * n * 4
                floor = max(by / bw, b * d * l * n / args.exp_rate) * 1e3
                refms = ""
                if l <= 1 or (l <= 512 and b == 1 and d == 1536):
                    refms = f"{timeit(lambda *a: ref.dual_scale_selective_scan(*a, **SCALES), sets, 3, 1):.2f}"
                lines.append(f"| scan (int8 dual-scale in, fp16 y) | B{b} D{d} L{l} | {ms:.4f} | {floor:.4f} | "
                             f"{100 * floor / ms:.0f}% | {refms} |")
                print(lines[-1], flush=True)
    for b in (1, 16, 64):
        d = 5120
        sets = scan_sets(b, 1, d, n, 3)
        st = torch.randn(b, d, n, device="cuda")
        ms = timeit(lambda *a, st=st: k.selective_state_update(st, *a, in_place=True, **SCALES), sets, args.reps)
        by = b * d * 6 + b * 2 * n + b * d * n * 4 * 2
        lines.append(f"| state update (decode) | B{b} D{d} | {ms:.4f} | {by / bw * 1e3:.4f} | "
                     f"{100 * by / bw * 1e3 / ms:.0f}% | |")
        print(lines[-1], flush=True)
    for b, l, d in ((1, 2048, 1536), (8, 2048, 5120)):
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randint(-128, 128, (b, l, d), dtype=torch.int8, device="cuda", generator=g)
        w = torch.randint(-128, 128, (d, 4), dtype=torch.int8, device="cuda", generator=g)
        ws, bias = torch.rand(d, device="cuda") * 0.01, torch.randn(d, device="cuda")
        ms = timeit(lambda x_, w=w, ws=ws, bias=bias: k.quant_causal_conv1d(x_, w, ws, bias, 0.03, 0.01, None, 0.05),
                    [(x,)], args.reps)
        by = b * l * d * 3
        lines.append(f"| conv1d + SiLU + dual-scale quant | B{b} D{d} L{l} | {ms:.4f} | {by / bw * 1e3:.4f} | "
                     f"{100 * by / bw * 1e3 / ms:.0f}% | |")
        print(lines[-1], flush=True)
        y = torch.randn(b, l, d, device="cuda", dtype=torch.float16)
        ms = timeit(lambda y_: k.hadamard_quant(y_, 0.01), [(y,)], args.reps)
        by = b * l * d * 3
        lines.append(f"| Hadamard + quant (fp16 in) | B{b} D{d} L{l} | {ms:.4f} | {by / bw * 1e3:.4f} | "
                     f"{100 * by / bw * 1e3 / ms:.0f}% | |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        open(args.out, "w").write(text)


if __name__ == "__main__":
    main()
