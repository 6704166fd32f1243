"""qmamba train-tiny."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qmamba.data import DEFAULT_CACHE


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-tiny", help="train the tiny byte-level Shakespeare Mamba (GPU: a few minutes)")
    p.add_argument("--out", type=Path, default=Path("models/qmamba-tiny"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=420.0, help="stop training early after this long")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--force", action="store_true", help="replace --out if it exists (the default is the shipped model)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from qmamba.model.checkpoint import check_out
    from qmamba.train import TrainOptions, train_tiny

    # checked before any training: the default --out is the shipped model
    check_out(args.out, args.force)
    for name, value in (("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{name} {value} must be at least 1")
    if args.seq_len < 2:
        raise ValueError(f"--seq-len {args.seq_len} must be at least 2 (a window predicts its next bytes)")
    if not args.max_seconds > 0:
        raise ValueError(f"--max-seconds {args.max_seconds} must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is visible; pass --device cpu (slow) or use a GPU")
    opts = TrainOptions(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                        seed=args.seed, max_seconds=args.max_seconds)
    report = train_tiny(args.out, opts, args.device, args.cache_dir)
    print(json.dumps(report, indent=2))
    return 0
