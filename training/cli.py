"""`stream-detector-train` command line. Each subcommand lives in its own module that exposes
`register(subparsers)`; the CLI alone configures logging."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that provide subcommands, in the order --help lists them.
SUBCOMMAND_MODULES: list[str] = [
    "training.fit",
    "training.retrain",
    "training.logformat",
    "training.report",
    "training.baselines",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-detector-train",
        description="Train a Transformer autoencoder on normal data, calibrate it and export an ONNX model bundle.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
