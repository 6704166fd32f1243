"""A/B of several builds of libqmamba_kernels.so in one process (not a test): the measurement behind every
"Outcome" in NOTES.md. The builds alternate within each round, so clock and thermal drift fall on all of them
alike; every build's outputs are compared bit for bit with the first build's.

    python3 trt_plugins/bench/ab_builds.py --lib head=build/trt_plugins/libqmamba_kernels.so \\
        --lib variant=/tmp/variant/libqmamba_kernels.so --op scan --shapes 8x1536x2048,1x5120x512 --rounds 3

Shapes are BxDxL (update: BxD). Times are ms per call from bench_kernels.timeit (CUDA graph of 10 calls over 3
input sets, median of --reps replays). Build a variant with `trt_plugins/kernels/build.sh OUT_DIR [ARCH_FLAGS]`.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # bench_kernels, and qmamba from this checkout
from bench_kernels import SCALES, channel_major_sets, scan_sets, timeit  # noqa: E402

from qmamba import cuda as k  # noqa: E402

OPS = ("scan", "scan-cm", "update", "conv", "hadamard")


def parse_libs(specs: list[str]) -> list[tuple[str, Path]]:
    libs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--lib {spec!r}: expected NAME=PATH_TO_libqmamba_kernels.so")
        if not Path(path).is_file():
            raise SystemExit(f"--lib {spec!r}: {path} is not a file")
        if name in (n for n, _ in libs):
            raise SystemExit(f"--lib {spec!r}: the name {name!r} is given twice")
        libs.append((name, Path(path)))
    if len(libs) < 2:
        raise SystemExit("give at least two --lib NAME=PATH builds to compare")
    return libs


def parse_shapes(text: str, op: str) -> list[tuple[int, ...]]:
    dims = 2 if op == "update" else 3
    shapes = []
    for s in text.split(","):
        parts = s.strip().split("x")
        if len(parts) != dims or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"--shapes: {s!r} is not {'BxD' if dims == 2 else 'BxDxL'} with positive integers")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def problem(op: str, shape: tuple[int, ...]) -> tuple[Callable, list[tuple]]:
    """The call to time and its 3 input sets; the call returns the tensors compared across builds."""
    n = 16
    if op in ("scan", "scan-cm"):
        b, d, l = shape
        sets = scan_sets(b, l, d, n, 3)
        cm = op == "scan-cm"
        if cm:
            sets = channel_major_sets(sets)
        h0 = torch.randn(b, d, n, device="cuda") * 0.1  # a start state, so the state path is compared too
        return (lambda *a: k.dual_scale_selective_scan(*a, initial_state=h0, y_dtype=torch.float16,
                                                       channel_major=cm, **SCALES)), sets
    if op == "update":
        b, d = shape
        sets = [(torch.randn(b, d, n, device="cuda"), *s) for s in scan_sets(b, 1, d, n, 3)]
        return (lambda st, *a: k.selective_state_update(st, *a, **SCALES)), sets
    b, d, l = shape
    g = torch.Generator(device="cuda").manual_seed(b * d + l)
    if op == "conv":
        w = torch.randint(-128, 128, (d, 4), dtype=torch.int8, device="cuda", generator=g)
        ws, bias = torch.rand(d, device="cuda", generator=g) * 0.01 + 1e-4, torch.randn(d, device="cuda", generator=g)
        sets = [(torch.randint(-128, 128, (b, l, d), dtype=torch.int8, device="cuda", generator=g),) for _ in range(3)]
        return (lambda x: k.quant_causal_conv1d(x, w, ws, bias, 0.03, 0.01, None, 0.05)), sets
    sets = [(torch.randn(b, l, d, device="cuda", dtype=torch.float16, generator=g) * 2,) for _ in range(3)]
    return (lambda x: k.hadamard_quant(x, 0.01)), sets


def as_tensors(out) -> list[torch.Tensor]:
    return [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]


def same_bits(outs: list[list[torch.Tensor]]) -> str:
    """'yes' or 'NO' for each build after the first: all its outputs equal the first build's, bit for bit."""
    def equal(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.dtype == b.dtype and a.shape == b.shape and bool(
            (a.contiguous().view(torch.uint8) == b.contiguous().view(torch.uint8)).all())

    return " ".join("yes" if len(o) == len(outs[0]) and all(map(equal, o, outs[0])) else "NO" for o in outs[1:])


def compare(libs: list[tuple[str, ctypes.CDLL]], op: str, shapes: list[tuple[int, ...]], rounds: int,
            reps: int) -> list[str]:
    lines = [f"| {op} shape | " + " | ".join(n for n, _ in libs) + " | same bits as the first |",
             "|---" * (len(libs) + 2) + "|"]
    print("\n".join(lines), flush=True)
    for shape in shapes:
        fn, sets = problem(op, shape)
        times: dict[str, list[float]] = {n: [] for n, _ in libs}
        outs = []
        for r in range(rounds + 1):
            for name, lib in libs:
                with k.use_library(lib):
                    if r == rounds:  # after the timing: one call on fresh copies of set 0, kept for the comparison
                        outs.append(as_tensors(fn(*(t.clone() for t in sets[0]))))
                    else:
                        times[name].append(timeit(fn, sets, reps))
        same = same_bits(outs)
        cells = " | ".join(" / ".join(f"{t:.4f}" for t in times[n]) for n, _ in libs)
        lines.append(f"| {'x'.join(map(str, shape))} | {cells} | {same} |")
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", action="append", default=[], metavar="NAME=PATH", help="a build; two or more")
    ap.add_argument("--op", choices=OPS, required=True)
    ap.add_argument("--shapes", required=True, help="comma list of BxDxL (update: BxD)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", help="also write the table here")
    args = ap.parse_args(argv)
    specs, shapes = parse_libs(args.lib), parse_shapes(args.shapes, args.op)
    if args.rounds < 1 or args.reps < 1:
        raise SystemExit("--rounds and --reps must be at least 1")
    if not torch.cuda.is_available():
        raise SystemExit("ab_builds.py times kernels on a CUDA GPU; none is visible here")
    libs = [(name, k.load_library(path, build=False)) for name, path in specs]
    lines = compare(libs, args.op, shapes, args.rounds, args.reps)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
