"""Serving runtime: backends behind one interface, and a batched generator over a state cache."""

from qmamba.runtime.backends import Backend, TorchBackend, load_backend
from qmamba.runtime.generate import Completion, Generator, SamplingParams
from qmamba.runtime.tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "Backend",
    "ByteTokenizer",
    "Completion",
    "Generator",
    "SamplingParams",
    "TorchBackend",
    "load_backend",
    "load_tokenizer",
]
