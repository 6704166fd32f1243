"""Tokenizers: byte-level for the tiny model, Hugging Face tokenizer.json where a model ships one."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from qmamba.errors import UserError


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
        try:
            from tokenizers import Tokenizer as _T
        except ImportError as e:
            raise UserError(f"{path} needs the tokenizers package, which is not installed ({e}): "
                            "install the serve extra (pip install -e '.[serve]')") from e
        try:
            self._tok = _T.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise UserError(f"cannot read the tokenizer {path}: {e}") from e
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_id = None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def tokenizer_file(tokenizer_dir: str | Path) -> Path:
    """tokenizer_dir/tokenizer.json; UserError if the directory or the file is missing."""
    d = Path(tokenizer_dir)
    if not d.is_dir():
        raise UserError(f"tokenizer directory {d} does not exist (or is not a directory)")
    if not (d / "tokenizer.json").is_file():
        raise UserError(f"tokenizer directory {d} has no tokenizer.json")
    return d / "tokenizer.json"


def load_tokenizer(model_dir: str | Path, vocab_size: int, tokenizer_dir: str | Path | None = None) -> Tokenizer:
    """tokenizer.json in tokenizer_dir, which must hold one when given. Without tokenizer_dir: the model directory's
    tokenizer.json if present, else byte-level for a 256-token vocabulary."""
    if tokenizer_dir is not None:
        return HFTokenizer(tokenizer_file(tokenizer_dir))
    if (Path(model_dir) / "tokenizer.json").is_file():
        return HFTokenizer(Path(model_dir) / "tokenizer.json")
    if vocab_size == 256:
        return ByteTokenizer()
    raise UserError(f"{model_dir} has no tokenizer.json and its vocabulary ({vocab_size}) is not byte-level: "
                    "pass --tokenizer-dir")
