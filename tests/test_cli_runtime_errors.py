"""`qmamba generate` / `qmamba serve` through the CLI: exports made with --stages run on onnxruntime, and bad
options or a missing environment give one `error:` line and exit code 2 (no traceback, no silent default)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pytest
import torch

from qmamba.cli import main
from qmamba.errors import UserError
from qmamba.model.checkpoint import load_model
from qmamba.quant.calibrate import CalibOptions, calibrate
from qmamba.quant.checkpoint import load_quantized, save_quantized
from qmamba.quant.recipes import get_recipe
from qmamba.runtime import ByteTokenizer, Generator, SamplingParams, TorchBackend


@pytest.fixture(scope="module")
def staged(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(QDIR, export dir with --stages) of the tiny model, as `make demo` makes them."""
    from export.exporter import export

    root = tmp_path_factory.mktemp("staged")
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    q = calibrate(load_model(tiny_model_dir), get_recipe("w8a8-dualscale"), calib, CalibOptions(), progress=False)
    save_quantized(q, root / "q")
    export(root / "q", root / "onnx", stages=True, max_batch=4, max_len=512)
    return root / "q", root / "onnx"


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _user_error(capsys, fragment: str, *argv: str) -> str:
    rc, _, err = _cli(capsys, *argv)
    assert rc == 2, err
    assert "error:" in err and fragment in err, err
    return err


# 1. exports made with --stages


def test_onnxruntime_generates_from_a_stage_export(staged, capsys):
    qdir, onnx_dir = staged
    from qmamba.runtime.ort_backend import OrtBackend

    prompts = ["KING:", "To be, or not to be"]
    params = SamplingParams(12)
    want = Generator(TorchBackend(load_quantized(qdir)), ByteTokenizer()).generate(prompts, params)
    got = Generator(OrtBackend(onnx_dir), ByteTokenizer()).generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    rc, out, err = _cli(capsys, "generate", str(onnx_dir), "--backend", "onnxruntime", "--prompt", "KING:",
                        "--max-tokens", "12")
    assert rc == 0, err
    assert out.startswith("KING:" + want[0].text) and "[length, 12 tokens]" in out


# 2. serve limits, checked before anything loads or starts


@pytest.mark.parametrize(("option", "value", "fragment"), [
    ("--max-batch", "0", "--max-batch must be at least 1"),
    ("--max-queue", "0", "--max-queue must be at least 1"),
    ("--max-tokens-limit", "0", "--max-tokens-limit must be at least 1"),
    ("--max-prompt-tokens", "-5", "--max-prompt-tokens must be at least 1"),
    ("--port", "-1", "--port must be between 0 and 65535"),
    ("--port", "70000", "--port must be between 0 and 65535"),
])
def test_serve_rejects_nonsense_limits(tiny_model_dir, capsys, monkeypatch, option, value, fragment):
    import qmamba.runtime

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(qmamba.runtime, "load_backend", no_load)
    _user_error(capsys, fragment, "serve", str(tiny_model_dir), option, value)


# 3. generate options that do not fit the model


@pytest.mark.parametrize(("model", "extra", "fragment"), [
    ("tiny", ["--recipe", "bogus"], "unknown recipe 'bogus'; choose one of: fp32, fp16, w8a8, w8a8-dualscale"),
    ("tiny", ["--recipe", "w8a8"], "--recipe w8a8 needs a quantized checkpoint"),
    ("qdir", ["--recipe", "fp16"], "holds recipe w8a8-dualscale"),
    ("qdir", ["--recipe", "w8a8"], "holds recipe w8a8-dualscale"),
    ("onnx", ["--backend", "onnxruntime", "--recipe", "fp16"], "holds recipe w8a8-dualscale"),
    ("tiny", ["--tokenizer-dir", "no/such/dir"], "tokenizer directory no/such/dir does not exist"),
    ("tiny", ["--tokenizer-dir", "."], "has no tokenizer.json"),
])
def test_generate_rejects_options_that_do_not_fit(tiny_model_dir, staged, capsys, model, extra, fragment):
    path = {"tiny": tiny_model_dir, "qdir": staged[0], "onnx": staged[1]}[model]
    _user_error(capsys, fragment, "generate", str(path), "--prompt", "K", "--max-tokens", "2", *extra)


