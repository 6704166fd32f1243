"""TensorRT backend: the prefill/decode engines built by `qmamba build-engine`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engines.build import EngineError, load_engine
from qmamba.runtime.graph_backend import GRAPHS, GraphBackend


def profile_limits(meta: dict) -> tuple[int | None, int | None]:
    """(largest decode batch, longest prefill) of the optimization profiles in engine.json; None where unknown.

    Prompts are prefilled one at a time, so the prefill profile's batch does not bound the server's batch."""
    profiles = meta.get("profiles") or {}

    def top(key: str) -> int | None:
        v = profiles.get(key)
        return int(v[2]) if isinstance(v, list | tuple) and len(v) == 3 and isinstance(v[2], int) else None

    return top("decode_batch"), top("length")


class TrtBackend(GraphBackend):
    name = "tensorrt"

    def __init__(self, engine_dir: Path, plugins: Path | None = None) -> None:
        import torch

        self.engines, self.contexts = {}, {}
        meta = None
        for g in GRAPHS:  # load_engine first: it says what is missing (TensorRT, a GPU, the plugins, the files)
            eng, meta = load_engine(engine_dir, g, plugins)
            self.engines[g] = eng
            self.contexts[g] = eng.create_execution_context()
        import tensorrt as trt  # importable: load_engine succeeded

        self.trt, self.torch = trt, torch
        try:
            self.vocab_size = int(meta["export"]["model_config"]["vocab_size"])
        except (KeyError, TypeError):
            raise EngineError(f"{engine_dir}/engine.json lacks the export's model_config (rebuild)") from None
        self.recipe = meta["export"].get("recipe")
        self.max_batch, self.max_len = profile_limits(meta)
        for g in GRAPHS:
            self._check_outputs(g, self._io(g, trt.TensorIOMode.OUTPUT), str(engine_dir))
        self.stream = torch.cuda.Stream()

    def _io(self, graph: str, mode) -> list[str]:
        eng = self.engines[graph]
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        return [n for n in names if eng.get_tensor_mode(n) == mode]

    def _state_inputs(self) -> list[str]:
        return [n for n in self._io("decode", self.trt.TensorIOMode.INPUT) if n != "input_ids"]

    def _run(self, graph: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        with self.torch.cuda.stream(self.stream):  # copies, buffers and the engine on one stream: no cross-stream race
            return self._run_on_stream(graph, feeds, outputs)

    def _run_on_stream(self, graph: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
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
        by_name = dict(zip(names, outs, strict=True))  # every output is bound; only the asked ones are copied back
        return [by_name[n].cpu().numpy() for n in outputs]
