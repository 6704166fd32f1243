"""Builds the plugin library + harness with CMake and drives plugins through trt_plugins/harness/harness.cpp.

TensorRT headers are looked up in .deps/tensorrt-*/include (extracted from NVIDIA/TensorRT, never committed)
and the standard include paths (the docker image); the runtime of TensorRT is never needed.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
NO_HEADERS = (
    "TensorRT headers not found: looked in .deps/tensorrt-*/include (extract include/ of NVIDIA/TensorRT there) "
    "and the standard include directories")

# nvinfer1::DataType codes; the harness reports supported types as a bit mask over codes 0..5
FLOAT, HALF, INT8, INT32, BOOL, UINT8 = 0, 1, 2, 3, 4, 5
TORCH_TO_TRT = {torch.float32: FLOAT, torch.float16: HALF, torch.int8: INT8, torch.int32: INT32, torch.bool: BOOL,
                torch.uint8: UINT8}


def header_roots() -> list[Path]:
    """TensorRT roots (directories holding include/NvInferRuntime.h), newest last."""
    roots = sorted((p.parent.parent for p in (ROOT / ".deps").glob("tensorrt-*/include/NvInferRuntime.h")),
                   key=lambda p: [int(x) if x.isdigit() else 0 for x in p.name.split("-")[-1].split(".")])
    for std in (Path("/usr/include/x86_64-linux-gnu"), Path("/usr/include/aarch64-linux-gnu"), Path("/usr/include")):
        if (std / "NvInferRuntime.h").is_file():
            roots.append(std.parent if std.name == "include" else std)
    return roots


def build(root: Path, out: Path, sanitize: bool = False, targets: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Configures and builds trt_plugins/ (CMake) against the TensorRT headers under `root`. Where cmake is missing
    (the GPU machine) the same sources are built with nvcc directly."""
    if shutil.which("nvcc") is None:
        raise FileNotFoundError("nvcc is needed to build the plugin library")
    include = root / "include" if (root / "include" / "NvInferRuntime.h").is_file() else root
    if shutil.which("cmake") is None:
        return _build_with_nvcc(include, out, sanitize, targets)
    cfg = subprocess.run(["cmake", "-S", str(ROOT / "trt_plugins"), "-B", str(out), f"-DTensorRT_ROOT={include.parent}",
                          "-DCMAKE_CUDA_ARCHITECTURES=90", f"-DQMAMBA_SANITIZE={'ON' if sanitize else 'OFF'}"],
                         capture_output=True, text=True, timeout=600)
    if cfg.returncode != 0:
        return cfg
    cmd = ["cmake", "--build", str(out), "-j4"] + [a for t in targets for a in ("--target", t)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1800)


