"""Bad files and bad option values: one-line `error: ...` messages (exit 2) that name the culprit."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from qm_testutil import rand_ids

from qmamba.cli import main
from qmamba.data import DataError, sample_windows
from qmamba.errors import UserError
from qmamba.model.checkpoint import CheckpointError, load_model, save_model
from qmamba.quant.calibrate import CalibOptions, calibrate
from qmamba.quant.checkpoint import QuantCheckpointError, load_quantized, save_quantized
from qmamba.quant.recipes import get_recipe
from qmamba.train import heldout_nll


@pytest.fixture(scope="module")
def model_dir(small_model, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("m") / "small"
    save_model(small_model, d)
    return d


@pytest.fixture(scope="module")
def qdir(small_model, tmp_path_factory) -> Path:
    q = calibrate(small_model, get_recipe("w8a8"), rand_ids(2, 8), CalibOptions(), progress=False)
    return save_quantized(q, tmp_path_factory.mktemp("q") / "q")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# 1. unreadable safetensors files


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_unreadable_float_safetensors_is_a_user_error_naming_the_file(model_dir, tmp_path, text_file, damage,
                                                                      capsys):
    broken = _copy(model_dir, tmp_path / "broken")
    st = broken / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000] if damage == "truncated" else os.urandom(1000))
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_model(broken)
    rc = main(["calibrate", str(broken), "--recipe", "w8a8", "--out", str(tmp_path / "q"), "--data", str(text_file),
               "--samples", "2", "--seq-len", "16"])
    assert rc == 2
    err = _err(capsys)
    assert f"{st} is not a readable safetensors file (Error while deserializing header" in err
    assert not (tmp_path / "q").exists()


def test_unreadable_pytorch_bin_is_a_user_error_naming_the_file(model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    (broken / "pytorch_model.bin").write_bytes(os.urandom(500))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is not a readable PyTorch checkpoint"):
        load_model(broken)


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_unreadable_quantized_safetensors_is_a_user_error_naming_the_file(qdir, tmp_path, text_file, damage,
                                                                          capsys):
    broken = _copy(qdir, tmp_path / "broken")
    st = broken / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-10] if damage == "truncated" else os.urandom(1000))
    with pytest.raises(QuantCheckpointError, match="not a readable safetensors file") as e:
        load_quantized(broken)
    assert isinstance(e.value, UserError)
    rc = main(["compare", str(broken), "--reference", "w8a8", "--target", "w8a8", "--eval-data", str(text_file),
               "--batch", "1", "--length", "8", "--out", str(tmp_path / "c")])
    assert rc == 2
    assert f"{st} is not a readable safetensors file" in _err(capsys)


# 2. broken quant_config.json / config.json


def test_broken_quant_config_json_names_the_file(qdir, tmp_path, text_file, capsys):
    broken = _copy(qdir, tmp_path / "broken")
    cfg_path = broken / "quant_config.json"
    good = cfg_path.read_text()
    meta = json.loads(good)

    def compare() -> str:
        rc = main(["compare", str(broken), "--reference", "w8a8", "--target", "w8a8", "--eval-data",
                   str(text_file), "--batch", "1", "--length", "8", "--out", str(tmp_path / "c")])
        assert rc == 2
        return _err(capsys)

    cases = [
        (good[:200], f"{cfg_path} is not readable JSON (Unterminated string"),
        ("[1]", f"{cfg_path} holds a JSON array, expected a JSON object"),
        ('"qmamba"', f"{cfg_path} holds a JSON string, expected a JSON object"),
        (json.dumps({k: v for k, v in meta.items() if k not in ("recipe", "scales")}),
         f"{cfg_path}: missing keys ['recipe', 'scales']"),
        (json.dumps({**meta, "scales": [1.0]}), f"{cfg_path}: scales is a JSON array, expected a JSON object"),
        (json.dumps({**meta, "recipe": ["w8a8"]}), f"{cfg_path}: recipe is a JSON array, expected a JSON string"),
        (json.dumps({**meta, "model_config": {"hidden_size": 96}}),
         f"{cfg_path}: model_config is not a Mamba-1 config (missing field 'num_hidden_layers')"),
        (json.dumps({**meta, "model_config": {**meta["model_config"], "num_hidden_layers": "two"}}),
         f"{cfg_path}: model_config is not a Mamba-1 config"),
    ]
    for text, message in cases:
        cfg_path.write_text(text)
        with pytest.raises(QuantCheckpointError):
            load_quantized(broken)
        assert message in compare(), text


def test_broken_config_json_names_the_file(model_dir, tmp_path, text_file, capsys):
    broken = _copy(model_dir, tmp_path / "broken")
    cfg_path = broken / "config.json"
    good = json.loads(cfg_path.read_text())
    cases = [
        (cfg_path.read_text()[:50], f"{cfg_path} is not readable JSON"),
        ("[1]", f"{cfg_path} holds a JSON array, expected a JSON object"),
        ("{}", f"{cfg_path}: not a Mamba-1 config (config.json has neither"),
        (json.dumps({**good, "num_hidden_layers": None}), f"{cfg_path}: not a Mamba-1 config"),
        (json.dumps({"d_model": 96, "n_layer": 2, "vocab_size": 256, "ssm_cfg": [1]}),
         f"{cfg_path}: not a Mamba-1 config"),
    ]
    for text, message in cases:
        cfg_path.write_text(text)
        with pytest.raises(CheckpointError):
            load_model(broken)
        rc = main(["calibrate", str(broken), "--recipe", "w8a8", "--out", str(tmp_path / "q"), "--data",
                   str(text_file), "--samples", "2", "--seq-len", "16"])
        assert rc == 2
        assert message in _err(capsys), text
    cfg_path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match="is not readable JSON"):
        load_model(broken)


# 3. weights files follow the umask like the other files


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_saved_weights_follow_the_umask(small_model, qdir, tmp_path, mask):
    q = load_quantized(qdir)
    with _umask(mask):
        save_model(small_model, tmp_path / "m")
        save_quantized(q, tmp_path / "q")
    want = 0o666 & ~mask
    assert _mode(tmp_path / "m" / "config.json") == want
    assert _mode(tmp_path / "m" / "model.safetensors") == want
    assert _mode(tmp_path / "q" / "quant_config.json") == want
    assert _mode(tmp_path / "q" / "model.safetensors") == want


def test_calibrate_cli_writes_world_readable_weights_under_umask_022(model_dir, tmp_path, text_file):
    with _umask(0o022):
        rc = main(["calibrate", str(model_dir), "--recipe", "w8a8", "--out", str(tmp_path / "q"), "--data",
                   str(text_file), "--samples", "2", "--seq-len", "16"])
    assert rc == 0
    assert _mode(tmp_path / "q" / "model.safetensors") == 0o644


# 4. each command's message names its own option


def _compare(model_dir, tmp_path, text_file, *extra: str) -> list[str]:
    return ["compare", str(model_dir), "--reference", "fp16", "--target", "fp16", "--eval-data", str(text_file),
            "--out", str(tmp_path / "c"), *extra]


@pytest.mark.parametrize(("args", "message"), [
    (("--batch", "0"), "--batch must be at least 1, got 0"),
    (("--length", "-1"), "--length must be at least 1, got -1"),
    (("--length", "100000"), "calib.txt has 18703 bytes, fewer than --length 100000 + 1"),
])
def test_compare_messages_name_its_own_options(model_dir, tmp_path, text_file, args, message, capsys):
    assert main(_compare(model_dir, tmp_path, text_file, *args)) == 2
    err = _err(capsys)
    assert message in err
    assert "--samples" not in err and "--seq-len" not in err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("opt", ["--calib-samples", "--calib-seq-len"])
def test_calibration_options_of_compare_and_eval_ppl_are_named_with_their_prefix(model_dir, tmp_path, text_file,
                                                                                 opt, capsys):
    rc = main(["compare", str(model_dir), "--target", "w8a8", "--eval-data", str(text_file), "--calib-data",
               str(text_file), opt, "0", "--out", str(tmp_path / "c")])
    assert rc == 2
    assert f"{opt} must be at least 1, got 0" in _err(capsys)
    rc = main(["eval-ppl", str(model_dir), "--recipes", "w8a8", "--eval-data", str(text_file), "--calib-data",
               str(text_file), opt, "0"])
    assert rc == 2
    assert f"{opt} must be at least 1, got 0" in _err(capsys)


@pytest.mark.parametrize(("args", "message"), [
    (("--samples", "0", "--seq-len", "16"), "--samples must be at least 1, got 0"),
    (("--samples", "2", "--seq-len", "0"), "--seq-len must be at least 1, got 0"),
    (("--samples", "2", "--seq-len", "100000"), "bytes, fewer than --seq-len 100000 + 1"),
])
def test_calibrate_messages_name_its_own_options(model_dir, tmp_path, text_file, args, message, capsys):
    rc = main(["calibrate", str(model_dir), "--recipe", "w8a8", "--out", str(tmp_path / "q"), "--data",
               str(text_file), *args])
    assert rc == 2
    err = _err(capsys)
    assert message in err
    assert "calib-" not in err
    assert not (tmp_path / "q").exists()


def test_sample_windows_names_the_callers_options():
    with pytest.raises(DataError, match="^--batch must be positive, got 0$"):
        sample_windows(b"abcdef", 0, 2, 0, samples_opt="--batch", seq_len_opt="--length")
    with pytest.raises(DataError, match="^--length must be positive, got -1$"):
        sample_windows(b"abcdef", 1, -1, 0, samples_opt="--batch", seq_len_opt="--length")
    with pytest.raises(DataError, match=r"^--eval-data x has 3 bytes, fewer than --length 10 \+ 1$"):
        sample_windows(b"abc", 1, 10, 0, what="--eval-data x", samples_opt="--batch", seq_len_opt="--length")
    with pytest.raises(DataError, match="^the number of windows must be positive"):
        sample_windows(b"abcdef", 0, 2, 0)


# 4 and 5. eval-ppl's own numbers


def _eval(model_dir, text_file, *extra: str) -> list[str]:
    return ["eval-ppl", str(model_dir), "--recipes", "fp16", "--eval-data", str(text_file), *extra]


@pytest.mark.parametrize(("args", "message"), [
    (("--windows", "0"), "--windows must be at least 1, got 0"),
    (("--windows", "-1"), "--windows must be at least 1, got -1"),
    (("--length", "0"), "--length must be at least 1, got 0"),
    (("--length", "-5"), "--length must be at least 1, got -5"),
    (("--length", "100000"), "bytes, fewer than --length 100000 + 1"),
    (("--recipes", ","), "--recipes ',' names no recipe"),
    (("--recipes", " "), "--recipes ' ' names no recipe"),
])
def test_eval_ppl_validates_its_numbers(model_dir, text_file, args, message, capsys):
    assert main(_eval(model_dir, text_file, *args)) == 2
    err = _err(capsys)
    assert message in err
    assert "shorter than one window" not in err


def test_heldout_nll_rejects_non_positive_sizes(small_model):
    val = rand_ids(1, 100)[0]
    for seq_len, windows in ((0, 2), (8, 0), (-1, 2)):
        with pytest.raises(ValueError, match="must both be at least 1"):
            heldout_nll(small_model, val, seq_len, windows)
    with pytest.raises(DataError, match="held-out text has 100 bytes, shorter than one 200-byte window"):
        heldout_nll(small_model, val, 200, 2)
    assert heldout_nll(small_model, val, 8, 2) == pytest.approx(
        heldout_nll(small_model, torch.cat([val, val]), 8, 2))
