"""Inference backends behind one interface (like Polygraphy's runners).

A backend runs the model on token ids with an explicit per-layer state cache:

* ``prefill(ids [B, L]) -> (last-token logits [B, V], states)``
* ``decode(tokens [B], states) -> (logits [B, V], states)``
* ``cat_states(list) / select_states(states, idx)`` to batch requests of different prompt lengths
  (Mamba has no attention mask: each prompt is prefilled on its own state, then states are stacked
  for batched decode steps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from qmamba.model.mamba import LayerState


class Backend(Protocol):
    name: str
    vocab_size: int

    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, Any]: ...

    def decode(self, tokens: torch.Tensor, states: Any) -> tuple[torch.Tensor, Any]: ...

    def cat_states(self, states: list[Any]) -> Any: ...

    def select_states(self, states: Any, index: list[int]) -> Any: ...


class TorchBackend:
    """PyTorch modules: the float model (fp16/fp32) or a quantized model's integer path."""

    name = "torch"

    def __init__(self, model, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.vocab_size = model.cfg.vocab_size

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[LayerState]]:
        logits, states = self.model(ids.to(self.device))
        return logits[:, -1].float().cpu(), states

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, states: list[LayerState]) -> tuple[torch.Tensor, list[LayerState]]:
        logits, states = self.model(tokens.view(-1, 1).to(self.device), states)
        return logits[:, -1].float().cpu(), states

    def cat_states(self, states: list[list[LayerState]]) -> list[LayerState]:
        return [
            LayerState(torch.cat([s[i].conv for s in states]), torch.cat([s[i].ssm for s in states]))
            for i in range(len(states[0]))
        ]

    def select_states(self, states: list[LayerState], index: list[int]) -> list[LayerState]:
        idx = torch.tensor(index, dtype=torch.long)
        return [LayerState(s.conv[idx.to(s.conv.device)], s.ssm[idx.to(s.ssm.device)]) for s in states]


def load_backend(kind: str, model: str | Path, recipe: str | None = None, device: str = "cpu") -> Backend:
    """kind: torch | onnxruntime | tensorrt. model: a float model dir, a QDIR, or an export/engine dir."""
    kind = kind.lower()
    if kind == "torch":
        from qmamba.model.checkpoint import load_model
        from qmamba.quant.checkpoint import is_qdir, load_quantized

        if is_qdir(model):
            if torch.device(device).type == "cuda":  # kernels + int8 GEMMs + CUDA-graph decode
                from qmamba.runtime.cuda_model import CudaBackend

                return CudaBackend(load_quantized(model), device)
            return TorchBackend(load_quantized(model), device)
        dtype = torch.float16 if recipe == "fp16" else torch.float32
        return TorchBackend(load_model(model, dtype), device)
    if kind == "onnxruntime":
        from qmamba.runtime.ort_backend import OrtBackend

        return OrtBackend(Path(model))
    if kind == "tensorrt":
        from qmamba.runtime.trt_backend import TrtBackend

        return TrtBackend(Path(model))
    raise ValueError(f"unknown backend {kind!r}: choose torch, onnxruntime or tensorrt")
