"""Per-stage comparison of two traces: metrics, the first stage whose error jumps, table, JSON, heatmap.

Shared by `qmamba compare` (recipe vs recipe in PyTorch) and `qmamba check` (backend vs reference).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from qmamba.trace import LAYER_STAGES, QTensor, split_name

# A stage "jumps" when its relative L2 error is at least JUMP_RATIO times the largest error of every
# stage before it and above JUMP_FLOOR (errors below the floor are float rounding, not a cause).
JUMP_RATIO = 2.0
JUMP_FLOOR = 1e-3


@dataclasses.dataclass
class StageMetrics:
    name: str
    layer: int | None
    stage: str
    rel_l2: float
    max_abs: float
    sqnr_db: float
    cosine: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def metrics(name: str, ref: torch.Tensor, tgt: torch.Tensor) -> StageMetrics:
    if ref.shape != tgt.shape:
        raise ValueError(f"stage {name}: reference shape {tuple(ref.shape)} != target shape {tuple(tgt.shape)}")
    r, t = ref.double().reshape(-1), tgt.double().reshape(-1)
    err = t - r
    nr, ne = r.norm().item(), err.norm().item()
    rel = ne / nr if nr > 0 else (0.0 if ne == 0 else math.inf)
    sqnr = math.inf if ne == 0 else (10 * math.log10(nr**2 / ne**2) if nr > 0 else -math.inf)
    nt = t.norm().item()
    cos = (r @ t).item() / (nr * nt) if nr > 0 and nt > 0 else (1.0 if nr == nt else 0.0)
    layer, stage = split_name(name)
    return StageMetrics(name, layer, stage, rel, err.abs().max().item() if err.numel() else 0.0, sqnr, cos)


def _order(name: str) -> tuple:
    layer, stage = split_name(name)
    if layer is None:
        return (10**9, 0 if stage == "norm_f" else 1, stage)
    idx = LAYER_STAGES.index(stage) if stage in LAYER_STAGES else len(LAYER_STAGES)
    return (layer, idx, stage)


def as_float(v: torch.Tensor | QTensor) -> torch.Tensor:
    return v.dequantize() if isinstance(v, QTensor) else v.float()


def compare_stages(ref: dict, tgt: dict, skip_masks: bool = True) -> list[StageMetrics]:
    """Metrics for every stage present in both traces, in execution order."""
    names = sorted((set(ref) & set(tgt)), key=_order)
    if skip_masks:
        names = [n for n in names if not n.endswith(".mask")]
    return [metrics(n, as_float(ref[n]), as_float(tgt[n])) for n in names]


def first_error(rows: list[StageMetrics]) -> StageMetrics | None:
    """The first stage whose relative L2 error reaches JUMP_FLOOR: where error enters."""
    return next((r for r in rows if r.rel_l2 >= JUMP_FLOOR), None)


def first_jump(rows: list[StageMetrics]) -> StageMetrics | None:
    """The first stage after the error entered whose error is >= JUMP_RATIO x every earlier stage.

    In a backend check (errors ~0 until a bug) the entering stage is itself the jump; in a recipe
    comparison quantization noise enters at the very first stage, and a jump is a later amplification.
    """
    entered = first_error(rows)
    if entered is None:
        return None
    worst = 0.0
    for r in rows:
        if r is not entered and worst >= JUMP_FLOOR and r.rel_l2 >= JUMP_RATIO * worst:
            return r
        if r is entered and r is not rows[0] and worst < JUMP_FLOOR / JUMP_RATIO:
            return r  # error appears after exact stages: that is the jump
        worst = max(worst, r.rel_l2)
    return None


def format_table(rows: list[StageMetrics]) -> str:
    head = f"{'layer':>5}  {'stage':<18} {'rel L2':>10} {'max abs':>10} {'SQNR dB':>8} {'cosine':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        layer = "" if r.layer is None else str(r.layer)
        sq = "inf" if math.isinf(r.sqnr_db) else f"{r.sqnr_db:.1f}"
        lines.append(
            f"{layer:>5}  {r.stage:<18} {r.rel_l2:>10.3e} {r.max_abs:>10.3e} {sq:>8} {r.cosine:>9.6f}"
        )
    return "\n".join(lines)


def write_report(rows: list[StageMetrics], out_dir: Path, title: str, extra: dict | None = None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    jump, entered = first_jump(rows), first_error(rows)
    report = {
        "title": title,
        "first_error": None if entered is None else entered.as_dict(),
        "first_jump": None if jump is None else jump.as_dict(),
        "jump_rule": f"error enters at the first stage with rel L2 >= {JUMP_FLOOR}; a jump is a later stage "
        f"with rel L2 >= {JUMP_RATIO}x every earlier stage (or the entering stage when earlier errors are "
        f"below {JUMP_FLOOR / JUMP_RATIO})",
        "stages": [r.as_dict() for r in rows],
        **(extra or {}),
    }
    (out_dir / "compare.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    heatmap(rows, out_dir / "compare.png", title)
    return report


def heatmap(rows: list[StageMetrics], path: Path, title: str) -> None:
    """Layers x stages heatmap of SQNR (dB); white cells are stages absent from a recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layer_rows = [r for r in rows if r.layer is not None]
    if not layer_rows:
        return
    stages = [s for s in LAYER_STAGES if any(r.stage == s for r in layer_rows)]
    layers = sorted({r.layer for r in layer_rows})
    grid = np.full((len(layers), len(stages)), np.nan)
    for r in layer_rows:
        if r.stage in stages:
            grid[layers.index(r.layer), stages.index(r.stage)] = min(r.sqnr_db, 120.0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(stages), 1.2 + 0.45 * len(layers)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(stages)), stages, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers], fontsize=8)
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
    fig.colorbar(im, ax=ax, label="SQNR (dB, higher is better)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
