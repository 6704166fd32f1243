"""Per-stage tracing: named stage tensors captured through a context manager, no prints in forward().

Stage names are a contract shared with the ONNX exporter and the TensorRT checks:
``layers.{i}.norm``, ``layers.{i}.in_proj.x``, ``layers.{i}.in_proj.z``, ``layers.{i}.conv1d``
(``layers.{i}.conv1d.mask`` for dual-scale), ``layers.{i}.x_proj.dt_lowrank``, ``layers.{i}.x_proj.B``,
``layers.{i}.x_proj.C``, ``layers.{i}.dt_proj``, ``layers.{i}.ssm``, ``layers.{i}.hadamard``,
``layers.{i}.out_proj``, ``layers.{i}.block``, then ``norm_f`` and ``logits``. Every stage tensor is
[B, L, C]; successive calls (prefill then decode steps) are concatenated along L.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from collections.abc import Iterator

import torch

LAYER_STAGES = (
    "norm",
    "in_proj.x",
    "in_proj.z",
    "conv1d",
    "conv1d.mask",
    "x_proj.dt_lowrank",
    "x_proj.B",
    "x_proj.C",
    "dt_proj",
    "ssm",
    "hadamard",
    "out_proj",
    "block",
)


def stage_name(layer: int, stage: str) -> str:
    return f"layers.{layer}.{stage}"


def split_name(name: str) -> tuple[int | None, str]:
    """'layers.3.x_proj.B' -> (3, 'x_proj.B'); 'logits' -> (None, 'logits')."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


@dataclasses.dataclass
class QTensor:
    """An int8 stage tensor with its quantization: codes (int8), scale, optional outlier mask."""

    codes: torch.Tensor
    scale: float
    mask: torch.Tensor | None = None
    outlier_scale: float | None = None

    def dequantize(self) -> torch.Tensor:
        s = torch.full(self.codes.shape, self.scale, dtype=torch.float32)
        if self.mask is not None:
            s = torch.where(self.mask.bool(), torch.tensor(self.outlier_scale, dtype=torch.float32), s)
        return self.codes.float() * s


StageValue = torch.Tensor | QTensor


class Tracer:
    def __init__(self, include: re.Pattern | None = None) -> None:
        self._parts: dict[str, list[StageValue]] = {}
        self._include = include

    def wants(self, name: str) -> bool:
        return self._include is None or bool(self._include.fullmatch(name))

    def record(self, name: str, value: StageValue) -> None:
        if not self.wants(name):
            return
        if isinstance(value, QTensor):
            value = QTensor(
                value.codes.detach().cpu(),
                float(value.scale),
                None if value.mask is None else value.mask.detach().cpu(),
                value.outlier_scale,
            )
        elif value.is_floating_point():
            value = value.detach().float().cpu()
        else:
            value = value.detach().cpu()  # integer tensors (outlier masks) keep their dtype
        self._parts.setdefault(name, []).append(value)

    @property
    def names(self) -> list[str]:
        return list(self._parts)

    def get(self, name: str) -> StageValue:
        parts = self._parts[name]
        if len(parts) == 1:
            return parts[0]
        if isinstance(parts[0], QTensor):
            return QTensor(
                torch.cat([p.codes for p in parts], 1),
                parts[0].scale,
                None if parts[0].mask is None else torch.cat([p.mask for p in parts], 1),
                parts[0].outlier_scale,
            )
        return torch.cat(parts, 1)

    def as_dict(self) -> dict[str, StageValue]:
        return {n: self.get(n) for n in self._parts}

    def float_dict(self) -> dict[str, torch.Tensor]:
        """Every stage as float32 real values (int8 stages dequantized)."""
        out = {}
        for n, v in self.as_dict().items():
            out[n] = v.dequantize() if isinstance(v, QTensor) else v
        return out


_ACTIVE: contextvars.ContextVar[Tracer | None] = contextvars.ContextVar("qmamba_tracer", default=None)


@contextlib.contextmanager
def trace(include: str | None = None) -> Iterator[Tracer]:
    """Capture stage tensors of every forward() run inside the block.

    include: optional regex over stage names (full match), e.g. r"layers\\.0\\..*".
    """
    tracer = Tracer(re.compile(include) if include else None)
    token = _ACTIVE.set(tracer)
    try:
        yield tracer
    finally:
        _ACTIVE.reset(token)


def active() -> Tracer | None:
    return _ACTIVE.get()


def record(name: str, value: StageValue) -> None:
    tracer = _ACTIVE.get()
    if tracer is not None:
        tracer.record(name, value)
