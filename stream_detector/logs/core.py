"""The core adapter for log bundles: a `DetectorCore` whose alerts carry the log context (row kind,
template, sample line) and, with a changelog, whose entity state carries the log session."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from stream_detector.core.events import EventBatch
from stream_detector.logs.spec import LogModelSpec
from stream_detector.logs.stage import END, IDLE, LINE, ROW_KINDS, START, LogEventBatch, LogStage, SavedSession


def annotate_alerts(
    spec: LogModelSpec, batch: LogEventBatch, alerts: list[dict[str, Any]], alert_rows: Sequence[int]
) -> None:
    """Add a `log` object to each contract-3 alert: what kind of row raised it, the offending
    line's template (or "<session end>") and a sample line. `alert_rows[j]` is the batch row of alerts[j]."""
    for a, r in zip(alerts, alert_rows):
        tok = int(batch.token[r])
        a["log"] = {
            "row": ROW_KINDS[int(batch.kind[r])],
            "template_id": tok,
            "template": spec.token_text(tok),
            "line": batch.line[r],
        }


def alert_rows(result: Any) -> list[int]:
    """Batch row of each alert of a pipeline.BatchResult (alerts are emitted in scored-event order)."""
    return [int(i) for i, ev in zip(result.index.tolist(), result.alert_event) if ev is not None]


class LogDetectorCore:
    """A DetectorCore for log rows: same interface (process, drop_partitions, state_of, ...), and
    each alert it returns carries the log context (`annotate_alerts`).

    With a `stage` (the service with a changelog), an entity's state also carries its log session
    (`SavedSession`), so that a partition that moves to another consumer (or a restarted one)
    carries its sessions on instead of starting them again from nothing: restoring an entity
    resumes its session in the stage, and dropping partitions drops their sessions there too."""

    def __init__(self, core: Any, spec: LogModelSpec, stage: LogStage | None = None) -> None:
        self._core = core
        self.spec = spec
        self.stage = stage
        self._sessions: dict[tuple[int, str], SavedSession] = {}
        self._prune_at = 1024

    def process(self, batch: EventBatch, row_alert_state: bool = False) -> Any:
        res = self._core.process(batch, row_alert_state)
        if isinstance(batch, LogEventBatch):
            if res.alerts:
                annotate_alerts(self.spec, batch, res.alerts, alert_rows(res))
            if self.stage is not None:
                self._note(batch)
        return res

    def state_of(self, partition: int, key: str) -> dict[str, Any] | None:
        state = self._core.state_of(partition, key)
        saved = self._sessions.get((partition, key)) if state is not None else None
        if saved is not None and saved.offset >= 0:
            state["log"] = asdict(saved)
        return state

    def restore(self, partition: int, key: str, state: dict[str, Any]) -> None:
        # checked before anything is installed
        saved = None if state.get("log") is None else SavedSession.from_state(state["log"])
        self._core.restore(partition, key, state)
        if saved is not None and self.stage is not None:
            self._sessions[(partition, key)] = saved
            rows = state["window"]["rows"]
            self.stage.resume(key, partition, saved, rows[-1] if len(rows) else None)

    def drop_partitions(self, partitions: Any) -> int:
        partitions = set(int(p) for p in partitions)
        dropped = self._core.drop_partitions(partitions)
        self._sessions = {e: s for e, s in self._sessions.items() if e[0] not in partitions}
        if self.stage is not None:
            self.stage.drop_partitions(partitions)
        return dropped

    def _note(self, batch: LogEventBatch) -> None:
        """Each entity's session as of this batch (which the core has just applied)."""
        sessions = self._sessions
        for p, k, kind, t, topic, offset, line in zip(
            batch.partition.tolist(),
            batch.keys,
            batch.kind.tolist(),
            batch.event_time_ms.tolist(),
            batch.topic,
            batch.offset.tolist(),
            batch.line,
        ):
            s = sessions.get((p, k))
            if s is None or kind == START:
                s = sessions[(p, k)] = SavedSession(t)
            if kind == LINE:
                s.events += 1
                s.line, s.line_ms, s.topic, s.offset, s.idle_pending = line, t, topic, offset, True
            elif kind == IDLE:
                s.idle_pending = False
            elif kind == END:
                s.open = False
        if len(sessions) > self._prune_at:  # entities the core evicted (idle, LRU) take theirs along
            live = set(self._core.entities())
            self._sessions = {e: s for e, s in sessions.items() if e in live}
            self._prune_at = max(1024, 2 * len(self._sessions))

    def __getattr__(self, name: str) -> Any:  # everything else is the wrapped core's
        return getattr(self._core, name)
