"""Labelled incidents and the rule that matches alert openings to them, shared by the retrain gate
(training/gate.py) and `stream-detector compare` (offline/compare.py).

Labels: JSON lines of `entity`, `start_ms`, `end_ms` (the format `stream-detector simulate` writes).
An incident is caught when an alert of its entity opens between its start and `slack_ms` after its
end; an opening that catches no incident is false."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import orjson


class LabelsError(Exception):
    """Labels that cannot be used; one sentence."""


@dataclass(frozen=True)
class Incident:
    entity: str
    start_ms: int
    end_ms: int


def read_labels(path: str) -> list[Incident]:
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise LabelsError(f"cannot read the labels file {path} ({(e.strerror or str(e)).lower()}).") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = orjson.loads(line)
            out.append(Incident(str(obj["entity"]), int(obj["start_ms"]), int(obj["end_ms"])))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise LabelsError(
                f"{path} line {n} is not an incident: a JSON object with entity, start_ms and end_ms."
            ) from None
    return out


def match(opens: Sequence[tuple[str, int]], incidents: Sequence[Incident], slack_ms: int) -> tuple[int, int]:
    """(incidents caught, false openings) for alert openings given as (entity, event time in ms)."""

    def hits(key: str, t: int, inc: Incident) -> bool:
        return key == inc.entity and inc.start_ms <= t <= inc.end_ms + slack_ms

    caught = sum(any(hits(k, t, inc) for k, t in opens) for inc in incidents)
    false = sum(not any(hits(k, t, inc) for inc in incidents) for k, t in opens)
    return caught, false


def event_ms(iso: str) -> int:
    """An alert event's `event_time` (ISO-8601, Z) in epoch milliseconds."""
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)
