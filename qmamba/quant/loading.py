"""Build a runnable model for a recipe from a float model directory or a quantized QDIR."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from qmamba.data import DEFAULT_CACHE, load_text, sample_windows
from qmamba.model.checkpoint import load_model
from qmamba.quant.calibrate import CalibOptions, calibrate
from qmamba.quant.checkpoint import is_qdir, load_quantized
from qmamba.quant.recipes import get_recipe

Runnable = Callable[..., tuple[torch.Tensor, list]]


@dataclasses.dataclass
class CalibSpec:
    data: str = "shakespeare:train"
    samples: int = 64
    seq_len: int = 256
    seed: int = 0
    options: CalibOptions = dataclasses.field(default_factory=CalibOptions)
    cache_dir: Path = DEFAULT_CACHE
    progress: bool = True


def calibration_ids(spec: CalibSpec) -> torch.Tensor:
    return sample_windows(load_text(spec.data, spec.cache_dir), spec.samples, spec.seq_len, spec.seed)


def source_model_dir(qdir: Path) -> Path:
    meta = load_quantized(qdir).meta
    src = meta.get("source_model")
    if not src:
        raise ValueError(f"{qdir} does not record its source float model (source_model), needed for fp16")
    p = Path(src)
    if not p.is_absolute():
        p = (qdir / p).resolve()
    if not (p / "config.json").is_file():
        raise ValueError(f"{qdir} was calibrated from {src}, which is not a model directory here")
    return p


def load_runnable(path: str | Path, recipe_name: str, calib: CalibSpec | None = None) -> Runnable:
    """fp16: the float model with fp16 linears; quantized recipes: a QDIR or calibrate in memory."""
    recipe = get_recipe(recipe_name)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if is_qdir(path):
        if not recipe.quantized:
            return load_model(source_model_dir(path), torch.float16)
        q = load_quantized(path)
        if q.recipe.name != recipe.name:
            raise ValueError(f"{path} holds recipe {q.recipe.name}, not {recipe.name}: calibrate it separately")
        return q
    if not recipe.quantized:
        return load_model(path, torch.float16)
    calib = calib or CalibSpec()
    model = load_model(path, torch.float32)
    return calibrate(model, recipe, calibration_ids(calib), calib.options, progress=calib.progress)
