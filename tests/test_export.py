"""ONNX export: ONNX Runtime vs the PyTorch reference stage by stage, decode graphs, portability,
plugin attributes, determinism, and bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from export.exporter import export
from export.ort import session
from qmamba.cli import main
from qmamba.model.checkpoint import load_model
from qmamba.quant.calibrate import CalibOptions, calibrate
from qmamba.quant.checkpoint import save_quantized
from qmamba.quant.recipes import get_recipe

RECIPES = ("fp16", "w8a8", "w8a8-dualscale", "w8a8-fpssm")


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    """recipe -> (reference dir, export dir) for the shipped tiny model."""
    root = tmp_path_factory.mktemp("export")
    tiny = load_model(tiny_model_dir)
    calib = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    out = {}
    for rc in RECIPES:
        if rc == "fp16":
            ref = tiny_model_dir
        else:
            ref = root / f"q-{rc}"
            save_quantized(calibrate(tiny, get_recipe(rc), calib, CalibOptions(), progress=False), ref)
        export(ref, root / f"onnx-{rc}", recipe=rc if rc == "fp16" else None, stages=True, max_batch=4,
               max_len=512)
        out[rc] = (ref, root / f"onnx-{rc}")
    return out


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize(("batch", "length"), [(1, 1), (3, 7), (1, 300), (3, 300)])
def test_onnxruntime_matches_pytorch_per_stage(exported, recipe, batch, length, tmp_path, capsys):
    ref, onnx_dir = exported[recipe]
    rc = main(["check", str(onnx_dir / "prefill.onnx"), "--reference", str(ref), "--batch", str(batch),
               "--seq-len", str(length), "--seed", str(batch * 1000 + length), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "PASSED" in out
    rep = json.loads((tmp_path / "compare.json").read_text())
    stages = {s["name"]: s for s in rep["stages"]}
    if recipe != "fp16":  # integer stages identical, float stages to float32 rounding
        assert stages["layers.3.hadamard"]["max_abs"] == 0 and stages["layers.0.norm"]["max_abs"] == 0
        assert stages["layers.3.block"]["rel_l2"] < 1e-6
    assert (tmp_path / "run_results.json").is_file() and (tmp_path / "compare.png").is_file()


@pytest.mark.parametrize("recipe", RECIPES)
def test_decode_steps_equal_prefill(exported, recipe):
    _, onnx_dir = exported[recipe]
    pre, dec = session(onnx_dir / "prefill.onnx"), session(onnx_dir / "decode.onnx")
    ids = np.random.default_rng(1).integers(0, 256, (2, 12)).astype(np.int64)
    names = [o.name for o in pre.get_outputs() if not o.name.startswith(("layers.", "norm_f"))]
    full = dict(zip(names, pre.run(names, {"input_ids": ids}), strict=True))
    part = dict(zip(names, pre.run(names, {"input_ids": ids[:, :9]}), strict=True))
    state_in = [i.name for i in dec.get_inputs() if i.name != "input_ids"]
    out_names = ["logits"] + [n.replace("conv_state.", "conv_state_out.").replace("ssm_state.", "ssm_state_out.")
                              for n in state_in]
    states = {n: part[n] for n in state_in}
    for t in range(9, 12):
        res = dict(zip(out_names, dec.run(out_names, {"input_ids": ids[:, t : t + 1], **states}), strict=True))
        assert np.abs(res["logits"][:, 0] - full["logits"][:, t]).max() < 1e-4
        states = {n: res[o] for n, o in zip(state_in, out_names[1:], strict=True)}
    for n in state_in:
        if "conv" in n and recipe in ("w8a8", "w8a8-dualscale"):
            assert states[n].dtype == np.int8 and np.array_equal(states[n], full[n])
        else:
            assert np.abs(states[n] - full[n]).max() <= 1e-5 * max(1.0, np.abs(full[n]).max())


def test_runs_in_a_fresh_process_with_only_onnxruntime_and_numpy(exported, tmp_path):
    _, onnx_dir = exported["w8a8-dualscale"]
    ids = np.arange(40, dtype=np.int64).reshape(2, 20) + 60
    want = session(onnx_dir / "prefill.onnx").run(["logits"], {"input_ids": ids})[0]
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "want.npy", want)
    script = f"""
