"""Liveness and readiness of the running service, as the loop reports them.

The loop (service/loop.py, Detector) calls `tick()` once per iteration and tells `Health` what it knows:
partitions assigned or revoked, the model loaded, the broker reachable or not (from librdkafka's
error callback and from successful fetches). The metrics server answers `/healthz` and `/readyz`
from here, on its own thread, so every read and write takes the lock.

- live: the loop ticked within `stall_after_s` (a loop stuck in inference, a deadlocked callback or
  a hung broker call stops ticking). Before the first tick the process counts as live for a start-up
  grace of the same length, so a slow start is not killed as a stuck one.
- ready: live, the model is loaded, the broker is reachable and at least one partition is assigned.
  A group member without partitions (more members than partitions) is alive but not ready, which is
  the honest answer for a load balancer or a rollout that waits for readiness. "Reachable": not
  reported unreachable (brokerwatch.py) without a break for `broker_unready_after_s` or longer
  (0: at once); before the broker was first reached it is not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from stream_detector.config import RuntimeSettings


@dataclass(frozen=True)
class Status:
    ok: bool
    reasons: tuple[str, ...]  # empty when ok; otherwise one short sentence per failed condition

    def text(self) -> str:
        return "ok" if self.ok else "; ".join(self.reasons)


class Health:
    def __init__(
        self,
        stall_after_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        broker_unready_after_s: float = 0.0,
    ) -> None:
        if stall_after_s <= 0:
            raise ValueError(f"stall_after_s must be positive, got {stall_after_s}.")
        if broker_unready_after_s < 0:
            raise ValueError(f"broker_unready_after_s must not be negative, got {broker_unready_after_s}.")
        self.stall_after_s = float(stall_after_s)
        self.broker_unready_after_s = float(broker_unready_after_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._started = clock()
        self._last_tick: float | None = None
        self._partitions: set[tuple[str, int]] = set()
        self._model_version: str | None = None
        self._broker_ok = False
        self._broker_reason = "the broker has not been reached yet"
        self._broker_down_since: float | None = None  # clock() of the first report of the current outage
        self._stopping = False

    @classmethod
    def for_runtime(cls, runtime: RuntimeSettings) -> Health:
        """The service's: a stall is 30 s or 10 batch waits, whichever is longer; `broker_unready_after_s`."""
        return cls(
            stall_after_s=max(30.0, 10 * runtime.max_wait_ms / 1000),
            broker_unready_after_s=runtime.broker_unready_after_s,
        )

    # ---- what the loop reports ------------------------------------------------------------
    def tick(self) -> None:
        with self._lock:
            self._last_tick = self._clock()

    def since_tick(self) -> float:
        """Seconds since the loop last ticked (0 before its first tick)."""
        with self._lock:
            return 0.0 if self._last_tick is None else self._clock() - self._last_tick

    def assigned(self, partitions: Iterable[tuple[str, int]]) -> None:
        with self._lock:
            self._partitions.update(partitions)

    def revoked(self, partitions: Iterable[tuple[str, int]]) -> None:
        with self._lock:
            self._partitions.difference_update(partitions)

    def model_loaded(self, model_version: str) -> None:
        with self._lock:
            self._model_version = model_version

    def broker_reachable(self) -> None:
        with self._lock:
            self._broker_ok = True
            self._broker_down_since = None

    def broker_unreachable(self, reason: str) -> None:
        """The broker could not be reached (again): not ready once that has lasted `broker_unready_after_s`."""
        with self._lock:
            if self._broker_down_since is None:
                self._broker_down_since = self._clock()
            self._broker_ok = False
            self._broker_reason = reason

    def stopping(self) -> None:
        """Shutdown began: stay live (the drain is progress) but stop being ready."""
        with self._lock:
            self._stopping = True

    # ---- what the probes read --------------------------------------------------------------
    @property
    def partitions(self) -> frozenset[tuple[str, int]]:
        with self._lock:
            return frozenset(self._partitions)

    @property
    def model_version(self) -> str | None:
        with self._lock:
            return self._model_version

    def liveness(self) -> Status:
        with self._lock:
            return self._liveness()

    def _liveness(self) -> Status:
        now = self._clock()
        if self._last_tick is None:
            waited = now - self._started
            if waited > self.stall_after_s:
                return Status(False, (f"the main loop has not started after {waited:.0f}s",))
            return Status(True, ())
        idle = now - self._last_tick
        if idle > self.stall_after_s:
            return Status(False, (f"the main loop last ticked {idle:.0f}s ago (limit {self.stall_after_s:.0f}s)",))
        return Status(True, ())

    def readiness(self) -> Status:
        with self._lock:
            reasons = list(self._liveness().reasons)
            if self._stopping:
                reasons.append("the service is shutting down")
            if self._model_version is None:
                reasons.append("no model is loaded")
            if not self._broker_ok:
                since = self._broker_down_since
                if since is None:  # never reached yet
                    reasons.append(self._broker_reason)
                elif (away := self._clock() - since) >= self.broker_unready_after_s:
                    reasons.append(f"the Kafka broker has been unreachable for {away:.0f}s ({self._broker_reason})")
            if not self._partitions:
                reasons.append("no partitions are assigned to this member")
            return Status(not reasons, tuple(reasons))
