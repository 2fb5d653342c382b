"""The service's operations hooks, owned by the loop (loop.py `Detector`):

- systemd's notify protocol (notify.py): READY=1 after the first assignment (Type=notify), STATUS
  on every change after that, WATCHDOG=1 every loop iteration, STOPPING=1 when draining;
- the hot model reloader (reload.py): SIGHUP or a changed bundle path, polled between batches;
- the stall guard: a loop that stops ticking exits the process in one sentence.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from stream_detector.config import Settings
from stream_detector.core.bundle import Bundle
from stream_detector.service.health import Health
from stream_detector.service.metrics import Metrics
from stream_detector.service.notify import SystemdNotifier
from stream_detector.service.reload import ModelReloader

READY_AFTER_S = 60.0  # READY=1 without an assignment after this long: joined, but the group gave us nothing to do


class Operations:
    def __init__(
        self,
        settings: Settings,
        bundle: Bundle,
        build_scorer: Callable[[Bundle], Any],
        metrics: Metrics,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self.notifier = notifier if notifier is not None else SystemdNotifier()
        assert settings.model.bundle is not None, "load_model refuses settings without a bundle path"
        self.reloader = ModelReloader(
            settings.model.bundle,
            bundle,
            build_scorer,
            watch=settings.model.watch,
            watch_interval_s=settings.model.watch_interval_s,
            on_result=lambda ok, _: metrics.reload_result(ok),
        )
        self.ready_sent = False

    def announce(self, status: str) -> None:
        """READY=1 with `status` the first time, STATUS after that."""
        if not self.ready_sent:
            self.ready_sent = True
            self.notifier.ready(status)
        else:
            self.notifier.status(status)

    def tick(self, running_s: float, status: Callable[[], str]) -> None:
        """Every loop iteration: ping the watchdog; READY once the loop has run a while without an assignment."""
        self.notifier.watchdog()
        if not self.ready_sent and running_s > READY_AFTER_S:
            self.announce(status())

    def stopping(self, status: str) -> None:
        self.notifier.stopping(status)


def stall_guard(health: Health, stop: threading.Event, limit_s: float, loop_done: threading.Event) -> None:
    """A loop that stops ticking (e.g. librdkafka blocking in a call far past its timeout after
    a broker outage) would hold its partitions forever: exit 1 in one sentence instead, so the
    supervisor restarts the member and it resumes from its committed offsets. systemd's
    watchdog does the same from outside; this covers supervisors without one. Ends with the
    run (`loop_done`), and is off while draining on stop (bounded by the grace period)."""
    while not loop_done.wait(1.0):
        if stop.is_set():
            return
        stalled = health.since_tick()
        if stalled > limit_s:
            print(
                f"run: the main loop has not ticked for {stalled:.0f} s (runtime.stall_exit_s = {limit_s:g}); "
                "exiting so that the supervisor restarts this member from its committed offsets.",
                file=sys.stderr,
                flush=True,
            )
            os._exit(1)
