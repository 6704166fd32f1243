"""Shared logic of the exported-graph backends (onnxruntime, tensorrt).

Both run `prefill` (input_ids [B, L] -> logits [B, L, V] + per-layer states) and `decode`
(input_ids [B, 1] + states -> logits + new states). States are matched by position: the prefill
graph's non-logits outputs, the decode graph's non-input_ids inputs and its non-logits outputs
list the per-layer states in the same order (export/ guarantees it).
"""

from __future__ import annotations

import numpy as np
import torch


class GraphBackend:
    name = "graph"
    vocab_size: int

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def _state_inputs(self) -> list[str]:
        raise NotImplementedError

    def _split(self, outs: list[np.ndarray], names: list[str]) -> tuple[torch.Tensor, list[np.ndarray]]:
        li = names.index("logits")
        logits = torch.from_numpy(np.ascontiguousarray(outs[li][:, -1])).float()
        return logits, [o for i, o in enumerate(outs) if i != li]

    def prefill(self, ids: torch.Tensor):
        outs, names = self._run("prefill", {"input_ids": ids.numpy().astype(np.int64)})
        return self._split(outs, names)

    def decode(self, tokens: torch.Tensor, states: list[np.ndarray]):
        feeds = {"input_ids": tokens.view(-1, 1).numpy().astype(np.int64)}
        names = self._state_inputs()
        if len(names) != len(states):
            raise RuntimeError(f"decode graph takes {len(names)} states, got {len(states)}")
        feeds.update(zip(names, states, strict=True))
        outs, onames = self._run("decode", feeds)
        return self._split(outs, onames)

    def cat_states(self, states: list[list[np.ndarray]]) -> list[np.ndarray]:
        return [np.concatenate([s[i] for s in states]) for i in range(len(states[0]))]

    def select_states(self, states: list[np.ndarray], index: list[int]) -> list[np.ndarray]:
        return [s[index] for s in states]
