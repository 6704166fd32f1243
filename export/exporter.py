"""`qmamba export`: write prefill/decode (or single-block) ONNX graphs atomically, with export.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import torch

from export.builder import OPSET
from export.graph import ExportOptions, build_model
from export.plugin_limits import check_plugin_limits
from qmamba.errors import UserError
from qmamba.model.checkpoint import atomic_dir, check_out, commit_dir, load_model
from qmamba.ops.specmath import SPEC_VERSION
from qmamba.quant.checkpoint import is_qdir, load_quantized
from qmamba.quant.recipes import get_recipe


def load_for_export(src: Path, recipe: str | None):
    """A QDIR (its own recipe) or a float model directory (recipe fp16 only)."""
    if not src.exists():
        raise UserError(f"{src} does not exist")
    if is_qdir(src):
        q = load_quantized(src)  # validates recipe, scales, spec version
        if recipe is not None and recipe != q.recipe.name:
            raise UserError(f"{src} holds recipe {q.recipe.name}, not {recipe}")
        return q
    rc = get_recipe(recipe or "fp16")
    if rc.quantized:
        raise UserError(f"{src} is a float model: calibrate it first (qmamba calibrate --recipe {rc.name})")
    return load_model(src, torch.float16)


def parse_layers(spec: str | None, n_layer: int) -> tuple[int, ...] | None:
    if spec is None:
        return None
    try:
        layers = tuple(sorted({int(x) for x in spec.split(",") if x.strip()}))
    except ValueError:
        raise UserError(f"--layers takes comma-separated layer indices, got {spec!r}") from None
    if not layers:
        raise UserError(f"--layers {spec!r} names no layer: give comma-separated indices, e.g. 0,1")
    if layers[0] < 0 or layers[-1] >= n_layer:
        raise UserError(f"--layers {spec!r}: the model has layers 0..{n_layer - 1}")
    if list(layers) != list(range(layers[0], layers[-1] + 1)):
        raise UserError(f"--layers {spec!r}: a block graph needs consecutive layers (the residual flows through)")
    return layers


def export(src: Path, out: Path, recipe: str | None = None, layers: str | None = None, stages: bool = False,
           max_batch: int = 64, max_len: int = 8192, force: bool = False) -> dict:
    model = load_for_export(src, recipe)
    cfg = model.cfg
    recipe_of = getattr(model, "recipe", None)  # None: a float model, exported as fp16
    check_plugin_limits(cfg, quantized=bool(recipe_of and recipe_of.quantized),
                        int8_ssm=bool(recipe_of and recipe_of.int8_ssm))
    sel = parse_layers(layers, cfg.n_layer)
    if max_batch < 1 or max_len < 1:
        raise UserError("--max-batch and --max-len must be positive")
    check_out(out, force)
    graphs = {"block": ExportOptions("block", sel, stages)} if sel is not None else {
        "prefill": ExportOptions("prefill", None, stages), "decode": ExportOptions("decode", None, stages)}
    tmp = atomic_dir(out)
    try:
        files = {}
        for name, opts in graphs.items():
            proto = build_model(model, opts)
            onnx.checker.check_model(proto, full_check=True)
            path = tmp / f"{name}.onnx"
            path.write_bytes(proto.SerializeToString(deterministic=True))
            files[name] = path.name
        rc = model.recipe.name if hasattr(model, "recipe") else "fp16"
        meta = {
            "format": "qmamba-onnx",
            "spec_version": SPEC_VERSION,
            "recipe": rc,
            "source": str(src),
            "graphs": files,
            "layers": None if sel is None else list(sel),
            "stages": stages,
            "opset": OPSET,
            "max_batch": max_batch,
            "max_len": max_len,
            "model_config": cfg.to_hf(),
        }
        (tmp / "export.json").write_text(json.dumps(meta, indent=2) + "\n")
        commit_dir(tmp, out, overwrite=force)  # refuses an out that appeared meanwhile, unless forced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
