"""Quantized checkpoint directory (QDIR): quant_config.json + model.safetensors (spec section 7).

Written to a temporary directory next to the target and renamed into place, so an interrupted or
failed write never leaves a half-written QDIR.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from qmamba.config import MambaConfig
from qmamba.errors import UserError
from qmamba.model.checkpoint import (
    CheckpointError,
    atomic_dir,
    commit_dir,
    follow_umask,
    json_kind,
    read_json_object,
    read_safetensors,
)
from qmamba.ops.specmath import SPEC_VERSION
from qmamba.quant.qmodel import QLayer, QLinear, QuantMambaLM
from qmamba.quant.recipes import get_recipe, scale_names

FORMAT = "qmamba-quantized"
# what load_quantized reads from quant_config.json, with its JSON type (format and spec_version are
# compared to fixed values); everything else there is kept as metadata
_REQUIRED_KEYS: dict[str, type] = {"recipe": str, "model_config": dict, "scales": dict}


class QuantCheckpointError(UserError, ValueError):
    """A QDIR that is missing, inconsistent with its recipe, or from another spec version."""


def _layer_tensors(i: int, lyr: QLayer) -> dict[str, torch.Tensor]:
    p = f"layers.{i}."
    t = {
        p + "norm.weight": lyr.norm_weight,
        p + "conv1d.bias": lyr.conv_bias,
        p + "dt_proj.bias": lyr.dt_bias,
        p + "A_log": lyr.A_log,
        p + "D": lyr.D,
    }
    for name in ("in_proj", "x_proj", "dt_proj", "out_proj"):
        lin: QLinear = getattr(lyr, name)
        t[p + name + ".weight_q"] = lin.weight_q
        t[p + name + ".weight_scale"] = lin.weight_scale
    if lyr.conv_weight_q is not None:
        t[p + "conv1d.weight_q"] = lyr.conv_weight_q
        t[p + "conv1d.weight_scale"] = lyr.conv_weight_scale
    else:
        t[p + "conv1d.weight"] = lyr.conv_weight
    return t


def save_quantized(model: QuantMambaLM, out_dir: str | Path, extra_meta: dict | None = None) -> Path:
    out_dir = Path(out_dir)
    tensors = {"embedding.weight_q": model.embedding.weight_q, "embedding.weight_scale": model.embedding.weight_scale,
               "norm_f.weight": model.norm_f_weight}
    scales = {}
    for i, lyr in enumerate(model.layers):
        tensors.update(_layer_tensors(i, lyr))
        scales.update({f"layers.{i}.{k}": v for k, v in lyr.scales.items()})
    meta = {
        "format": FORMAT,
        "spec_version": SPEC_VERSION,
        "recipe": model.recipe.name,
        "model_config": model.cfg.to_hf(),
        "scales": scales,
        **model.meta,
        **(extra_meta or {}),
    }
    tmp = atomic_dir(out_dir)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
        follow_umask(tmp / "model.safetensors")
        (tmp / "quant_config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def is_qdir(path: str | Path) -> bool:
    return (Path(path) / "quant_config.json").is_file()


def load_quantized(qdir: str | Path) -> QuantMambaLM:
    qdir = Path(qdir)
    cfg_path = qdir / "quant_config.json"
    if not cfg_path.is_file():
        raise QuantCheckpointError(f"{qdir} is not a quantized checkpoint: quant_config.json not found")
    meta = read_json_object(cfg_path, QuantCheckpointError)
    if meta.get("format") != FORMAT:
        raise QuantCheckpointError(f"{cfg_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    if meta.get("spec_version") != SPEC_VERSION:
        raise QuantCheckpointError(
            f"{cfg_path}: spec_version {meta.get('spec_version')!r}, this qmamba implements {SPEC_VERSION}; "
            "re-run `qmamba calibrate` on the float checkpoint to write this version (docs/quantization.md, "
            "section 8 lists what changed)"
        )
    missing_keys = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing_keys:
        raise QuantCheckpointError(f"{cfg_path}: missing keys {missing_keys}")
    for key, kind in _REQUIRED_KEYS.items():
        if not isinstance(meta[key], kind):
            raise QuantCheckpointError(f"{cfg_path}: {key} is {json_kind(meta[key])}, expected {json_kind(kind())}")
    recipe = get_recipe(meta["recipe"])
    try:
        cfg = MambaConfig.from_dict(meta["model_config"])
    # ConfigError is a ValueError; a field of the wrong type fails as KeyError/TypeError/AttributeError
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise QuantCheckpointError(f"{cfg_path}: model_config is not a Mamba-1 config ({detail})") from e
    scales = meta["scales"]
    missing = [n for i in range(cfg.n_layer) for n in scale_names(recipe, i) if n not in scales]
    if missing:
        raise QuantCheckpointError(f"{cfg_path}: missing scales for recipe {recipe.name}: {missing[:6]}")
    bad = [n for n, v in scales.items() if not (isinstance(v, float | int) and v > 0 and v < float("inf"))]
    if bad:
        raise QuantCheckpointError(f"{cfg_path}: scales must be positive finite numbers: {bad[:6]}")
    st = qdir / "model.safetensors"
    if not st.is_file():
        raise QuantCheckpointError(f"{qdir}: model.safetensors not found")
    try:
        t = read_safetensors(st)
    except CheckpointError as e:
        raise QuantCheckpointError(str(e)) from e

    def get(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if name not in t:
            raise QuantCheckpointError(f"{st}: tensor {name} missing")
        if tuple(t[name].shape) != shape or t[name].dtype != dtype:
            raise QuantCheckpointError(
                f"{st}: tensor {name} is {t[name].dtype}{tuple(t[name].shape)}, expected {dtype}{shape}"
            )
        return t[name]

    d, dm, n, r, k = cfg.d_inner, cfg.d_model, cfg.d_state, cfg.dt_rank, cfg.d_conv
    i8, f32 = torch.int8, torch.float32

    def lin(name: str, cout: int, cin: int) -> QLinear:
        return QLinear(get(name + ".weight_q", (cout, cin), i8), get(name + ".weight_scale", (cout,), f32))

    layers = []
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        layers.append(
            QLayer(
                norm_weight=get(p + "norm.weight", (dm,), f32),
                in_proj=lin(p + "in_proj", 2 * d, dm),
                conv_weight_q=get(p + "conv1d.weight_q", (d, k), i8) if recipe.int8_ssm else None,
                conv_weight_scale=get(p + "conv1d.weight_scale", (d,), f32) if recipe.int8_ssm else None,
                conv_weight=None if recipe.int8_ssm else get(p + "conv1d.weight", (d, k), f32),
                conv_bias=get(p + "conv1d.bias", (d,), f32),
                x_proj=lin(p + "x_proj", r + 2 * n, d),
                dt_proj=lin(p + "dt_proj", d, r),
                dt_bias=get(p + "dt_proj.bias", (d,), f32),
                A_log=get(p + "A_log", (d, n), f32),
                D=get(p + "D", (d,), f32),
                out_proj=lin(p + "out_proj", dm, d),
                scales={k2[len(p):]: float(v) for k2, v in scales.items() if k2.startswith(p)},
            )
        )
    keep = {k2: v for k2, v in meta.items() if k2 not in ("scales", "model_config")}
    return QuantMambaLM(
        cfg, recipe, layers, lin("embedding", cfg.vocab_size, dm),
        get("norm_f.weight", (dm,), f32), keep,
    )
