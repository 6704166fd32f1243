from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qmamba.config import MambaConfig
from qmamba.model.mamba import MambaLM

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "qmamba-tiny"


@pytest.fixture(scope="session")
def small_model() -> MambaLM:
    """A random model small enough for many CPU runs; d_inner 192 = 12 x 16 (non-power-of-two Hadamard)."""
    return MambaLM(MambaConfig(d_model=96, n_layer=2, vocab_size=256, dt_rank=8)).init_weights(0).eval()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    if not (TINY / "model.safetensors").is_file():
        pytest.fail(f"the shipped tiny model is missing at {TINY}")
    return TINY


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """Local calibration text (tests never need the network)."""
    p = tmp_path_factory.mktemp("data") / "calib.txt"
    g = torch.Generator().manual_seed(0)
    words = ["the", "king", "shall", "speak", "my", "lord", "thou", "art", "and", "of", "love", "night"]
    idx = torch.randint(0, len(words), (4000,), generator=g).tolist()
    p.write_text(" ".join(words[i] for i in idx) + "\n")
    return p

