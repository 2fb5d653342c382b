"""`stream-detector run`: the command-line handler of the service (loop.py's `Detector`).

Builds the settings and the `Detector` (bad settings, bundle or changelog topic: exit 2 with one
sentence; broker unreachable: exit 1), installs the signal handlers, runs the loop until stopped.
A broker failure while running ends it with exit 1 (the supervisor restarts it); fenced by another
live process with the same instance id (`MemberFenced`) with exit 2, which a supervisor must not
restart: the restarted process would fence the other one in turn. Signals:
- SIGINT/SIGTERM: `Detector.stop()` (finish the batch, deliver, commit, close) within
  `runtime.shutdown_grace_s`, else exit 1; a second signal kills;
- SIGHUP: hot model reload (reload.py);
- SIGUSR1: every thread's stack (the CLI's faulthandler), then the loop's state in one log line.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
import threading
from typing import Any

import orjson

from stream_detector.config import ConfigError, add_settings_arguments, settings_from_args
from stream_detector.core.bundle import BundleError
from stream_detector.core.scorer import ScorerError
from stream_detector.service.changelog import ChangelogError
from stream_detector.service.kafka_io import KafkaIOError, MemberFenced
from stream_detector.service.loop import Detector

log = logging.getLogger(__name__)


def _log_state_on_sigusr1(detector: Detector) -> None:
    """`kill -USR1`: the loop's state in the log (run by the main thread between two steps of the
    loop), after the thread stacks that the CLI's faulthandler writes at once (chained to it)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def log_state(signum: int, frame: Any) -> None:
        log.warning("state: %s", detector.describe())

    faulthandler.unregister(signal.SIGUSR1)  # the CLI's registration; re-made below, chained to this handler
    signal.signal(signal.SIGUSR1, log_state)
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True, chain=True)
    except (OSError, ValueError, AttributeError):  # stderr is not a file (main() in-process, captured): the state alone
        pass


def handle(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        log.info("settings: %s", orjson.dumps(settings.redacted()).decode())
        detector = Detector(settings)
    except (ConfigError, BundleError, ScorerError, ChangelogError) as e:
        print(f"run: {e}", file=sys.stderr)
        return 2
    except KafkaIOError as e:
        print(f"run: {e}", file=sys.stderr)
        return 1

    def on_signal(signum: int, frame: Any) -> None:
        log.info(
            "%s: finishing the current batch, then deliver, commit and close (again to kill)",
            signal.Signals(signum).name,
        )
        detector.stop()
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)  # a second signal kills
        grace = settings.runtime.shutdown_grace_s

        def give_up() -> None:
            log.error("shutdown exceeded the %g s grace period; exiting", grace)
            os._exit(1)

        timer = threading.Timer(grace, give_up)
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    detector.reloader.install_sighup()  # SIGHUP: hot model reload (systemctl reload)
    _log_state_on_sigusr1(detector)
    try:
        stats = detector.run()
    except MemberFenced as e:  # a duplicate instance id is a configuration error: not restarted (exit 2)
        print(f"run: {e}", file=sys.stderr)
        return 2
    except (KafkaIOError, ChangelogError) as e:
        print(f"run: {e}", file=sys.stderr)
        return 1
    log.info(
        "stopped: %d consumed, %d dead letters, %d scored, alerts %s, %d commits in %.1f s",
        stats.consumed,
        stats.dead_letters,
        stats.scored,
        dict(stats.alerts),
        stats.commits,
        stats.elapsed_s,
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="run the detector: consume observations, publish alerts",
        description=(
            "Consume observations from Kafka, score every entity's window with the bundle's model and publish alert "
            "events."
        ),
    )
    add_settings_arguments(p)
    p.set_defaults(func=handle)
