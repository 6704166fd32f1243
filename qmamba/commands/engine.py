"""qmamba build-engine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _triple(s: str) -> tuple[int, int, int]:
    parts = [int(x) for x in s.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX, got {s!r}")
    return tuple(parts)  # type: ignore[return-value]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-engine", help="build TensorRT engines from an export directory")
    p.add_argument("onnx_dir", type=Path)
    p.add_argument("--plugins", type=Path, required=True, help="libqmamba_plugins.so")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch", type=_triple, default=(1, 1, 8), help="prefill batch MIN,OPT,MAX")
    p.add_argument("--length", type=_triple, default=(1, 256, 2048), help="prefill length MIN,OPT,MAX")
    p.add_argument("--decode-batch", type=_triple, default=(1, 8, 64), help="decode batch MIN,OPT,MAX")
    p.add_argument("--timing-cache", type=Path, default=None)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engines.build import Profiles, build_engine

    meta = build_engine(args.onnx_dir, args.plugins, args.out, Profiles(args.batch, args.length, args.decode_batch),
                        args.timing_cache, args.verbose, force=args.force)
    print(json.dumps({k: v for k, v in meta.items() if k != "export"}, indent=2))
    return 0
