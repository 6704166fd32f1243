"""`qmamba export` and `qmamba check` subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("export", help="export prefill/decode ONNX graphs with qmamba custom ops")
    e.add_argument("model", type=Path, help="QDIR (quantized recipes) or a float model dir (fp16)")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--recipe", default=None, help="for a float model dir: fp16 (default)")
    e.add_argument("--layers", default=None, help="export only these consecutive blocks, e.g. 1,2")
    e.add_argument("--stages", action="store_true", help="expose every stage tensor (layers.{i}.{stage})")
    e.add_argument("--max-batch", type=int, default=64, help="largest batch the export is checked for")
    e.add_argument("--max-len", type=int, default=8192, help="longest prompt the export is checked for")
    e.add_argument("--force", action="store_true", help="replace --out if it exists")
    e.set_defaults(func=run_export)

    c = sub.add_parser("check", help="compare a backend with the PyTorch reference stage by stage (Polygraphy)")
    c.add_argument("model", type=Path, help="an exported .onnx file (onnxruntime) or an engine dir (tensorrt)")
    c.add_argument("--reference", type=Path, required=True, help="the QDIR (or float model dir for fp16)")
    c.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"))
    c.add_argument("--batch", type=int, default=2)
    c.add_argument("--seq-len", type=int, default=64)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--input-ids", type=Path, default=None, help=".npy int64 [batch, length] token ids")
    c.add_argument("--plugins", type=Path, default=None, help="plugin library (tensorrt)")
    c.add_argument("--out", type=Path, default=Path("out/check"))
    c.set_defaults(func=run_check)


def run_export(args: argparse.Namespace) -> int:
    from export.exporter import export

    meta = export(args.model, args.out, args.recipe, args.layers, args.stages, args.max_batch, args.max_len,
                  force=args.force)
    files = ", ".join(meta["graphs"].values())
    print(f"wrote {args.out}: {files} (recipe {meta['recipe']}, opset {meta['opset']}"
          f"{', with stage outputs' if meta['stages'] else ''})")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from export.check import check

    return check(args.model, args.reference, args.backend, args.batch, args.seq_len, args.seed, args.input_ids,
                 args.out, args.plugins)
