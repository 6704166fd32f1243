"""Shared logic of the exported-graph backends (onnxruntime, tensorrt).

Both run `prefill` (input_ids [B, L] -> logits [B, L, V] + per-layer states) and `decode`
(input_ids [B, 1] + states -> logits + new states). States are matched by name, as export/graph.py
writes them: the decode graph's inputs `conv_state.{i}` / `ssm_state.{i}` are the prefill graph's
outputs of the same names and the decode graph's outputs `conv_state_out.{i}` / `ssm_state_out.{i}`.
Any other output (the per-stage outputs of an export made with --stages, `layers.*` and `norm_f`)
is not a state and is not read.
"""

from __future__ import annotations

import numpy as np
import torch

from qmamba.errors import UserError

GRAPHS = ("prefill", "decode")


def state_output_names(graph: str, state_inputs: list[str]) -> list[str]:
    """The graph's state outputs in the order of the decode graph's state inputs."""
    if graph == "prefill":
        return list(state_inputs)
    outs = []
    for name in state_inputs:
        kind, dot, layer = name.partition(".")
        outs.append(f"{kind}_out{dot}{layer}")
    return outs


class GraphBackend:
    name = "graph"
    vocab_size: int
    recipe: str | None = None  # the recipe the graphs were exported with, where their metadata says
    # What the graphs were built for, where their metadata says (None: not known): the largest decode batch
    # (export.json max_batch; a TensorRT decode profile's max) and the longest prompt one prefill takes
    # (export.json max_len; a TensorRT prefill profile's max length). Callers refuse more up front.
    max_batch: int | None = None
    max_len: int | None = None

    def _run(self, graph: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        """The named outputs of one graph, in that order."""
        raise NotImplementedError

    def _state_inputs(self) -> list[str]:
        raise NotImplementedError

    def _check_outputs(self, graph: str, have: list[str], where: str) -> None:
        """A graph lacking logits or a state output is not a prefill/decode export: say so at load time."""
        want = ["logits", *state_output_names(graph, self._state_inputs())]
        missing = [n for n in want if n not in have]
        if missing or len(want) == 1:
            what = f"lacks the outputs {missing[:4]}" if missing else "has no state inputs"
            raise UserError(f"{where}: the {graph} graph {what}; not a qmamba prefill/decode export "
                            "(re-run qmamba export)")

    def _logits_and_states(self, graph: str, feeds: dict[str, np.ndarray]) -> tuple[torch.Tensor, list[np.ndarray]]:
        outs = self._run(graph, feeds, ["logits", *state_output_names(graph, self._state_inputs())])
        logits = torch.from_numpy(np.ascontiguousarray(outs[0][:, -1])).float()
        return logits, outs[1:]

    def prefill(self, ids: torch.Tensor):
        return self._logits_and_states("prefill", {"input_ids": ids.numpy().astype(np.int64)})

    def decode(self, tokens: torch.Tensor, states: list[np.ndarray]):
        feeds = {"input_ids": tokens.view(-1, 1).numpy().astype(np.int64)}
        names = self._state_inputs()
        if len(names) != len(states):
            raise RuntimeError(f"decode graph takes {len(names)} states, got {len(states)}")
        feeds.update(zip(names, states, strict=True))
        return self._logits_and_states("decode", feeds)

    def cat_states(self, states: list[list[np.ndarray]]) -> list[np.ndarray]:
        return [np.concatenate([s[i] for s in states]) for i in range(len(states[0]))]

    def select_states(self, states: list[np.ndarray], index: list[int]) -> list[np.ndarray]:
        return [s[index] for s in states]
