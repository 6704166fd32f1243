"""Tokenizers: byte-level for the tiny model, Hugging Face tokenizer.json where a model ships one."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256). Decoding replaces incomplete sequences."""

    vocab_size = 256
    eos_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _T

        self._tok = _T.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_id = None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_tokenizer(model_dir: str | Path, vocab_size: int) -> Tokenizer:
    """tokenizer.json in the model directory if present; byte-level for a 256-token vocabulary."""
    p = Path(model_dir) / "tokenizer.json"
    if p.is_file():
        return HFTokenizer(p)
    if vocab_size == 256:
        return ByteTokenizer()
    raise ValueError(f"{model_dir} has no tokenizer.json and its vocabulary ({vocab_size}) is not byte-level")
