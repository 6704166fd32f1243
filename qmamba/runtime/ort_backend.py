"""ONNX Runtime backend: the exported prefill/decode graphs on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qmamba.runtime.graph_backend import GraphBackend


class OrtBackend(GraphBackend):
    name = "onnxruntime"

    def __init__(self, export_dir: Path, threads: int | None = None) -> None:
        from export.ort import session

        self.dir = Path(export_dir)
        for g in ("prefill", "decode"):
            if not (self.dir / f"{g}.onnx").is_file():
                raise FileNotFoundError(f"{self.dir / (g + '.onnx')} not found: run qmamba export first")
        self.sessions = {g: session(self.dir / f"{g}.onnx", threads) for g in ("prefill", "decode")}
        logits = next(o for o in self.sessions["prefill"].get_outputs() if o.name == "logits")
        v = logits.shape[-1]
        if not isinstance(v, int):
            meta = json.loads((self.dir / "export.json").read_text())
            v = meta["model_config"]["vocab_size"]
        self.vocab_size = int(v)

    def _state_inputs(self) -> list[str]:
        return [i.name for i in self.sessions["decode"].get_inputs() if i.name != "input_ids"]

    def _run(self, graph: str, feeds: dict[str, np.ndarray]):
        sess = self.sessions[graph]
        names = [o.name for o in sess.get_outputs()]
        want = [n for n in names if not n.startswith("layers.")]  # skip per-stage outputs if exported
        return sess.run(want, feeds), want