import sys
import numpy as np
import onnxruntime as ort
opts = ort.SessionOptions()
opts.add_session_config_entry("session.disable_quant_qdq", "1")
sess = ort.InferenceSession({str(onnx_dir / "prefill.onnx")!r}, opts, providers=["CPUExecutionProvider"])
got = sess.run(["logits"], {{"input_ids": np.load({str(tmp_path / "ids.npy")!r})}})[0]
assert np.array_equal(got, np.load({str(tmp_path / "want.npy")!r}))
loaded = sorted(m.split(".")[0] for m in sys.modules)
assert not any(m in ("qmamba", "export", "torch", "engines") for m in loaded), loaded
print("ok", got.shape)
"""
    r = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ok (2, 20, 256)" in r.stdout


@pytest.mark.parametrize("recipe", RECIPES)
def test_custom_nodes_are_plugin_ready(exported, recipe):
    _, onnx_dir = exported[recipe]
    for g in ("prefill", "decode"):
        m = onnx.load(onnx_dir / f"{g}.onnx")
        custom = [n for n in m.graph.node if n.domain == "qmamba"]
        assert custom
        fns = {(f.domain, f.name, f.overload) for f in m.functions}
        for n in custom:
            attrs = {a.name: a for a in n.attribute}
            assert attrs["plugin_namespace"].s == b"qmamba" and attrs["plugin_version"].s == b"1", n.op_type
            for a in n.attribute:
                assert a.type in (onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT, onnx.AttributeProto.STRING), \
                    (n.op_type, a.name, a.type)
            assert ("qmamba", n.op_type, n.overload) in fns  # a function body ships with the node
        onnx.checker.check_model(m, full_check=True)
        onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)


def test_export_is_deterministic(exported, tmp_path):
    ref, onnx_dir = exported["w8a8-dualscale"]
    export(ref, tmp_path / "again", stages=True, max_batch=4, max_len=512)
    for g in ("prefill.onnx", "decode.onnx"):
        assert (tmp_path / "again" / g).read_bytes() == (onnx_dir / g).read_bytes()


def test_single_block_export_and_check(exported, tmp_path, capsys):
    ref, _ = exported["w8a8"]
    assert main(["export", str(ref), "--out", str(tmp_path / "blk"), "--layers", "1,2", "--stages"]) == 0
    names = [o.name for o in onnx.load(tmp_path / "blk" / "block.onnx").graph.output]
    assert "layers.1.norm" in names and "layers.2.block" in names and "layers.0.norm" not in names
    assert main(["check", str(tmp_path / "blk" / "block.onnx"), "--reference", str(ref), "--batch", "2",
                 "--seq-len", "33", "--out", str(tmp_path / "r")]) == 0
    assert "PASSED" in capsys.readouterr().out


def test_check_rejects_bad_inputs(exported, tmp_path, capsys):
    ref, onnx_dir = exported["w8a8"]
    model = str(onnx_dir / "prefill.onnx")
    np.save(tmp_path / "f.npy", np.zeros((1, 4), np.float32))
    np.save(tmp_path / "r3.npy", np.zeros((1, 4, 2), np.int64))
    cases = [
        (["--input-ids", str(tmp_path / "f.npy")], "dtype float32"),
        (["--input-ids", str(tmp_path / "r3.npy")], "rank 3"),
        (["--batch", "5"], "batch 5 is outside what was exported (1..4)"),
        (["--seq-len", "513"], "length 513 is outside what was exported (1..512)"),
        (["--reference", str(exported["w8a8-dualscale"][0])], "holds recipe w8a8-dualscale"),
        (["--seq-len", "-1"], "--batch 2 and --seq-len -1 must both be positive"),
        (["--batch", "0"], "--batch 0 and --seq-len 64 must both be positive"),
    ]
    for extra, msg in cases:
        args = ["check", model, "--reference", str(ref), "--out", str(tmp_path / "o")] + extra
        if extra[0] == "--reference":
            args = ["check", model, "--out", str(tmp_path / "o")] + extra
        assert main(args) == 2, msg
        assert msg in capsys.readouterr().err
    decode = str(onnx_dir / "decode.onnx")
    assert main(["check", decode, "--reference", str(ref), "--out", str(tmp_path / "o")]) == 2
    assert "not decode.onnx" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["check", model, "--reference", str(ref), "--out", str(tmp_path / "file")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npy", "file", "r3.npy"]  # nothing written


def test_check_writes_its_report_whole_and_leaves_other_files(exported, tmp_path, capsys, monkeypatch):
    ref, onnx_dir = exported["w8a8"]
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["check", str(onnx_dir / "prefill.onnx"), "--reference", str(ref), "--batch", "1", "--seq-len", "8",
            "--out", str(out)]
    assert main(args) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"notes.txt", "inputs.json", "reference_outputs.json", "run_results.json", "compare.json"} <= set(first)
    import export.check as chk

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(chk, "write_report", full_disk)  # the last file of the report fails to write
    assert main(args + ["--seed", "7"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # the previous report, whole
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temp dir left


def test_check_fails_loudly_on_a_wrong_model(exported, tmp_path, capsys):
    """A backend that disagrees must fail and name the first failing stage (the check can fail)."""
    ref, onnx_dir = exported["w8a8"]
    m = onnx.load(onnx_dir / "prefill.onnx")
    for init in m.graph.initializer:
        if init.name == "layers.1.x_proj.m":  # corrupt one dequantization multiplier
            arr = onnx.numpy_helper.to_array(init).copy() * 1.5
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    bad = onnx_dir.parent / "bad-w8a8"
    bad.mkdir(exist_ok=True)
    onnx.save(m, bad / "prefill.onnx")
    (bad / "export.json").write_text((onnx_dir / "export.json").read_text())
    rc = main(["check", str(bad / "prefill.onnx"), "--reference", str(ref), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAILED: first failing stage: layers.1.x_proj.dt_lowrank" in out


def test_export_rejects_bad_sources_and_writes_nothing(exported, tiny_model_dir, tmp_path, capsys):
    ref, _ = exported["w8a8"]
    assert main(["export", str(tiny_model_dir), "--recipe", "int4", "--out", str(tmp_path / "a")]) == 2
    assert "unknown recipe 'int4'" in capsys.readouterr().err
    assert main(["export", str(tiny_model_dir), "--recipe", "w8a8", "--out", str(tmp_path / "a")]) == 2
    assert "calibrate it first" in capsys.readouterr().err
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(ref, broken)
    meta = json.loads((broken / "quant_config.json").read_text())
    del meta["scales"]["layers.2.hadamard"]
    (broken / "quant_config.json").write_text(json.dumps(meta))
    assert main(["export", str(broken), "--out", str(tmp_path / "b")]) == 2
    assert "missing scales" in capsys.readouterr().err
    assert main(["export", str(ref), "--layers", "0,2", "--out", str(tmp_path / "c")]) == 2
    assert "consecutive" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_export_refuses_a_model_the_plugins_cannot_run_and_writes_nothing(tmp_path, capsys):
    from qmamba.config import MambaConfig
    from qmamba.model.checkpoint import save_model
    from qmamba.model.mamba import MambaLM

    src = tmp_path / "n12"
    save_model(MambaLM(MambaConfig(d_model=32, n_layer=1, vocab_size=64, d_state=12, dt_rank=4)).init_weights(0),
               src)
    assert main(["export", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "d_state=12" in err and "(8, 16, 32, 64)" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n12"]


def test_plugin_limits_name_every_broken_limit_and_only_for_the_ops_in_the_graph():
    from export.plugin_limits import check_plugin_limits
    from qmamba.config import MambaConfig
    from qmamba.errors import UserError

    bad = MambaConfig(d_model=500, n_layer=1, vocab_size=64, d_conv=9, rms_norm_eps=2.0, dt_rank=4)  # d_inner 1000
    with pytest.raises(UserError) as e:
        check_plugin_limits(bad, quantized=True, int8_ssm=True)
    msg = str(e.value)
    assert "d_conv=9" in msg and "2..8" in msg and "rms_norm_eps=2.0" in msg and "d_inner=1000" in msg, msg
    with pytest.raises(UserError) as e:  # w8a8-fpssm: a float conv, so any d_conv
        check_plugin_limits(bad, quantized=True, int8_ssm=False)
    assert "d_conv" not in str(e.value) and "rms_norm_eps" in str(e.value)
    check_plugin_limits(bad, quantized=False, int8_ssm=False)  # fp16: no conv, norm or Hadamard plugin
    check_plugin_limits(MambaConfig(d_model=768, n_layer=1, vocab_size=64), quantized=True, int8_ssm=True)


def test_plugin_limits_are_the_plugins_own():
    import re
    from pathlib import Path

    from export import plugin_limits as pl

    plugins = Path(__file__).resolve().parents[1] / "trt_plugins" / "plugins"
    conv = (plugins / "quantCausalConv1d" / "quantCausalConv1dPlugin.cpp").read_text()
    norm = (plugins / "rmsNormQuant" / "rmsNormQuantPlugin.cpp").read_text()
    scan = (plugins / "common" / "scanPlugin.cpp").read_text()
    k = re.search(r'\{"kernel_size", PluginFieldType::kINT32, (\d+), (\d+),', conv)
    eps = re.search(r'\{"eps", PluginFieldType::kFLOAT32, ([\d.]+), ([\d.e+]+),', norm)
    n = re.search(r"N == -1((?: \|\| N == \d+)+)", scan)
    assert k and eps and n, "a plugin's field table or shape check moved: update export/plugin_limits.py's pattern"
    assert (int(k[1]), int(k[2])) == pl.CONV_KERNEL_SIZES
    assert float(eps[1]) == 0.0 and float(eps[2]) == pl.MAX_RMS_NORM_EPS
    assert tuple(int(x) for x in re.findall(r"\d+", n[1])) == pl.SCAN_STATE_SIZES
