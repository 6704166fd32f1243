"""TensorRT backend: the prefill/decode engines built by `qmamba build-engine`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engines.build import EngineError, load_engine
from qmamba.runtime.graph_backend import GraphBackend


class TrtBackend(GraphBackend):
    name = "tensorrt"

    def __init__(self, engine_dir: Path, plugins: Path | None = None) -> None:
        import tensorrt as trt
        import torch

        self.trt, self.torch = trt, torch
        self.engines, self.contexts = {}, {}
        meta = None
        for g in ("prefill", "decode"):
            eng, meta = load_engine(engine_dir, g, plugins)
            self.engines[g] = eng
            self.contexts[g] = eng.create_execution_context()
        try:
            self.vocab_size = int(meta["export"]["model_config"]["vocab_size"])
        except (KeyError, TypeError):
            raise EngineError(f"{engine_dir}/engine.json lacks the export's model_config (rebuild)") from None
        self.stream = torch.cuda.Stream()

    def _io(self, graph: str, mode) -> list[str]:
        eng = self.engines[graph]
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        return [n for n in names if eng.get_tensor_mode(n) == mode]

    def _state_inputs(self) -> list[str]:
        return [n for n in self._io("decode", self.trt.TensorIOMode.INPUT) if n != "input_ids"]

    def _run(self, graph: str, feeds: dict[str, np.ndarray]):
        trt, torch = self.trt, self.torch
        eng, ctx = self.engines[graph], self.contexts[graph]
        keep = []
        for name, arr in feeds.items():
            t = torch.from_numpy(np.ascontiguousarray(arr)).cuda()
            keep.append(t)
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise EngineError(f"{graph} engine rejects shape {tuple(t.shape)} for {name} (outside its profile)")
            ctx.set_tensor_address(name, t.data_ptr())
        outs, names = [], []
        for name in self._io(graph, trt.TensorIOMode.OUTPUT):
            shape = tuple(ctx.get_tensor_shape(name))
            dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int8: torch.int8,
                     trt.uint8: torch.uint8, trt.int32: torch.int32, trt.int64: torch.int64}[eng.get_tensor_dtype(name)]
            t = torch.empty(shape, dtype=dtype, device="cuda")
            ctx.set_tensor_address(name, t.data_ptr())
            outs.append(t)
            names.append(name)
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise EngineError(f"TensorRT failed to run the {graph} engine")
        self.stream.synchronize()
        pairs = [(n, o) for n, o in zip(names, outs, strict=True) if not n.startswith("layers.")]
        return [o.cpu().numpy() for _, o in pairs], [n for n, _ in pairs]
