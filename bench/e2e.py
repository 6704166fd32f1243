"""End-to-end benchmark of the torch backend on a GPU (a script, not a test): writes a markdown table.

For the shipped tiny model and random-weight models at mamba-130m / 1.4b / 2.8b sizes (w8a8-dualscale,
calibrated on a few random tokens): prefill tokens/s (B=1, L=2048), decode ms/token at B in {1, 16, 64}
(one CUDA-graph replay of a decode step, CUDA events, median), GPU memory of weights and of one sequence's
state; next to the fp16 float model of this project (qmamba.model.MambaLM, the HF layout, checked against
transformers.MambaForCausalLM on CPU in tests/test_hf_equivalence.py) and transformers itself where it can
be imported. The decode floor is the int8 weight bytes over the measured HBM bandwidth.

    PYTHONPATH=. python3 bench/e2e.py --out e2e.md [--sizes tiny,130m,1.4b,2.8b]

Diagnostics (each prints one table and exits): --profile-decode SIZE:B (per-kernel times of an eager step),
--stage-costs SIZE:B (what each stage costs inside the captured chain), --compare-libs LIB,LIB,... (the decode
step with each build of the kernel library, alternating, in one process: before/after comparisons).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import math
import statistics
import subprocess
import time

import torch

from qmamba import cuda as kernels
from qmamba.config import MambaConfig
from qmamba.model.checkpoint import load_model
from qmamba.model.mamba import MambaLM
from qmamba.quant.calibrate import CalibOptions, calibrate
from qmamba.quant.recipes import get_recipe
from qmamba.runtime.cuda_model import CudaOps, CudaQuantModel, _DecodeGraph

SIZES = {"130m": (768, 24), "1.4b": (2048, 48), "2.8b": (2560, 64)}


def events_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e))
    return statistics.median(out)


def hbm_bandwidth() -> float:
    x = torch.empty(2 * 1024**3 // 4, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / (events_ms(lambda: y.copy_(x), 10) * 1e-3)


def float_model(size: str) -> MambaLM:
    if size == "tiny":
        return load_model("models/qmamba-tiny")
    d, n = SIZES[size]
    cfg = MambaConfig(d_model=d, n_layer=n, vocab_size=50280, dt_rank=math.ceil(d / 16))
    return MambaLM(cfg).init_weights(0).eval()


def quantized(fm: MambaLM):
    """The w8a8-dualscale model of fm, calibrated on a few random tokens (a fixed seed)."""
    calib = torch.randint(0, fm.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    return calibrate(fm, get_recipe("w8a8-dualscale"), calib, CalibOptions(), progress=False)


def transformers_baseline(cfg: MambaConfig):
    try:
        tr = importlib.import_module("transformers")
    except ImportError as e:
        return None, f"transformers not importable here ({e})"
    hf = tr.MambaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                        state_size=cfg.d_state, expand=cfg.expand, conv_kernel=cfg.d_conv)
    return tr.MambaForCausalLM(hf).half().cuda().eval(), ""


@torch.no_grad()
def bench_size(size: str, bw: float, prefill_len: int, with_hf: bool) -> list[str]:
    rows = []
    t0 = time.time()
    fm = float_model(size)
    q = quantized(fm)
    setup_s = time.time() - t0
    cfg = fm.cfg
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    gpu = CudaQuantModel(q)
    torch.cuda.synchronize()
    weight_bytes = torch.cuda.memory_allocated() - base
    # bytes a decode step must read: every layer's int8 weights and the int8 tied table (the logits read all of it)
    int8_bytes = sum(lyr.in_proj.weight_q.numel() + lyr.x_proj.weight_q.numel() + lyr.dt_proj.weight_q.numel() +
                     lyr.out_proj.weight_q.numel() for lyr in gpu.model.layers) + gpu.model.embedding.weight_q.numel()
    fp16_bytes = 2 * sum(p.numel() for p in fm.parameters())
    state_bytes = sum(s.conv.numel() * s.conv.element_size() + s.ssm.numel() * 4 for s in gpu.init_states(1))
    ids = torch.randint(0, cfg.vocab_size, (1, prefill_len), device="cuda")
    pre_ms = events_ms(lambda: gpu(ids), reps=5, warmup=1)
    decode = {}
    for b in (1, 16, 64):
        g = _DecodeGraph(gpu, b)
        decode[b] = events_ms(g.graph.replay, reps=30)
        del g
    # fp16 float baseline (this project's HF-layout model; fast float32-internal path)
    fm16 = fm.half().cuda()
    base_pre = events_ms(lambda: fm16(ids, fast=True), reps=3, warmup=1)
    base_dec = {}
    for b in (1, 16, 64):
        tok = torch.zeros(b, 1, dtype=torch.long, device="cuda")
        _, st = fm16(tok, fast=True)  # states in the float model's own layout
        base_dec[b] = events_ms(lambda tok=tok, st=st: fm16(tok, st, fast=True), reps=10)
    hf, why = transformers_baseline(cfg) if with_hf else (None, "not run at this size (--hf-sizes)")
    hf_row = f"| {size} | transformers.MambaForCausalLM fp16 | {why} | | | | | | |"
    if hf is not None:
        hf_pre = events_ms(lambda: hf(ids), reps=3, warmup=1)
        hf_dec = {}
        for b in (1, 16, 64):
            prompt = torch.zeros(b, 8, dtype=torch.long, device="cuda")

            def gen(n: int, prompt=prompt) -> None:
                hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            hf_dec[b] = (events_ms(lambda gen=gen: gen(17), reps=3, warmup=1) -
                         events_ms(lambda gen=gen: gen(1), reps=3, warmup=1)) / 16
        hf_row = (f"| {size} | transformers.MambaForCausalLM fp16 (generate; slow path without mamba_ssm) | "
                  f"{prefill_len / (hf_pre * 1e-3):,.0f} | {hf_dec[1]:.3f} | {hf_dec[16]:.3f} | {hf_dec[64]:.3f} | "
                  f"{2 * sum(p.numel() for p in hf.parameters()) / 2**20:,.1f} MiB | | |")
        del hf
    floor = int8_bytes / bw * 1e3
    rows.append(f"| {size} | ours (w8a8-dualscale, kernels + int8 GEMM + CUDA graphs) | "
                f"{prefill_len / (pre_ms * 1e-3):,.0f} | {decode[1]:.3f} | {decode[16]:.3f} | {decode[64]:.3f} | "
                f"{weight_bytes / 2**20:,.1f} MiB ({100 * weight_bytes / fp16_bytes:.0f}% of fp16) | "
                f"{state_bytes / 2**10:,.0f} KiB | {floor:.3f} |")
    rows.append(f"| {size} | fp16 float model (qmamba.model.MambaLM, eager) | "
                f"{prefill_len / (base_pre * 1e-3):,.0f} | {base_dec[1]:.3f} | {base_dec[16]:.3f} | "
                f"{base_dec[64]:.3f} | {fp16_bytes / 2**20:,.1f} MiB | | |")
    rows.append(hf_row)
    print(f"{size}: set-up (init + calibration on CPU) {setup_s:.0f} s", flush=True)
    return rows


@torch.no_grad()
def profile_decode(size: str, batch: int) -> str:
    """Per-kernel GPU time of one eager decode step (torch.profiler): where a graph replay's time goes."""
    gpu = CudaQuantModel(quantized(float_model(size)))
    ids = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
    states = gpu.init_states(batch)
    for _ in range(3):
        gpu(ids, states, in_place=True)
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        gpu(ids, states, in_place=True)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by: dict[str, list[float]] = {}
    for e in kernels:
        by.setdefault(e.name[:90], []).append(e.device_time)
    lines = [f"## decode step, {size} B{batch}: {len(kernels)} kernels, "
             f"{sum(sum(v) for v in by.values()) / 1e3:.3f} ms of kernel time", "",
             "| kernel | calls | total us | mean us |", "|---|---|---|---|"]
    for name, ts in sorted(by.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"| `{name}` | {len(ts)} | {sum(ts):.1f} | {sum(ts) / len(ts):.2f} |")
    return "\n".join(lines) + "\n"