@pytest.mark.parametrize(("model", "recipe"), [("tiny", "fp16"), ("tiny", "fp32"), ("qdir", "w8a8-dualscale")])
def test_generate_accepts_the_matching_recipe(tiny_model_dir, staged, capsys, model, recipe):
    path = {"tiny": tiny_model_dir, "qdir": staged[0]}[model]
    rc, out, err = _cli(capsys, "generate", str(path), "--prompt", "K", "--max-tokens", "2", "--recipe", recipe)
    assert rc == 0, err
    assert "[length, 2 tokens]" in out


# 4. the environment cannot run the request


def test_tensorrt_backend_without_tensorrt(staged, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails, as where it is not installed
    _user_error(capsys, "TensorRT's Python package is not installed",
                "generate", str(staged[1]), "--backend", "tensorrt", "--prompt", "K")


@pytest.mark.parametrize(("backend", "device", "fragment"), [
    ("torch", "cuda", "device 'cuda' needs a CUDA GPU"),
    ("torch", "banana", "device 'banana' is not a device"),
    ("torch", "meta", "the torch backend runs on cpu or cuda"),
    ("onnxruntime", "cuda", "the onnxruntime backend runs on the CPU only"),
])
def test_generate_device_errors(tiny_model_dir, staged, capsys, monkeypatch, backend, device, fragment):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    model = staged[1] if backend == "onnxruntime" else staged[0]
    _user_error(capsys, fragment, "generate", str(model), "--backend", backend, "--device", device, "--prompt", "K")


def test_junk_onnx_file(staged, tmp_path, capsys):
    bad = tmp_path / "onnx"
    shutil.copytree(staged[1], bad)
    (bad / "decode.onnx").write_bytes(b"not a protobuf")
    _user_error(capsys, f"ONNX Runtime cannot load {bad / 'decode.onnx'}: InvalidProtobuf",
                "generate", str(bad), "--backend", "onnxruntime", "--prompt", "K")


# 5. serve / generate limits against what an export or engine was built for (the staged export: max_batch 4,
# max_len 512): refused at startup naming both numbers, not request by request at run time


@pytest.fixture
def no_server(monkeypatch):
    """run_serve's create_app / serve, recorded instead of run: nothing listens, nothing blocks."""
    pytest.importorskip("fastapi", reason="fastapi is not installed: the server extra is needed for serve's tests")
    pytest.importorskip("uvicorn", reason="uvicorn is not installed: the server extra is needed for serve's tests")
    import qmamba.server.app
    import qmamba.server.run

    seen = {}

    def create_app(engine, name, max_prompt_tokens, max_tokens_limit):
        seen.update(engine=engine, max_prompt_tokens=max_prompt_tokens)
        return object()

    monkeypatch.setattr(qmamba.server.app, "create_app", create_app)
    monkeypatch.setattr(qmamba.server.run, "serve", lambda *a, **k: seen.setdefault("served", True))
    return seen


@pytest.mark.parametrize(("extra", "fragments"), [
    (["--max-batch", "32"], ["--max-batch 32 is more than", "max_batch 4 in its export.json", "--max-batch 4 or less"]),
    (["--max-prompt-tokens", "1000"], ["--max-prompt-tokens 1000 is more than", "max_len 512 in its export.json"]),
])
def test_serve_refuses_limits_beyond_the_export(staged, capsys, no_server, extra, fragments):
    err = _user_error(capsys, fragments[0], "serve", str(staged[1]), "--backend", "onnxruntime", *extra)
    assert all(f in err for f in fragments), err
    assert "served" not in no_server


def test_serve_defaults_fit_the_export_with_a_notice(staged, capsys, no_server):
    rc, _, err = _cli(capsys, "serve", str(staged[1]), "--backend", "onnxruntime")
    assert rc == 0, err
    assert no_server["engine"].max_batch == 4 and no_server["max_prompt_tokens"] == 512
    assert "using --max-batch 4, not the default 32" in err and "using --max-prompt-tokens 512" in err
    rc, _, err = _cli(capsys, "serve", str(staged[1]), "--backend", "onnxruntime", "--max-batch", "4",
                      "--max-prompt-tokens", "100")
    assert rc == 0 and no_server["engine"].max_batch == 4 and no_server["max_prompt_tokens"] == 100
    assert "using" not in err


def test_serve_defaults_on_the_torch_backend(tiny_model_dir, capsys, no_server):
    rc, _, err = _cli(capsys, "serve", str(tiny_model_dir))
    assert rc == 0, err
    assert no_server["engine"].max_batch == 32 and no_server["max_prompt_tokens"] == 2048


def test_tensorrt_limits_come_from_the_engine_profiles():
    from qmamba.commands.serve import _fit_serve_limits
    from qmamba.runtime.trt_backend import profile_limits

    meta = {"profiles": {"batch": [1, 1, 8], "length": [1, 256, 2048], "decode_batch": [1, 8, 64]}}
    assert profile_limits(meta) == (64, 2048)
    assert profile_limits({}) == (None, None)

    class FakeTrt:
        name, max_batch, max_len = "tensorrt", 64, 2048

    args = argparse.Namespace(model=Path("eng"), max_batch=128, max_prompt_tokens=None)
    with pytest.raises(UserError, match=r"--max-batch 128 is more than the engine eng \(the decode profile's "
                                        r"largest batch 64 in its engine.json\)"):
        _fit_serve_limits(args, FakeTrt())
    args.max_batch = 64
    assert _fit_serve_limits(args, FakeTrt()) == (64, 2048)


def test_generate_refuses_more_than_the_export_takes(staged, capsys):
    many = [a for i in range(5) for a in ("--prompt", f"P{i}")]
    _user_error(capsys, "5 prompts are decoded as one batch, more than the export", "generate", str(staged[1]),
                "--backend", "onnxruntime", "--max-tokens", "2", *many)
    _user_error(capsys, "a --prompt of 600 tokens is longer than the export", "generate", str(staged[1]),
                "--backend", "onnxruntime", "--max-tokens", "2", "--prompt", "x" * 600)


# 6. sampling options are named as the user typed them (SamplingParams' field names are not options)


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--max-tokens", "0"], "--max-tokens must be at least 1, got 0"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),  # was a RuntimeError traceback
    (["--top-k", "-1"], "--top-k must be 0 (off) or more"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--seed", str(2**70)], "--seed must be between"),  # was torch's "Overflow when unpacking long long"
    (["--stop", ""], "--stop takes a non-empty string"),
])
def test_generate_sampling_errors_name_the_option(tiny_model_dir, capsys, extra, fragment):
    err = _user_error(capsys, fragment, "generate", str(tiny_model_dir), "--prompt", "K", *extra)
    assert "max_new_tokens" not in err and "top_p must" not in err


def test_serve_refuses_a_taken_port_or_unknown_host_before_loading(tiny_model_dir, capsys, monkeypatch):
    import socket

    pytest.importorskip("fastapi", reason="fastapi is not installed: the server extra is needed for serve's tests")
    import qmamba.runtime

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the address was checked")

    monkeypatch.setattr(qmamba.runtime, "load_backend", no_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _user_error(capsys, f"cannot listen on 127.0.0.1:{port}", "serve", str(tiny_model_dir), "--port", str(port))
    _user_error(capsys, "--host 'no-such-host.invalid' is not an address", "serve", str(tiny_model_dir), "--host",
                "no-such-host.invalid")
