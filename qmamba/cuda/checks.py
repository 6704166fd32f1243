"""Argument checks of the kernel binding. The C ABI receives raw pointers and the sizes of one tensor, so a wrong
dtype, shape or device of any other argument would reach a kernel as an out-of-bounds read or write; every binding
function checks all of its tensors here first, against each other, and names the argument that is wrong."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class KernelError(RuntimeError):
    """A kernel call returned an error status, or its arguments were refused before the call; the message says
    which and why."""


Dim = int | None  # None: any size


class Args:
    """The tensors of one call: each checked for dtype and shape, then all for one device."""

    def __init__(self, fn: str) -> None:
        self.fn = fn
        self.device: torch.device | None = None
        self.first = ""

    def fail(self, what: str) -> KernelError:
        return KernelError(f"{self.fn}: {what}")

    def __call__(self, name: str, t: torch.Tensor | None, dtype: torch.dtype | Sequence[torch.dtype],
                 shape: Sequence[Dim] | None = None, *, optional: bool = False, numel: int | None = None
                 ) -> torch.Tensor | None:
        if t is None:
            if optional:
                return None
            raise self.fail(f"{name} is required")
        if not isinstance(t, torch.Tensor):
            raise self.fail(f"{name} must be a torch tensor, got {type(t).__name__}")
        dtypes = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in dtypes:
            want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise self.fail(f"{name} must be {want}, got {str(t.dtype).removeprefix('torch.')}")
        if shape is not None and (t.dim() != len(shape) or any(w is not None and s != w
                                                               for s, w in zip(t.shape, shape, strict=True))):
            want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
            raise self.fail(f"{name} must have shape {want}, got {list(t.shape)}")
        if numel is not None and t.numel() != numel:
            raise self.fail(f"{name} must have {numel} elements, got {t.numel()} ({list(t.shape)})")
        if self.device is None:
            self.device, self.first = t.device, name
        elif t.device != self.device:
            raise self.fail(f"{name} is on {t.device} but {self.first} is on {self.device}: all tensors of a call "
                            "must be on one device")
        return t

    def rank(self, name: str, t: torch.Tensor | None, r: int) -> tuple[int, ...]:
        """t's shape, which must have rank r (before its sizes are used to check the others)."""
        if not isinstance(t, torch.Tensor):
            raise self.fail(f"{name} must be a torch tensor, got {type(t).__name__}")
        if t.dim() != r or any(s == 0 for s in t.shape):
            raise self.fail(f"{name} must be a non-empty tensor of rank {r}, got shape {list(t.shape)}")
        return tuple(t.shape)

    def number(self, name: str, v: object) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.fail(f"{name} must be a number, got {v!r}")
        return float(v)