def _build_with_nvcc(include: Path, out: Path, sanitize: bool, targets: tuple[str, ...]) -> subprocess.CompletedProcess:
    tp = ROOT / "trt_plugins"
    out.mkdir(parents=True, exist_ok=True)
    base = ["nvcc", "-O2", "-std=c++17", "-gencode", "arch=compute_90,code=sm_90", f"-I{include}",
            f"-I{tp / 'plugins'}", f"-I{tp / 'kernels'}", "-Xcompiler", "-fPIC,-Wno-deprecated-declarations"]
    plugin_sources = [*sorted((tp / "plugins").glob("*/*.cpp")), *sorted((tp / "plugins").glob("*.cpp")),
                      *sorted((tp / "kernels").glob("*.cu"))]
    jobs = {  # target -> (sources, link flags, output)
        "qmamba_plugins": (plugin_sources, ["-shared"], "libqmamba_plugins.so"),
        "qmamba_plugin_harness": ([tp / "harness/harness.cpp"], ["-shared", "-ldl"], "libqmamba_plugin_harness.so"),
        "qmamba_plugin_fuzz": ([tp / "harness/fuzz.cpp"], ["-ldl"], "qmamba_plugin_fuzz"),
    }
    r = None
    for t in targets or tuple(jobs):
        sources, link, name = jobs[t]
        # one sanitizer per -Xcompiler: nvcc splits its argument at commas
        san = ["-Xcompiler", "-fsanitize=address", "-Xcompiler", "-fsanitize=undefined"] \
            if sanitize and t != "qmamba_plugin_harness" else []
        objs = []
        for src in sources:
            obj = out / f"{t}-{src.parent.name}-{src.name}.o"
            extra = ["-fmad=false"] if src.suffix == ".cu" else ["-Xcompiler", "-fvisibility=hidden"]
            r = subprocess.run([*base, *san, *extra, "-c", str(src), "-o", str(obj)], capture_output=True, text=True,
                               timeout=1800)
            if r.returncode != 0:
                return r
            objs.append(str(obj))
        libs = ["-lasan", "-lubsan"] if san else []
        cmd = ["nvcc", "-gencode", "arch=compute_90,code=sm_90", *link, *objs, *libs, "-o", str(out / name)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            return r
    return r


@dataclass
class RunResult:
    status: int
    message: str
    out_shapes: list[tuple[int, ...]]
    out_types: list[int]
    supported: list[int]  # per tensor position: bit mask of accepted DataType codes
    workspace: int


class Harness:
    def __init__(self, build_dir: Path) -> None:
        self.plugins = build_dir / "libqmamba_plugins.so"
        self.lib = ctypes.CDLL(str(build_dir / "libqmamba_plugin_harness.so"))
        self.lib.qmh_run.restype = ctypes.c_int

    def run(self, op: str, fields: dict[str, float | int], inputs: list[torch.Tensor], n_out: int,
            outputs: list[torch.Tensor] | None = None) -> RunResult:
        """Drives `op` through its lifecycle with these fields and input tensors (their shapes and dtypes). With
        `outputs` (CUDA tensors) it also enqueues on the current stream and synchronizes."""
        names = [k.encode() for k in fields]
        is_int = [int(isinstance(v, int) and not isinstance(v, bool)) for v in fields.values()]
        nf, ni = len(fields), len(inputs)
        ranks = (ctypes.c_int * ni)(*[t.dim() for t in inputs])
        dims = (ctypes.c_int64 * (8 * ni))()
        for i, t in enumerate(inputs):
            for k, s in enumerate(t.shape):
                dims[8 * i + k] = s
        enqueue = outputs is not None
        in_ptrs = (ctypes.c_void_p * ni)(*[t.data_ptr() if enqueue else 0 for t in inputs])
        out_ptrs = (ctypes.c_void_p * n_out)(*([t.data_ptr() for t in outputs] if enqueue else [0] * n_out))
        out_ranks, out_types = (ctypes.c_int * n_out)(), (ctypes.c_int * n_out)()
        out_dims = (ctypes.c_int64 * (8 * n_out))()
        mask = (ctypes.c_uint32 * (ni + n_out))()
        ws = ctypes.c_int64(0)
        msg = ctypes.create_string_buffer(8192)
        stream = torch.cuda.current_stream().cuda_stream if enqueue else 0
        rc = self.lib.qmh_run(
            str(self.plugins).encode(), op.encode(), nf, (ctypes.c_char_p * nf)(*names), (ctypes.c_int * nf)(*is_int),
            (ctypes.c_double * nf)(*[float(v) for v in fields.values()]), ni, ranks, dims,
            (ctypes.c_int * ni)(*[TORCH_TO_TRT[t.dtype] for t in inputs]), in_ptrs, n_out, out_ranks, out_dims,
            out_types, mask, ctypes.byref(ws), out_ptrs, int(enqueue), ctypes.c_void_p(stream), msg, len(msg))
        shapes = [tuple(out_dims[8 * o + k] for k in range(out_ranks[o])) for o in range(n_out)]
        return RunResult(rc, msg.value.decode(errors="replace"), shapes, list(out_types), list(mask), ws.value)
