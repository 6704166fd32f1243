"""qmamba calibrate."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from qmamba.data import DEFAULT_CACHE, load_text, sample_windows
from qmamba.errors import UserError
from qmamba.model.checkpoint import check_out


def add_calib_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}data", default="shakespeare:train",
                   help="shakespeare:train|val, a .txt file, or a directory of .txt files")
    p.add_argument(f"--{prefix}samples", type=int, default=64, help="number of calibration windows")
    p.add_argument(f"--{prefix}seq-len", type=int, default=256, help="calibration window length (tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.9995, help="percentile for the SSM input scale")
    p.add_argument("--outlier-factor", type=float, default=None,
                   help="dual-scale: s_out = s_in * k (default: s_out = max|u| / 127)")
    p.add_argument("--weight-granularity", choices=("per_channel", "per_tensor"), default="per_channel")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)


def calib_spec(args: argparse.Namespace, prefix: str = ""):
    from qmamba.quant.calibrate import CalibOptions
    from qmamba.quant.loading import CalibSpec

    pre = prefix.replace("-", "_")
    # checked here, before any loading, so the message names this command's own option
    for opt in ("samples", "seq-len"):
        value = getattr(args, pre + opt.replace("-", "_"))
        if value < 1:
            raise UserError(f"--{prefix}{opt} must be at least 1, got {value}")
    return CalibSpec(
        data=getattr(args, f"{pre}data"),
        samples=getattr(args, f"{pre}samples"),
        seq_len=getattr(args, f"{pre}seq_len"),
        seed=args.seed,
        options=CalibOptions(args.alpha, args.outlier_factor, args.weight_granularity),
        cache_dir=args.cache_dir,
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="calibrate a float model and write a quantized checkpoint (QDIR)")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--recipe", required=True, help="w8a8 | w8a8-dualscale | w8a8-fpssm")
    p.add_argument("--out", type=Path, required=True, help="QDIR to write (atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing QDIR")
    add_calib_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qmamba.model.checkpoint import load_model
    from qmamba.quant.calibrate import calibrate
    from qmamba.quant.checkpoint import save_quantized
    from qmamba.quant.recipes import get_recipe

    recipe = get_recipe(args.recipe)
    if not recipe.quantized:
        raise ValueError(f"recipe {recipe.name} is not quantized: nothing to calibrate (use the model directly)")
    check_out(args.out, args.force)  # before calibrating, not when the result is written
    spec = calib_spec(args)
    model = load_model(args.model_dir)
    # quant.loading.calibration_ids with this command's option names in the errors
    ids = sample_windows(load_text(spec.data, spec.cache_dir), spec.samples, spec.seq_len, spec.seed,
                         what=f"--data {spec.data}", samples_opt="--samples", seq_len_opt="--seq-len")
    q = calibrate(model, recipe, ids, spec.options)
    src = os.path.relpath(args.model_dir.resolve(), args.out.resolve().parent)
    extra = {
        "source_model": str(Path("..") / src),
        "calibration": {**q.meta["calibration"], "data": spec.data, "seq_len": spec.seq_len, "seed": spec.seed},
    }
    save_quantized(q, args.out, extra)
    print(f"wrote {args.out} (recipe {recipe.name}, {spec.samples} x {spec.seq_len} calibration tokens)")
    print("outlier fraction per layer (|round(u/s_in)| outside int8):")
    for name, frac in q.meta["outlier_fraction"].items():
        print(f"  {name}: {frac * 100:.4f}%")
    return 0
