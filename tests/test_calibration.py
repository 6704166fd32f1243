"""Calibration and quantized checkpoints: determinism, bad inputs, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from qm_testutil import QUANT_RECIPES, rand_ids

from qmamba.cli import main
from qmamba.model.checkpoint import save_model
from qmamba.quant.calibrate import CalibOptions, CalibrationError, calibrate, collect_stats
from qmamba.quant.checkpoint import QuantCheckpointError, load_quantized, save_quantized
from qmamba.quant.recipes import RecipeError, get_recipe


@pytest.fixture(scope="module")
def model_dir(small_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "small"
    save_model(small_model, d)
    return d


def _calib_cli(model_dir, out, text_file, *extra):
    return main(["calibrate", str(model_dir), "--out", str(out), "--data", str(text_file),
                 "--samples", "6", "--seq-len", "32", *extra])


@pytest.mark.parametrize("recipe", QUANT_RECIPES)
def test_calibrate_cli_writes_a_loadable_qdir_deterministically(model_dir, tmp_path, text_file, recipe, capsys):
    assert _calib_cli(model_dir, tmp_path / "a", text_file, "--recipe", recipe) == 0
    assert _calib_cli(model_dir, tmp_path / "b", text_file, "--recipe", recipe) == 0
    out = capsys.readouterr().out
    assert "outlier fraction per layer" in out and "layers.1" in out
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
    meta = json.loads((tmp_path / "a" / "quant_config.json").read_text())
    assert meta["recipe"] == recipe and meta["spec_version"] == "1.1"
    assert set(meta["outlier_fraction"]) == {"layers.0", "layers.1"}
    q = load_quantized(tmp_path / "a")
    ids = rand_ids(2, 9)
    assert torch.isfinite(q(ids)[0]).all()
    # different seed -> different calibration windows -> different scales
    assert _calib_cli(model_dir, tmp_path / "c", text_file, "--recipe", recipe, "--seed", "7") == 0
    assert json.loads((tmp_path / "c" / "quant_config.json").read_text())["scales"] != meta["scales"]


def test_roundtrip_is_bit_identical(small_model, tmp_path):
    q = calibrate(small_model, get_recipe("w8a8-dualscale"), rand_ids(4, 16), CalibOptions(), progress=False)
    save_quantized(q, tmp_path / "q")
    r = load_quantized(tmp_path / "q")
    ids = rand_ids(2, 11, seed=3)
    assert torch.equal(q(ids)[0], r(ids)[0])


def test_embedding_is_int8_per_row_and_tied_to_the_logits(small_model):
    """Spec 4.7: one scale per vocabulary row (even with per-tensor linears); lookup and logits use the same table."""
    q = calibrate(small_model, get_recipe("w8a8"), rand_ids(4, 16), CalibOptions(weight_granularity="per_tensor"),
                  progress=False)
    e = small_model.backbone.embeddings.weight.detach().double()
    emb = q.embedding
    assert emb.weight_q.dtype == torch.int8 and emb.weight_q.shape == e.shape
    assert torch.equal(emb.weight_scale, (e.abs().amax(1) / 127).float())
    assert emb.weight_q.abs().amax(1).eq(127).all()  # every row's largest entry maps to +-127
    # per-row rounding error is at most half a step of that row's scale
    assert ((emb.dequantized().double() - e).abs() <= emb.weight_scale.double()[:, None] / 2 + 1e-12).all()
    ids = rand_ids(2, 5, seed=1)
    from qmamba import trace

    with trace.trace() as tr:
        logits, _ = q(ids)
    want = torch.nn.functional.linear(tr.get("norm_f").double(), emb.weight_q.double()) * emb.weight_scale.double()
    assert ((logits.double() - want).norm() / want.norm()).item() < 1e-6


def test_a_qdir_of_the_previous_spec_version_is_refused_with_a_fix(small_model, tmp_path):
    q = calibrate(small_model, get_recipe("w8a8"), rand_ids(4, 16), CalibOptions(), progress=False)
    save_quantized(q, tmp_path / "q")
    cfg = tmp_path / "q" / "quant_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "spec_version": "1.0"}))
    with pytest.raises(QuantCheckpointError, match="re-run `qmamba calibrate`"):
        load_quantized(tmp_path / "q")


def test_outlier_factor_sets_s_out(small_model):
    q = calibrate(small_model, get_recipe("w8a8-dualscale"), rand_ids(4, 16), CalibOptions(outlier_factor=3.0),
                  progress=False)
    for lyr in q.layers:
        assert lyr.scales["conv1d.outlier"] == pytest.approx(3.0 * lyr.scales["conv1d"], rel=1e-6)


def test_nan_activation_names_layer_and_stage(small_model):
    import copy

    bad = copy.deepcopy(small_model)
    with torch.no_grad():
        bad.backbone.layers[1].mixer.x_proj.weight[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"NaN in activations at layer 1, stage x_proj\.dt_lowrank"):
        calibrate(bad, get_recipe("w8a8"), rand_ids(2, 8), CalibOptions(), progress=False)


def test_inf_activation_names_layer_and_stage(small_model):
    import copy

    bad = copy.deepcopy(small_model)
    with torch.no_grad():
        bad.backbone.layers[0].mixer.in_proj.weight[0, :] = float("inf")
    with pytest.raises(CalibrationError, match=r"(Inf|NaN) in activations at layer 0, stage in_proj\.x"):
        calibrate(bad, get_recipe("w8a8"), rand_ids(2, 8), CalibOptions(), progress=False)


def test_empty_calibration_set(small_model):
    with pytest.raises(CalibrationError, match="empty"):
        calibrate(small_model, get_recipe("w8a8"), torch.zeros(0, 8, dtype=torch.long), CalibOptions(),
                  progress=False)
    with pytest.raises(CalibrationError, match="empty"):
        collect_stats(small_model, [], progress=False)


def test_empty_data_file_is_a_clear_cli_error(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc = main(["calibrate", str(model_dir), "--recipe", "w8a8", "--out", str(tmp_path / "q"),
               "--data", str(empty)])
    assert rc == 2
    assert "is empty" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_unknown_recipe_and_bad_options(model_dir, tmp_path, text_file, capsys):
    assert _calib_cli(model_dir, tmp_path / "q", text_file, "--recipe", "int4") == 2
    assert "unknown recipe 'int4'" in capsys.readouterr().err
    with pytest.raises(RecipeError):
        get_recipe("Mode 2-1")
    assert _calib_cli(model_dir, tmp_path / "q", text_file, "--recipe", "w8a8", "--alpha", "1.5") == 2
    assert "alpha" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_model_checkpoint_mismatch_is_named(model_dir, tmp_path, text_file, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (broken / "config.json").write_text(json.dumps(cfg))
    assert _calib_cli(broken, tmp_path / "q", text_file, "--recipe", "w8a8") == 2
    err = capsys.readouterr().err
    assert "does not match config.json" in err and "layers.2" in err
    assert not (tmp_path / "q").exists()


def test_existing_out_needs_force_and_failed_write_leaves_nothing(small_model, model_dir, tmp_path, text_file,
                                                                   monkeypatch, capsys):
    out = tmp_path / "q"
    assert _calib_cli(model_dir, out, text_file, "--recipe", "w8a8") == 0
    before = (out / "model.safetensors").read_bytes()
    assert _calib_cli(model_dir, out, text_file, "--recipe", "w8a8") == 2
    assert "exists" in capsys.readouterr().err

    import qmamba.quant.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    # the CLI reports an OSError as a one-line error (exit 2)
    assert _calib_cli(model_dir, out, text_file, "--recipe", "w8a8", "--force") == 2
    assert "error: disk full" in capsys.readouterr().err
    # the old QDIR is untouched and no temporary directory is left behind
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["q"])
    fresh = tmp_path / "fresh"
    assert _calib_cli(model_dir, fresh, text_file, "--recipe", "w8a8") == 2
    assert not fresh.exists()


def test_qdir_validation_errors(small_model, tmp_path):
    q = calibrate(small_model, get_recipe("w8a8"), rand_ids(2, 8), CalibOptions(), progress=False)
    save_quantized(q, tmp_path / "q")
    cfg_path = tmp_path / "q" / "quant_config.json"
    meta = json.loads(cfg_path.read_text())

    def write(m):
        cfg_path.write_text(json.dumps(m))

    write({**meta, "scales": {k: v for k, v in meta["scales"].items() if k != "layers.1.dt_proj"}})
    with pytest.raises(QuantCheckpointError, match=r"missing scales .*layers\.1\.dt_proj"):
        load_quantized(tmp_path / "q")
    write({**meta, "spec_version": "0.9"})
    with pytest.raises(QuantCheckpointError, match="spec_version"):
        load_quantized(tmp_path / "q")
    write({**meta, "recipe": "w4a4"})
    with pytest.raises(RecipeError, match="w4a4"):
        load_quantized(tmp_path / "q")
    write({**meta, "scales": {**meta["scales"], "layers.0.norm": -1.0}})
    with pytest.raises(QuantCheckpointError, match="positive"):
        load_quantized(tmp_path / "q")
    with pytest.raises(QuantCheckpointError, match="not a quantized checkpoint"):
        load_quantized(tmp_path)
