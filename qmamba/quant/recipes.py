"""Precision recipes, named by what they do (docs/quantization.md section 5)."""

from __future__ import annotations

import dataclasses


class RecipeError(ValueError):
    """Unknown recipe name or inconsistent recipe options."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    quantized: bool  # W8A8 linears, int8 norm output, Hadamard + int8 out_proj
    int8_ssm: bool  # conv1d output, dt, B, C, z are int8 and the conv is the int8 conv
    dual_scale: bool  # u carries an outlier mask and a second scale
    description: str


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("fp16", False, False, False, "no quantization: fp16 weights/activations, fp32 SSM and residual"),
        Recipe("w8a8", True, True, False, "static per-tensor W8A8, single-scale int8 SSM input"),
        Recipe("w8a8-dualscale", True, True, True, "W8A8 with dual-scale (inlier/outlier) int8 SSM input"),
        Recipe("w8a8-fpssm", True, False, False, "int8 linears; conv1d output and SSM in floating point"),
    )
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise RecipeError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}") from None


def scale_names(recipe: Recipe, layer: int) -> list[str]:
    """Every activation scale a quantized checkpoint of this recipe must contain for one layer."""
    if not recipe.quantized:
        return []
    p = f"layers.{layer}."
    names = [p + "norm", p + "x_proj.dt_lowrank", p + "hadamard"]
    if not recipe.int8_ssm:
        names.append(p + "x_proj.in")  # float u quantized only for x_proj's int8 input
    else:
        names += [p + "in_proj.x", p + "in_proj.z", p + "conv1d", p + "x_proj.B", p + "x_proj.C", p + "dt_proj"]
    if recipe.dual_scale:
        names.append(p + "conv1d.outlier")
    return names
