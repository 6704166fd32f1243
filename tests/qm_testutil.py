"""Shared helpers for tests/ (a unique module name: trt_plugins/tests is also on sys.path)."""

from __future__ import annotations

import torch

QUANT_RECIPES = ("w8a8", "w8a8-dualscale", "w8a8-fpssm")


def rand_ids(b: int, l: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (b, l), generator=torch.Generator().manual_seed(seed))