def ops_like(plain: CudaOps, **kw) -> CudaOps:
    """Decode ops (states in place) sharing `plain`'s cached scales, multipliers and A: a variant to time."""
    ops = CudaOps(plain.device, in_place_states=True, **kw)
    ops._scales, ops._mult, ops._A = plain._scales, plain._mult, plain._A
    return ops


def time_steps(gpu: CudaQuantModel, name: str, batches: tuple[int, ...],
               times: dict[tuple[str, int], list[float]]) -> None:
    """One round: the captured decode step's replay (median of 100) at each batch size, added to times[name, b]."""
    for b in batches:
        g = _DecodeGraph(gpu, b)
        times.setdefault((name, b), []).append(events_ms(g.graph.replay, reps=100))
        del g


def step_table(title: str, label: str, names: list[str], times: dict[tuple[str, int], list[float]],
               batches: tuple[int, ...], code: bool = False) -> str:
    """One row per variant, one column per batch size: the decode step's ms of each round."""
    lines = [title, "", f"| {label} | " + " | ".join(f"B{b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for name in names:
        shown = f"`{name}`" if code else name
        lines.append(f"| {shown} | " + " | ".join(" / ".join(f"{t:.4f}" for t in times[(name, b)])
                                                  for b in batches) + " |")
    return "\n".join(lines) + "\n"


STAGES = ("in_proj_conv_x_proj", "norm_linear_quant", "conv", "conv_x_proj", "linear_quant", "dt_proj_scan",
          "hadamard_quant", "linear_add", "hadamard_linear_add", "logits", "norm_logits")


@torch.no_grad()
def stage_costs(size: str, batch: int, reps: int = 200) -> str:
    """What each decode stage costs inside the captured PDL chain: the graph replay with that stage's op run twice
    (so its kernel is launched twice per layer) minus the plain replay, per call. An eager profile cannot say
    this: a PDL kernel's measured time includes its wait on the kernel before it."""
    gpu = CudaQuantModel(quantized(float_model(size)))
    plain = gpu.in_place_ops

    def replay_ms() -> float:
        g = _DecodeGraph(gpu, batch)
        t = statistics.median(events_ms(g.graph.replay, reps=reps) for _ in range(3))
        del g
        return t

    base = [replay_ms()]
    measured: list[tuple[str, float, int]] = []  # (op, replay ms, calls per step)
    for name in STAGES:
        ops = ops_like(plain)
        calls = [0]
        orig = getattr(ops, name)

        def twice(*a, orig=orig, calls=calls, **kw):
            calls[0] += 1
            orig(*a, **kw)
            return orig(*a, **kw)
        setattr(ops, name, twice)  # the instance attribute shadows the method
        gpu.in_place_ops = ops
        t = replay_ms()
        gpu.in_place_ops = plain
        measured.append((name, t, calls[0] // 3))  # _DecodeGraph runs two warm-up steps and the captured one
    base.append(replay_ms())
    b = statistics.mean(base)
    lines = [f"## decode stage costs, {size} B{batch} (graph replay with one stage doubled, minus the plain replay)",
             "", "| stage op | calls per step | replay ms | us per call |", "|---|---|---|---|"]
    lines += [f"| `{name}` | {n} | {t:.4f} | {(t - b) * 1e3 / max(n, 1):.2f} |" for name, t, n in measured]
    lines.append(f"| (plain, before and after) | | {base[0]:.4f} / {base[1]:.4f} | |")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def compare_libs(size: str, libs: list[str], batches: tuple[int, ...] = (1, 16, 64), rounds: int = 2) -> str:
    """Decode step time (graph replay, median of 100) with each build of libqmamba_kernels.so, in one process on
    one model: the graph is captured again with each library's kernels, the libraries alternating."""
    gpu = CudaQuantModel(quantized(float_model(size)))
    handles = [kernels.load_library(p, build=False) for p in libs]
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for path, lib in zip(libs, handles, strict=True):
            kernels._lib = lib
            time_steps(gpu, path, batches, times)
    return step_table(f"## decode step by library build, {size} (ms per step, graph replay; rounds alternate the "
                      "builds)", "library", libs, times, batches, code=True)


def emit(text: str, out: str | None) -> None:
    print(text, flush=True)
    if out:
        open(out, "w").write(text)


# decode-op variants of --compare-fusions: CudaOps keyword arguments
FUSIONS = {"fused": {}, "conv-in-x_proj": {"fuse_x_proj_behind": False},
           "conv-separate": {"fuse_x_proj_behind": False, "fuse_conv": False},
           "hadamard-separate": {"fuse_hadamard": False},
           "final-norm-separate": {"fuse_final_norm": False},
           "torch-embedding": {"embedding_kernel": False},
           "residual-after-wait": {"early_residual": False},
           "update-then-out_proj": {"fuse_update_out_proj": False},
           "all-separate": {"fuse_x_proj_behind": False, "fuse_conv": False, "fuse_hadamard": False,
                            "fuse_final_norm": False, "embedding_kernel": False}}


@torch.no_grad()
def compare_fusions(size: str, batches: tuple[int, ...] = (1, 16, 64), rounds: int = 2,
                    names: list[str] | None = None) -> str:
    """Decode step time (graph replay, median of 100) with each CudaOps variant of FUSIONS (or those named), in one
    process on one model, the variants alternating: a fusion's gain measured against its own separate kernels."""
    names = names or list(FUSIONS)
    unknown = [n for n in names if n not in FUSIONS]
    if unknown:
        raise SystemExit(f"unknown fusion variants {unknown}; known: {', '.join(FUSIONS)}")
    gpu = CudaQuantModel(quantized(float_model(size)))
    plain = gpu.in_place_ops
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for name in names:
            gpu.in_place_ops = ops_like(plain, **FUSIONS[name])
            time_steps(gpu, name, batches, times)
            gpu.in_place_ops = plain
    return step_table(f"## decode step by fusion variant, {size} (ms per step, graph replay; rounds alternate the "
                      "variants)", "variant", names, times, batches)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--sizes", default="tiny,130m,1.4b,2.8b")
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--profile-decode", default=None, metavar="SIZE:B",
                    help="only print the per-kernel times of one eager decode step, e.g. 130m:1")
    ap.add_argument("--hf-sizes", default="tiny,130m", help="sizes that also time transformers (its slow path)")
    ap.add_argument("--stage-costs", default=None, metavar="SIZE:B",
                    help="only print what each decode stage costs in the captured chain, e.g. 130m:1")
    ap.add_argument("--compare-libs", default=None, metavar="LIB[,LIB]",
                    help="only print the decode step time with each library build, for --sizes and --batches")
    ap.add_argument("--compare-fusions", action="store_true",
                    help="only print the decode step time with each fusion variant, for --sizes and --batches")
    ap.add_argument("--batches", default="1,16,64", help="decode batch sizes of --compare-libs / --compare-fusions")
    ap.add_argument("--fusions", default=None, metavar="NAME[,NAME]", help="the variants of --compare-fusions "
                    "(default: all of FUSIONS)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of --compare-libs / --compare-fusions")
    args = ap.parse_args()
    if args.compare_libs or args.compare_fusions:
        text = ""
        batches = tuple(int(b) for b in args.batches.split(","))
        for size in args.sizes.split(","):  # the file grows after every size: a cut-short run keeps what it has
            text += (compare_libs(size, args.compare_libs.split(","), batches, args.rounds) if args.compare_libs
                     else compare_fusions(size, batches, args.rounds,
                                          args.fusions.split(",") if args.fusions else None)) + "\n"
            emit(text, args.out)
        return
    for spec, diagnostic in ((args.stage_costs, stage_costs), (args.profile_decode, profile_decode)):
        if spec:
            size, b = spec.split(":")
            emit(diagnostic(size, int(b)), args.out)
            return
    bw = hbm_bandwidth()
    _, why = transformers_baseline(MambaConfig(d_model=64, n_layer=1, vocab_size=256))
    # "-dirty" marks a working tree that differs from its commit (e.g. a copy sent to a GPU machine)
    git = ["git", "describe", "--always", "--dirty", "--abbrev=7"]
    commit = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    lines = [f"device {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, torch {torch.__version__}, "
             f"{datetime.date.today()}, commit {commit or 'n/a'}; HBM copy bandwidth {bw / 1e12:.2f} TB/s; "
             f"transformers: {why or 'importable'}", "",
             "| model | backend | prefill tok/s (B1 L" + str(args.prefill_len) + ") | decode ms/token B1 | B16 | B64 | "
             "weights on GPU | state per sequence | decode floor ms (int8 weights / HBM) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size in args.sizes.split(","):
        for row in bench_size(size, bw, args.prefill_len, size in args.hf_sizes.split(",")):
            lines.append(row)
            print(row, flush=True)
        torch.cuda.empty_cache()  # the previous size's models are gone with bench_size's frame
        if args.out:  # after every size, so a cut-short run keeps what it measured
            open(args.out, "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
