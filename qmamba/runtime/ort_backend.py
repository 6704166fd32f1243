"""ONNX Runtime backend: the exported prefill/decode graphs on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qmamba.errors import UserError
from qmamba.runtime.graph_backend import GRAPHS, GraphBackend


def export_limits(meta: dict) -> tuple[int | None, int | None]:
    """(max_batch, max_len) an export was made for (export.json), None where it does not say."""
    def get(key: str) -> int | None:
        v = meta.get(key)
        return int(v) if isinstance(v, int) and v >= 1 else None

    return get("max_batch"), get("max_len")


class OrtBackend(GraphBackend):
    name = "onnxruntime"

    def __init__(self, export_dir: Path, threads: int | None = None) -> None:
        from export.ort import session

        self.dir = Path(export_dir)
        for g in GRAPHS:
            if not (self.dir / f"{g}.onnx").is_file():
                raise FileNotFoundError(f"{self.dir / (g + '.onnx')} not found: run qmamba export first")
        self.sessions = {}
        for g in GRAPHS:
            path = self.dir / f"{g}.onnx"
            try:
                self.sessions[g] = session(path, threads)
            except ImportError as e:
                raise UserError(f"the onnxruntime backend needs ONNX Runtime, which is not installed ({e}): "
                                "install the export extra (pip install -e '.[export]')") from e
            except Exception as e:  # ORT's load errors (InvalidProtobuf, InvalidGraph, Fail...) share no base
                raise UserError(f"ONNX Runtime cannot load {path}: {type(e).__name__}: {e}") from e
        for g in GRAPHS:
            self._check_outputs(g, [o.name for o in self.sessions[g].get_outputs()], str(self.dir))
        props = self.sessions["prefill"].get_modelmeta().custom_metadata_map
        self.recipe = props.get("qmamba.recipe")
        meta_file = self.dir / "export.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        logits = next(o for o in self.sessions["prefill"].get_outputs() if o.name == "logits")
        v = logits.shape[-1]
        if not isinstance(v, int):
            v = meta["model_config"]["vocab_size"]
        self.vocab_size = int(v)
        self.max_batch, self.max_len = export_limits(meta)

    def _state_inputs(self) -> list[str]:
        return [i.name for i in self.sessions["decode"].get_inputs() if i.name != "input_ids"]

    def _run(self, graph: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        return self.sessions[graph].run(outputs, feeds)  # ORT computes only what the named outputs need
