"""Tracer stage names, no prints in forward(), and the compare command's outputs."""

from __future__ import annotations

import json

import pytest
import torch
from qm_testutil import rand_ids

from qmamba import trace
from qmamba.cli import main
from qmamba.compare import JUMP_FLOOR, StageMetrics, compare_stages, first_error, first_jump, metrics
from qmamba.model.checkpoint import save_model
from qmamba.quant.calibrate import CalibOptions, calibrate
from qmamba.quant.recipes import get_recipe

ALL = ["norm", "in_proj.x", "in_proj.z", "conv1d", "x_proj.dt_lowrank", "x_proj.B", "x_proj.C", "dt_proj",
       "ssm", "hadamard", "out_proj", "block"]


@pytest.mark.parametrize("recipe", ["fp16", "w8a8", "w8a8-dualscale", "w8a8-fpssm"])
def test_every_stage_is_traced_with_the_contract_names(small_model, recipe, capsys):
    if recipe == "fp16":
        run = small_model
    else:
        run = calibrate(small_model, get_recipe(recipe), rand_ids(2, 16), CalibOptions(), progress=False)
    with trace.trace() as tr:
        run(rand_ids(2, 5))
    want = [f"layers.{i}.{s}" for i in range(2) for s in ALL] + ["norm_f", "logits"]
    if recipe == "w8a8-dualscale":
        want += ["layers.0.conv1d.mask", "layers.1.conv1d.mask"]
    assert sorted(tr.names) == sorted(want)
    for name in tr.names:
        v = tr.get(name)
        shape = v.codes.shape if isinstance(v, trace.QTensor) else v.shape
        assert shape[:2] == (2, 5), name
    assert capsys.readouterr().out == ""  # forward() never prints


def test_tracer_is_inactive_outside_the_context(small_model):
    with trace.trace(include=r"layers\.0\.ssm") as tr:
        small_model(rand_ids(1, 3))
    assert tr.names == ["layers.0.ssm"]
    small_model(rand_ids(1, 3))
    assert trace.active() is None and tr.names == ["layers.0.ssm"]


def test_metrics_and_first_jump():
    r = torch.randn(1000)
    m = metrics("layers.0.ssm", r, r.clone())
    assert m.rel_l2 == 0 and m.sqnr_db == float("inf") and m.cosine == pytest.approx(1.0)
    m = metrics("layers.0.ssm", r, r + 0.1 * r.norm() / 1000**0.5 * torch.randn(1000))
    assert 15 < m.sqnr_db < 25
    def rows_of(errs):
        names = ["norm", "in_proj.x", "conv1d", "ssm", "out_proj"]
        return [StageMetrics(f"layers.0.{s}", 0, s, e, 0, 0, 1) for s, e in zip(names, errs, strict=True)]

    # backend check: exact until a broken stage -> that stage is both where error enters and the jump
    rows = rows_of([0, 0, 0.3, 0.4, 0.5])
    assert first_error(rows).stage == "conv1d" and first_jump(rows).stage == "conv1d"
    # recipe comparison: noise enters at the first quantizer; a later 2x amplification is the jump
    rows = rows_of([1e-2, 1.5e-2, 1.2e-2, 5e-2, 6e-2])
    assert first_error(rows).stage == "norm" and first_jump(rows).stage == "ssm"
    rows = rows_of([1e-2, 1.5e-2, 1.2e-2, 2e-2, 2.5e-2])
    assert first_error(rows).stage == "norm" and first_jump(rows) is None
    assert first_jump(rows_of([JUMP_FLOOR / 10] * 5)) is None


def test_compare_stages_dequantizes_int8(small_model):
    q = calibrate(small_model, get_recipe("w8a8"), rand_ids(2, 16), CalibOptions(), progress=False)
    ids = rand_ids(2, 8)
    with trace.trace() as a:
        small_model(ids)
    with trace.trace() as b:
        q(ids)
    rows = compare_stages(a.as_dict(), b.as_dict())
    byname = {r.name: r for r in rows}
    assert byname["layers.0.norm"].rel_l2 < 0.05  # int8 of a float, dequantized, is close
    assert byname["logits"].cosine > 0.9


def test_compare_cli_writes_table_json_png(small_model, tmp_path, text_file, capsys):
    save_model(small_model, tmp_path / "m")
    rc = main(["compare", str(tmp_path / "m"), "--reference", "fp16", "--target", "w8a8-dualscale",
               "--eval-data", str(text_file), "--calib-data", str(text_file), "--calib-samples", "4",
               "--calib-seq-len", "32", "--batch", "2", "--length", "16", "--out", str(tmp_path / "r")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "SQNR dB" in out and "hadamard" in out and "x_proj.dt_lowrank" in out
    assert "error enters at layers.0." in out
    assert "first stage whose error jumps" in out or "no stage's error jumps" in out
    rep = json.loads((tmp_path / "r" / "compare.json").read_text())
    stages = {s["name"] for s in rep["stages"]}
    assert "layers.1.hadamard" in stages and "logits" in stages
    assert (tmp_path / "r" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_cli_rejects_wrong_qdir_recipe(small_model, tmp_path, text_file, capsys):
    save_model(small_model, tmp_path / "m")
    assert main(["calibrate", str(tmp_path / "m"), "--recipe", "w8a8", "--out", str(tmp_path / "q"),
                 "--data", str(text_file), "--samples", "2", "--seq-len", "16"]) == 0
    rc = main(["compare", str(tmp_path / "q"), "--target", "w8a8-dualscale", "--eval-data", str(text_file)])
    assert rc == 2
    assert "holds recipe w8a8" in capsys.readouterr().err
