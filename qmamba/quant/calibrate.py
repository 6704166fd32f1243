"""Static calibration: observe the float model's stage tensors, then quantize weights and activations.

Observers (docs/quantization.md section 3): min-max for every activation except the SSM input u,
which uses the percentile observer (alpha, default 0.9995); the dual-scale outlier scale is
max|u|/127 (or s_in * outlier_factor). Weights: per output channel (default) or per tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from tqdm import tqdm

from qmamba import trace
from qmamba.model.mamba import MambaLM
from qmamba.ops.hadamard import factor, hadamard_matrix
from qmamba.ops.specmath import QMAX, QMIN, quantize
from qmamba.quant.qmodel import QLayer, QLinear, QuantMambaLM
from qmamba.quant.recipes import Recipe


class CalibrationError(ValueError):
    """Calibration cannot produce valid scales (bad data, non-finite activations, bad options)."""


@dataclasses.dataclass(frozen=True)
class CalibOptions:
    alpha: float = 0.9995
    outlier_factor: float | None = None  # None: s_out = max|u| / 127
    weight_granularity: str = "per_channel"

    def __post_init__(self) -> None:
        if not 0.5 < self.alpha <= 1.0:
            raise CalibrationError(f"alpha must be in (0.5, 1], got {self.alpha}")
        if self.outlier_factor is not None and not self.outlier_factor > 1.0:
            raise CalibrationError(f"outlier factor must be > 1, got {self.outlier_factor}")
        if self.weight_granularity not in ("per_channel", "per_tensor"):
            raise CalibrationError(
                f"weight granularity must be per_channel or per_tensor, got {self.weight_granularity!r}"
            )


_OBSERVED = ("norm", "in_proj.x", "in_proj.z", "conv1d", "x_proj.dt_lowrank", "x_proj.B", "x_proj.C",
             "dt_proj", "hadamard")


@dataclasses.dataclass
class Stats:
    absmax: dict[str, float]
    u_values: dict[int, list[torch.Tensor]]  # layer -> signed conv outputs
    tokens: int = 0
    samples: int = 0


def scale_from(stat: float) -> float:
    """s = stat / 127 in float32; a zero statistic gives 1.0 (spec section 3)."""
    s = torch.tensor(stat / 127.0, dtype=torch.float32).item()
    return s if stat > 0 else 1.0


@torch.no_grad()
def collect_stats(model: MambaLM, batches: Iterable[torch.Tensor], total: int | None = None,
                  progress: bool = True) -> Stats:
    stats = Stats({}, {i: [] for i in range(model.cfg.n_layer)})
    pattern = r"layers\.\d+\.(" + "|".join(s.replace(".", r"\.") for s in _OBSERVED) + ")"
    for batch in tqdm(batches, total=total, desc="calibrate", unit="batch", disable=not progress):
        with trace.trace(include=pattern) as tr:
            model(batch)
        for name, t in tr.as_dict().items():
            if not torch.isfinite(t).all():
                bad = "NaN" if torch.isnan(t).any() else "Inf"
                layer, stage = trace.split_name(name)
                raise CalibrationError(f"{bad} in activations at layer {layer}, stage {stage} ({name})")
            m = t.abs().max().item()
            stats.absmax[name] = max(stats.absmax.get(name, 0.0), m)
            layer, stage = trace.split_name(name)
            if stage == "conv1d":
                stats.u_values[layer].append(t.reshape(-1).clone())
        stats.tokens += batch.numel()
        stats.samples += batch.shape[0]
    if stats.samples == 0:
        raise CalibrationError("the calibration set is empty: no batches were given")
    return stats


def _percentile(abs_values: torch.Tensor, alpha: float) -> float:
    """Linear-interpolated order statistic, as torch.quantile (which caps its input size)."""
    v, _ = torch.sort(abs_values.double())
    pos = alpha * (v.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, v.numel() - 1)
    return float(v[lo] + (pos - lo) * (v[hi] - v[lo]))


def _quant_weight(w: torch.Tensor, granularity: str) -> QLinear:
    w = w.detach().double()
    if granularity == "per_channel":
        amax = w.abs().amax(1)
    else:
        amax = w.abs().max().expand(w.shape[0])
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).float()
    return QLinear(quantize(w.float(), scale[:, None]), scale)


def outlier_fraction(u: torch.Tensor, s_in: float) -> float:
    q = torch.round(u / torch.tensor(s_in, dtype=torch.float32))
    return ((q < QMIN) | (q > QMAX)).double().mean().item()


@torch.no_grad()
def quantize_model(model: MambaLM, recipe: Recipe, stats: Stats, opts: CalibOptions) -> QuantMambaLM:
    if not recipe.quantized:
        raise CalibrationError(f"recipe {recipe.name} has no quantization to calibrate")
    cfg = model.cfg
    factor(cfg.d_inner)  # fails early with a clear message if no spec Hadamard exists
    hn = hadamard_matrix(cfg.d_inner)
    layers, fractions = [], {}
    for i, blk in enumerate(model.backbone.layers):
        mx = blk.mixer
        p = f"layers.{i}."

        def amax(stage: str, _p: str = p, _i: int = i) -> float:
            key = _p + stage
            if key not in stats.absmax:
                raise CalibrationError(f"no statistics for layer {_i}, stage {stage}: model/checkpoint mismatch")
            return stats.absmax[key]

        u = torch.cat(stats.u_values[i]) if stats.u_values[i] else None
        if u is None:
            raise CalibrationError(f"no conv1d outputs observed for layer {i}")
        s_u = scale_from(_percentile(u.abs(), opts.alpha))
        scales = {
            "norm": scale_from(amax("norm")),
            "x_proj.dt_lowrank": scale_from(amax("x_proj.dt_lowrank")),
            "hadamard": scale_from(amax("hadamard")),
        }
        if recipe.int8_ssm:
            scales.update({
                "in_proj.x": scale_from(amax("in_proj.x")),
                "in_proj.z": scale_from(amax("in_proj.z")),
                "conv1d": s_u,
                "x_proj.B": scale_from(amax("x_proj.B")),
                "x_proj.C": scale_from(amax("x_proj.C")),
                "dt_proj": scale_from(amax("dt_proj")),
            })
        else:
            scales["x_proj.in"] = s_u
        if recipe.dual_scale:
            if opts.outlier_factor is None:
                s_out = max(scale_from(amax("conv1d")), s_u)
            else:
                s_out = torch.tensor(s_u * opts.outlier_factor, dtype=torch.float32).item()
            scales["conv1d.outlier"] = s_out
        fractions[f"layers.{i}"] = outlier_fraction(u, s_u)

        conv_w = mx.conv1d.weight[:, 0, :].detach().float()
        conv_q = _quant_weight(conv_w, opts.weight_granularity) if recipe.int8_ssm else None
        out_rot = (mx.out_proj.weight.detach().double() @ hn.T).float()
        layers.append(
            QLayer(
                norm_weight=blk.norm.weight.detach().float().clone(),
                in_proj=_quant_weight(mx.in_proj.weight, opts.weight_granularity),
                conv_weight_q=None if conv_q is None else conv_q.weight_q,
                conv_weight_scale=None if conv_q is None else conv_q.weight_scale,
                conv_weight=None if recipe.int8_ssm else conv_w.clone(),
                conv_bias=mx.conv_bias().detach().float().clone(),
                x_proj=_quant_weight(mx.x_proj.weight, opts.weight_granularity),
                dt_proj=_quant_weight(mx.dt_proj.weight, opts.weight_granularity),
                dt_bias=mx.dt_proj.bias.detach().float().clone(),
                A_log=mx.A_log.detach().float().clone(),
                D=mx.D.detach().float().clone(),
                out_proj=_quant_weight(out_rot, opts.weight_granularity),
                scales=scales,
            )
        )
    meta = {
        "alpha": opts.alpha,
        "outlier_factor": opts.outlier_factor,
        "weight_granularity": opts.weight_granularity,
        "outlier_fraction": fractions,
        "calibration": {"samples": stats.samples, "tokens": stats.tokens},
    }
    return QuantMambaLM(
        cfg,
        recipe,
        layers,
        _quant_weight(model.backbone.embeddings.weight, "per_channel"),  # spec 4.7: one scale per vocabulary row
        model.backbone.norm_f.weight.detach().float().clone(),
        meta,
    )


def calibrate(model: MambaLM, recipe: Recipe, calib_ids: torch.Tensor, opts: CalibOptions,
              batch_size: int = 8, progress: bool = True) -> QuantMambaLM:
    """calib_ids [samples, L] -> quantized model. The float model runs in float32."""
    if calib_ids.numel() == 0:
        raise CalibrationError("the calibration set is empty")
    batches = list(calib_ids.split(batch_size))
    stats = collect_stats(model, batches, total=len(batches), progress=progress)
    return quantize_model(model, recipe, stats, opts)
