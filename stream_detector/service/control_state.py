"""What the control topic says now, applied in the loop (issue 20: silences and feedback).

- Silences (ingest/control.py `SilenceTable`): an alert event of a silenced entity is still
  published to the alerts topic, with `silenced: {"id", "reason"}`, and never sent to
  Alertmanager. A silence is judged at the wall-clock time the event is published (maintenance
  windows are wall-clock), not at the event's own time.
- Feedback: a `false_positive` verdict makes the entity that raised the alert stop alerting on
  scores like that episode's (DetectorCore.learn_false_positive, bounded: docs/operations.md). The
  entity may not be here yet (the control topic is read from its beginning at start-up, before
  partitions are assigned and their state restored; or another instance of the group holds it), so
  a verdict that matches nothing is tried again every `RETRY_S` for `KEEP_S`, then let go with one
  log line. A `true_positive` verdict is counted and changes nothing.

Main thread only; `apply_feedback` and `retry` touch the core, so the loop calls them between batches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from stream_detector.core.alerts import iso_utc
from stream_detector.ingest.control import Feedback, Silence, SilenceDeleted, SilenceTable

log = logging.getLogger(__name__)

RETRY_S = 30.0  # an unmatched false-positive verdict is tried again this often ...
KEEP_S = 600.0  # ... for this long after it was read
_MAX_WAITING = 10_000  # verdicts waiting for their entity; the oldest go first


class ControlState:
    def __init__(self, on_applied: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.time) -> None:
        self.silences = SilenceTable()
        self._on_applied = on_applied  # each false-positive verdict applied (the loop counts it in a metric)
        self._clock = clock
        self._waiting: dict[str, tuple[Feedback, float]] = {}  # alert id -> (verdict, when read)
        self._next_retry = 0.0
        self.applied = 0  # false-positive verdicts that set an entity's floor

    def mark_silenced(self, alerts: Sequence[dict[str, Any]]) -> int:
        """Fill in `silenced` on the events of silenced entities; returns how many."""
        now_ms = int(self._clock() * 1000)
        n = 0
        for a in alerts:
            s = self.silences.match(a["key"], now_ms)
            if s is not None:
                a["silenced"] = {"id": s.id, "reason": s.reason}
                n += 1
        return n

    def apply(self, records: Sequence[Silence | Feedback | SilenceDeleted], core: Any) -> None:
        """Records read from the control topic, in order."""
        for r in records:
            if isinstance(r, Feedback):
                self.apply_feedback(r, core)
            else:
                self.silences.apply(r)
                if isinstance(r, Silence):
                    log.info("silence %s: entities %r until %s (%s)", r.id, r.pattern, iso_utc(r.ends_ms), r.reason)

    def apply_feedback(self, f: Feedback, core: Any) -> bool:
        if f.verdict != "false_positive":
            self._waiting.pop(f.alert_id, None)
            return True
        found = core.learn_false_positive(f.alert_id, f.key)
        if found is None:
            if f.alert_id not in self._waiting:
                self._waiting[f.alert_id] = (f, self._clock())
                while len(self._waiting) > _MAX_WAITING:
                    self._waiting.pop(next(iter(self._waiting)))
            return False
        self._waiting.pop(f.alert_id, None)
        self.applied += 1
        self._on_applied()
        partition, key, floor = found
        log.info(
            "feedback: alert %s of %s (partition %d) was a false positive; scores up to %.4g no longer alert there",
            f.alert_id[:12],
            key,
            partition,
            floor,
        )
        return True

    def retry(self, core: Any, now: bool = False) -> None:
        """Every RETRY_S (`now`: at once, e.g. after partitions were restored): verdicts that matched
        no entity yet, tried again; let go after KEEP_S."""
        now_s = self._clock()
        if now_s < self._next_retry and not now:
            return
        self._next_retry = now_s + RETRY_S
        self.silences.expire(int(now_s * 1000))
        for alert_id, (f, read_at) in list(self._waiting.items()):
            if self.apply_feedback(f, core):
                continue
            if now_s - read_at >= KEEP_S:
                del self._waiting[alert_id]
                log.info(
                    "feedback for alert %s matched no entity held here within %.0f s; let go (another "
                    "instance of the group may hold it)",
                    alert_id[:12],
                    KEEP_S,
                )

    @property
    def waiting(self) -> int:
        return len(self._waiting)
