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


def _ab():
    import sys

    sys.path.insert(0, str(BENCH))
    import ab_builds

    return ab_builds


def test_ab_builds_refuses_bad_arguments_with_the_reason(tmp_path):
    ab = _ab()
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"x")
    for argv, words in [
        (["--lib", f"a={lib}", "--op", "scan", "--shapes", "1x64x8"], "at least two"),
        (["--lib", f"a={lib}", "--lib", f"b={tmp_path / 'missing.so'}", "--op", "scan", "--shapes", "1x64x8"],
         "is not a file"),
        (["--lib", f"a={lib}", "--lib", f"a={lib}", "--op", "scan", "--shapes", "1x64x8"], "given twice"),
        (["--lib", str(lib), "--lib", f"b={lib}", "--op", "scan", "--shapes", "1x64x8"], "NAME=PATH"),
        (["--lib", f"a={lib}", "--lib", f"b={lib}", "--op", "scan", "--shapes", "1x64"], "BxDxL"),
        (["--lib", f"a={lib}", "--lib", f"b={lib}", "--op", "update", "--shapes", "1x0"], "BxD"),
    ]:
        with pytest.raises(SystemExit) as e:
            ab.main(argv)
        assert words in str(e.value), (argv, e.value)


def test_ab_builds_same_bits_sees_one_flipped_bit():
    import torch

    ab = _ab()
    y = torch.randn(3, 5)
    codes = torch.randint(-128, 128, (7,), dtype=torch.int8)
    flipped = y.clone()
    flipped.view(torch.int32)[1, 2] ^= 1  # one ulp in one element
    assert ab.same_bits([[y, codes], [y.clone(), codes.clone()], [flipped, codes], [y]]) == "yes NO NO"
    # -0.0 == 0.0 and NaN != NaN as floats; bit for bit they are different and equal
    z = torch.tensor([0.0, float("nan")])
    assert ab.same_bits([[z], [torch.tensor([-0.0, float("nan")])], [z.clone()]]) == "NO yes"


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA GPU: the A/B tool times kernels")
def test_ab_builds_compares_two_builds_on_every_op(tmp_path, capsys):
    import shutil as sh

    from qmamba import cuda as qcuda

    ab = _ab()
    qcuda.load_library()
    copy = tmp_path / "copy.so"  # a second file: dlopen loads it as a library of its own
    sh.copy(qcuda.DEFAULT_LIB, copy)
    before = qcuda._lib
    for op, shapes in [("scan", "1x64x9,2x128x40"), ("scan-cm", "1x64x9"), ("update", "2x64"),
                       ("conv", "1x64x9"), ("hadamard", "2x128x3")]:
        ab.main(["--lib", f"a={qcuda.DEFAULT_LIB}", "--lib", f"b={copy}", "--op", op, "--shapes", shapes,
                 "--rounds", "1", "--reps", "2", "--out", str(tmp_path / f"{op}.md")])
        rows = (tmp_path / f"{op}.md").read_text().splitlines()[2:]
        assert len(rows) == len(shapes.split(",")), rows
        assert all(r.endswith("| yes |") for r in rows), rows
    assert qcuda._lib is before  # use_library put the default library back
