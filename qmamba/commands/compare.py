"""qmamba compare: per-layer x per-stage error of one recipe against another, in PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path

from qmamba.commands.calibrate import add_calib_args, calib_spec
from qmamba.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="per-stage comparison of two recipes (table, JSON, PNG heatmap)")
    p.add_argument("model", type=Path, help="float model directory or a QDIR")
    p.add_argument("--reference", default="fp16")
    p.add_argument("--target", required=True)
    p.add_argument("--eval-data", default="shakespeare:val")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--out", type=Path, default=Path("out/compare"))
    add_calib_args(p, prefix="calib-")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qmamba import trace
    from qmamba.compare import compare_stages, first_error, first_jump, format_table, write_report
    from qmamba.data import load_text, sample_windows
    from qmamba.quant.loading import load_runnable

    # checked before loading or calibrating anything
    for opt, value in (("--batch", args.batch), ("--length", args.length)):
        if value < 1:
            raise UserError(f"{opt} must be at least 1, got {value}")
    spec = calib_spec(args, prefix="calib-")
    ref = load_runnable(args.model, args.reference, spec)
    tgt = load_runnable(args.model, args.target, spec)
    ids = sample_windows(load_text(args.eval_data, args.cache_dir), args.batch, args.length, args.seed + 1,
                         what=f"--eval-data {args.eval_data}", samples_opt="--batch", seq_len_opt="--length")
    with trace.trace() as tr_ref:
        ref(ids)
    with trace.trace() as tr_tgt:
        tgt(ids)
    rows = compare_stages(tr_ref.as_dict(), tr_tgt.as_dict())
    title = f"{args.target} vs {args.reference} on {args.model} ({args.batch}x{args.length} tokens)"
    print(title)
    print(format_table(rows))
    entered, jump = first_error(rows), first_jump(rows)
    if entered is not None:
        print(f"error enters at {entered.name} (rel L2 {entered.rel_l2:.3e}, SQNR {entered.sqnr_db:.1f} dB)")
    if jump is None:
        print("no stage's error jumps (no stage reaches 2x the error of every stage before it)")
    else:
        print(f"first stage whose error jumps: {jump.name} (rel L2 {jump.rel_l2:.3e}, SQNR {jump.sqnr_db:.1f} dB)")
    write_report(rows, args.out, title, {"reference": args.reference, "target": args.target})
    print(f"wrote {args.out / 'compare.json'} and {args.out / 'compare.png'}")
    return 0
