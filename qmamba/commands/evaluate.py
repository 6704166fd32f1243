"""qmamba eval-ppl: held-out perplexity per recipe (and outlier fractions)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from qmamba.commands.calibrate import add_calib_args, calib_spec
from qmamba.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-ppl", help="held-out per-byte perplexity for each recipe")
    p.add_argument("model", type=Path, help="float model directory")
    p.add_argument("--recipes", default="fp16,w8a8,w8a8-dualscale,w8a8-fpssm")
    p.add_argument("--eval-data", default="shakespeare:val")
    p.add_argument("--windows", type=int, default=32, help="non-overlapping held-out windows")
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    add_calib_args(p, prefix="calib-")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from qmamba.data import encode, load_text
    from qmamba.quant.loading import load_runnable
    from qmamba.quant.recipes import get_recipe
    from qmamba.train import heldout_nll

    recipes = [get_recipe(r.strip()).name for r in args.recipes.split(",") if r.strip()]
    if not recipes:
        raise UserError(f"--recipes {args.recipes!r} names no recipe: give a comma-separated list, e.g. fp16,w8a8")
    for opt, value in (("--windows", args.windows), ("--length", args.length)):
        if value < 1:
            raise UserError(f"{opt} must be at least 1, got {value}")
    spec = calib_spec(args, prefix="calib-")
    val = encode(load_text(args.eval_data, args.cache_dir))
    if len(val) < args.length + 1:
        raise UserError(f"--eval-data {args.eval_data} has {len(val)} bytes, fewer than --length {args.length} + 1")
    rows = []
    base = None
    for name in recipes:
        model = load_runnable(args.model, name, dataclasses.replace(spec, progress=False))
        nll = heldout_nll(model, val, args.length, args.windows, fast=False)
        ppl = math.exp(nll)
        base = ppl if base is None else base
        frac = getattr(model, "meta", {}).get("outlier_fraction", {})
        fr = ", ".join(f"{v * 100:.3f}%" for v in frac.values()) if get_recipe(name).int8_ssm else "-"
        rows.append((name, nll, ppl, 100 * (ppl / base - 1), fr))
        print(f"{name:<16} ppl {ppl:.4f}  ({100 * (ppl / base - 1):+.2f}% vs {recipes[0]})", flush=True)
    o = spec.options
    lines = [
        f"Held-out per-byte perplexity of `{args.model}` on {args.windows} x {args.length}-byte windows of "
        f"`{args.eval_data}`; calibration: {spec.samples} x {spec.seq_len} tokens of `{spec.data}`, seed "
        f"{spec.seed}, alpha {o.alpha}, outlier factor {o.outlier_factor or 'max|u|/127'}, "
        f"weights {o.weight_granularity}.",
        "",
        f"| recipe | NLL (nats/byte) | perplexity | vs {recipes[0]} | outlier fraction per layer (u) |",
        "|---|---|---|---|---|",
    ]
    for name, nll, ppl, rel, fr in rows:
        lines.append(f"| `{name}` | {nll:.4f} | {ppl:.4f} | {rel:+.2f}% | {fr} |")
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    return 0
