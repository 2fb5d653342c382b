"""`stream-detector` command line. Each subcommand lives in its own module that exposes
`register(subparsers)`; the CLI alone configures logging."""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import logging
import signal
import sys

# Modules that provide subcommands, in the order --help lists them.
SUBCOMMAND_MODULES: list[str] = [
    "stream_detector.service.check",
    "stream_detector.offline.evaluate",
    "stream_detector.offline.simulate",
    "stream_detector.service.run",
    "stream_detector.service.leave",
    "stream_detector.offline.replay",
    "stream_detector.offline.compare",
    "stream_detector.service.control_cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-detector",
        description="Real-time anomaly detection on Kafka with an ONNX Transformer autoencoder.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # a crash inside a native library (librdkafka, ONNX Runtime) then leaves every thread's stack
    # on stderr (the journal) instead of a process that is silently gone
    if not faulthandler.is_enabled():  # (pytest has its own)
        faulthandler.enable()
    # `kill -USR1 PID`: every thread's stack on stderr, and the service goes on (a hung service
    # says where it hangs without being killed)
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    except (OSError, ValueError, AttributeError):  # stderr is not a file (main() called in-process, captured)
        pass
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
