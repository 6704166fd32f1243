"""Commands that write a directory never replace what exists without --force, never replace their own input, and
leave no half-written output when they fail."""

from __future__ import annotations

import os

import pytest

from qmamba.cli import main


def test_export_keeps_an_existing_out_unless_forced(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    precious = tmp_path / "important.txt"
    precious.write_text("data")
    for target in (out, precious):
        assert main(["export", str(tiny_model_dir), "--out", str(target)]) == 2
        assert "exists; pass --force to replace it" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine" and precious.read_text() == "data"
    assert main(["export", str(tiny_model_dir), "--out", str(out), "--force"]) == 0
    assert (out / "prefill.onnx").is_file() and not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_export_refuses_an_empty_layer_list(tiny_model_dir, tmp_path, capsys):
    assert main(["export", str(tiny_model_dir), "--layers", "", "--out", str(tmp_path / "o")]) == 2
    assert "names no layer" in capsys.readouterr().err


def test_build_engine_checks_out_before_anything_else(tmp_path, capsys):
    # these checks run before TensorRT is imported, so they hold on machines without it too
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    (onnx / "prefill.onnx").write_bytes(b"graph")
    plugins = tmp_path / "libqmamba_plugins.so"
    plugins.write_bytes(b"")
    for out, words in ((onnx, "would replace the ONNX directory"), (tmp_path, "would replace the ONNX directory"),
                       (onnx.parent / "onnx" / ".." / "onnx", "would replace the ONNX directory")):
        assert main(["build-engine", str(onnx), "--plugins", str(plugins), "--out", str(out), "--force"]) == 2
        assert words in capsys.readouterr().err
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "prefill.engine").write_bytes(b"old")
    assert main(["build-engine", str(onnx), "--plugins", str(plugins), "--out", str(engine)]) == 2
    assert "exists; pass --force to replace it" in capsys.readouterr().err
    assert (engine / "prefill.engine").read_bytes() == b"old" and (onnx / "prefill.onnx").read_bytes() == b"graph"


def test_train_tiny_keeps_the_shipped_model_unless_forced(tmp_path, capsys):
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    assert main(["train-tiny", "--device", "cpu", "--out", str(out), "--steps", "1"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == b"weights"


@pytest.mark.parametrize(("option", "value", "words"), [
    ("--steps", "0", "--steps 0 must be at least 1"), ("--batch-size", "0", "--batch-size 0 must be at least 1"),
    ("--seq-len", "1", "--seq-len 1 must be at least 2"), ("--max-seconds", "0", "--max-seconds 0.0 must be positive"),
])
def test_train_tiny_refuses_bad_numbers_before_training(tmp_path, capsys, option, value, words):
    assert main(["train-tiny", "--device", "cpu", "--out", str(tmp_path / "new"), option, value]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories: the OSError cannot happen")
def test_an_unwritable_out_is_an_error_message_not_a_traceback(tiny_model_dir, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["export", str(tiny_model_dir), "--out", str(ro / "onnx")]) == 2
        assert "Permission denied" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


def test_an_out_below_a_file_is_an_error_message_not_a_traceback(tiny_model_dir, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["export", str(tiny_model_dir), "--out", str(f / "onnx")]) == 2
    assert "error:" in capsys.readouterr().err
    assert f.read_text() == "x"


def test_calibrate_refuses_an_out_below_a_file_before_calibrating(tiny_model_dir, tmp_path, capsys):
    f = tmp_path / "x.st"
    f.write_text("x")
    assert main(["calibrate", str(tiny_model_dir), "--recipe", "w8a8", "--out", str(f / "q")]) == 2
    assert f"{f} is a file, not a directory" in capsys.readouterr().err


def test_export_force_over_a_file_leaves_no_old_copy(tiny_model_dir, tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    assert main(["export", str(tiny_model_dir), "--out", str(target), "--force"]) == 0
    assert (target / "prefill.onnx").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
