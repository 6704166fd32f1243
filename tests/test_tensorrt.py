"""TensorRT tests: run in the docker image (docker/README.md); skipped with a reason elsewhere.

Written against the real TensorRT runtime: nothing here is mocked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.tensorrt

try:
    import tensorrt  # noqa: F401

    _why = None
except ImportError:
    _why = "TensorRT's Python package is not installed (these tests run in the docker image: docker/README.md)"
if _why is None and not torch.cuda.is_available():
    _why = "no CUDA GPU visible: TensorRT engines need one"
PLUGINS = Path(os.environ.get("QMAMBA_PLUGINS", "build/trt_plugins/libqmamba_plugins.so"))
if _why is None and not PLUGINS.is_file():
    _why = f"plugin library {PLUGINS} not built (cmake -S trt_plugins -B build/trt_plugins, or set QMAMBA_PLUGINS)"
if _why:
    pytest.skip(_why, allow_module_level=True)


@pytest.fixture(scope="module")
def engine_dir(tiny_model_dir, tmp_path_factory):
    from qmamba.cli import main

    root = tmp_path_factory.mktemp("trt")
    assert main(["calibrate", str(tiny_model_dir), "--recipe", "w8a8-dualscale", "--samples", "8",
                 "--seq-len", "128", "--out", str(root / "qdir")]) == 0
    assert main(["export", str(root / "qdir"), "--out", str(root / "onnx"), "--stages"]) == 0
    assert main(["build-engine", str(root / "onnx"), "--plugins", str(PLUGINS), "--out", str(root / "engine"),
                 "--batch", "1,2,4", "--length", "1,64,512", "--decode-batch", "1,4,16"]) == 0
    return root


def test_engine_metadata(engine_dir):
    meta = json.loads((engine_dir / "engine" / "engine.json").read_text())
    assert set(meta["graphs"]) == {"prefill", "decode"}
    assert meta["tensorrt_version"] == tensorrt.__version__


def test_engine_matches_pytorch_per_stage(engine_dir):
    from qmamba.cli import main

    rc = main(["check", str(engine_dir / "engine"), "--reference", str(engine_dir / "qdir"), "--backend",
               "tensorrt", "--out", str(engine_dir / "check")])
    assert rc == 0


def test_tampered_engine_is_refused_with_a_reason(engine_dir, tmp_path):
    import shutil

    from engines.build import EngineError, check_metadata

    bad = tmp_path / "engine"
    shutil.copytree(engine_dir / "engine", bad)
    meta = json.loads((bad / "engine.json").read_text())
    meta["tensorrt_version"] = "0.0.1"
    meta["plugin_sha256"] = "0" * 64
    (bad / "engine.json").write_text(json.dumps(meta))
    with pytest.raises(EngineError, match="TensorRT 0.0.1.*sha256 mismatch"):
        check_metadata(bad, PLUGINS)


def test_greedy_generation_matches_torch_backend(engine_dir):
    from qmamba.quant.checkpoint import load_quantized
    from qmamba.runtime import ByteTokenizer, Generator, SamplingParams, TorchBackend
    from qmamba.runtime.trt_backend import TrtBackend

    prompts = ["KING:", "To be, or not to be"]
    params = SamplingParams(24)
    trt_out = Generator(TrtBackend(engine_dir / "engine", PLUGINS), ByteTokenizer()).generate(prompts, params)
    ref_out = Generator(TorchBackend(load_quantized(engine_dir / "qdir")), ByteTokenizer()).generate(prompts, params)
    assert [c.text for c in trt_out] == [c.text for c in ref_out]
