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

from qmamba.errors import UserError
from qmamba.model.mamba import LayerState
from qmamba.runtime.graph_backend import GraphBackend


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


FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}  # --recipe for a float model on the torch backend


def known_recipes() -> list[str]:
    from qmamba.quant.recipes import RECIPES

    return ["fp32", *RECIPES]


def check_recipe_name(recipe: str | None) -> None:
    """An unknown recipe is an error, not a silent fp32 run."""
    if recipe is not None and recipe not in known_recipes():
        raise UserError(f"unknown recipe {recipe!r}; choose one of: {', '.join(known_recipes())}")


def _check_recipe_matches(recipe: str | None, holds: str | None, what: str) -> None:
    """The recipe is fixed by what the model directory holds: --recipe may only restate it."""
    if recipe is not None and holds is not None and recipe != holds:
        raise UserError(f"--recipe {recipe} does not match {what}, which holds recipe {holds} "
                        "(leave --recipe out to use it as it is)")


def check_device(kind: str, device: str | None) -> torch.device | None:
    """The device a backend runs on; None: the backend's own (cpu for torch, the CUDA GPU for tensorrt)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"device {device!r} is not a device: use cpu or cuda[:N]") from None
    if kind == "onnxruntime" and dev.type != "cpu":
        raise UserError(f"the onnxruntime backend runs on the CPU only, not on {device!r} (use --device cpu)")
    if kind == "tensorrt" and (dev.type != "cuda" or dev.index not in (None, 0)):
        raise UserError(f"the tensorrt backend runs on the current CUDA GPU (--device cuda), not on {device!r}")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device {device!r}: the torch backend runs on cpu or cuda[:N]")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch is a CPU-only build" if torch.version.cuda is None else "none is visible"
            raise UserError(f"device {device!r} needs a CUDA GPU: {why} (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return dev


def load_backend(kind: str, model: str | Path, recipe: str | None = None, device: str | None = None) -> Backend:
    """kind: torch | onnxruntime | tensorrt. model: a float model dir, a QDIR, or an export/engine dir.

    recipe: for a float model fp32 (default) or fp16; for a QDIR, an export or an engine it may only name the recipe
    they hold. device: None is the backend's own (see check_device). Bad values raise UserError."""
    kind = kind.lower()
    if kind not in ("torch", "onnxruntime", "tensorrt"):
        raise ValueError(f"unknown backend {kind!r}: choose torch, onnxruntime or tensorrt")
    check_recipe_name(recipe)
    dev = check_device(kind, device)
    if kind == "torch":
        from qmamba.model.checkpoint import load_model
        from qmamba.quant.checkpoint import is_qdir, load_quantized

        dev = dev or torch.device("cpu")
        if is_qdir(model):
            q = load_quantized(model)
            _check_recipe_matches(recipe, q.recipe.name, f"the quantized checkpoint {model}")
            if dev.type == "cuda":  # kernels + int8 GEMMs + CUDA-graph decode
                from qmamba.runtime.cuda_model import CudaBackend

                return CudaBackend(q, str(dev))
            return TorchBackend(q, str(dev))
        if recipe is not None and recipe not in FLOAT_DTYPES:
            raise UserError(f"--recipe {recipe} needs a quantized checkpoint, and {model} is a float model: "
                            f"make one with `qmamba calibrate {model} --recipe {recipe} --out QDIR`, "
                            "or use --recipe fp32 / fp16")
        return TorchBackend(load_model(model, FLOAT_DTYPES[recipe or "fp32"]), str(dev))
    if kind == "onnxruntime":
        from qmamba.runtime.ort_backend import OrtBackend

        backend: GraphBackend = OrtBackend(Path(model))
    else:
        from qmamba.runtime.trt_backend import TrtBackend

        backend = TrtBackend(Path(model))
    _check_recipe_matches(recipe, backend.recipe, f"the {kind} model in {model}")
    return backend
