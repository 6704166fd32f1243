"""The checked-in Hadamard header is what its generator writes from the spec's H_m matrices."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    path = ROOT / "trt_plugins/tools/gen_hadamard_tables.py"
    spec = importlib.util.spec_from_file_location("gen_hadamard_tables", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_header_is_current():
    gen = _generator()
    assert gen.OUT.read_text() == gen.render(), "run python trt_plugins/tools/gen_hadamard_tables.py"


def test_sign_masks_match_the_matrices():
    """Parse the masks back out of the header text and compare them with H_m: a wrong mask would flip terms."""
    from qmamba.ops.hadamard import SUPPORTED_M, hadamard_m

    text = _generator().render()
    for m in SUPPORTED_M[1:]:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"  if (m == {m}) return"))
        masks = [int(tok.rstrip("u"), 16) for tok in line.split("? ")[1:] for tok in [tok.split()[0]]]
        assert len(masks) == m
        h = hadamard_m(m)
        signs = torch.tensor([[-1.0 if mask >> b & 1 else 1.0 for b in range(m)] for mask in masks])
        assert torch.equal(signs, h.to(signs.dtype))
