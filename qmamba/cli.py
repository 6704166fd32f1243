"""The ``qmamba`` command: one subcommand per job. Each subcommand module registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys

from qmamba.errors import UserError

# Modules with a ``register(subparsers)`` function, in --help order. Missing optional modules
# (e.g. export/ without onnx installed) are reported when their command is used, not at import.
SUBCOMMAND_MODULES = (
    "qmamba.commands.train",
    "qmamba.commands.calibrate",
    "qmamba.commands.compare",
    "qmamba.commands.evaluate",
    "qmamba.commands.serve",
    "qmamba.commands.engine",
    "export.cli",
)



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qmamba", description="W8A8 / dual-scale quantized Mamba: PyTorch -> ONNX -> TensorRT"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and (e.name == mod or mod.startswith(e.name)):
                continue  # the module itself does not exist (yet)
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("qmamba: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, OSError) as e:  # OSError: unwritable paths, full disks (the message names them)
        print(f"qmamba {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
