"""The standalone CUDA benchmark programs in trt_plugins/bench compile (they run on the GPU machine only)."""

import shutil
import subprocess
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the benchmark programs cannot be compiled")
@pytest.mark.parametrize("name", ["exp_throughput.cu", "grid_barrier.cu"])
def test_bench_program_compiles(tmp_path, name):
    r = subprocess.run(["nvcc", "-O3", "-std=c++17", "-gencode", "arch=compute_90,code=sm_90", str(BENCH / name),
                        "-o", str(tmp_path / "prog")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "prog").stat().st_size > 0
