"""`stream-detector compare`: the live model against its shadow candidate, from their alert topics.

    stream-detector compare --config run.toml --since 1d [--until ...] [--labels incidents.jsonl]

Reads the alerts topic and the shadow alerts topic (`[kafka] shadow_alerts_topic`, default
ALERTS_TOPIC.shadow) over the same range, `read_committed`, without a consumer group
(ingest/topic_range.py), and prints per model version: alerts opened, entities paged, how many
openings the other model matched (same entity, event times within `--tolerance`, default 5m),
the entities paged by one model and not the other, and with labels (offline/incidents.py) the
incidents caught, the event recall and the alert precision. `--json` prints the same as one object.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

import orjson

from stream_detector.config import ConfigError, Settings, add_settings_arguments, settings_from_args
from stream_detector.ingest.topic_range import TopicRangeError, parse_bound, read_topic_values
from stream_detector.offline.incidents import Incident, LabelsError, event_ms, match, read_labels


@dataclass(frozen=True)
class Side:
    name: str  # "live" or "shadow"
    topic: str
    opens: list[tuple[str, int, str]]  # (entity, event time ms, model_version)

    @property
    def versions(self) -> list[str]:
        return sorted({v for _, _, v in self.opens})

    @property
    def entities(self) -> set[str]:
        return {k for k, _, _ in self.opens}


def read_side(settings: Settings, name: str, topic: str, since: str | None, until: str | None) -> Side:
    opens = []
    for value in read_topic_values(settings, topic, since, until):
        try:
            a = orjson.loads(value)
        except orjson.JSONDecodeError:
            continue  # not an alert event (nothing the service writes)
        if isinstance(a, dict) and a.get("state") == "open" and "key" in a and "event_time" in a:
            opens.append((str(a["key"]), event_ms(str(a["event_time"])), str(a.get("model_version", "?"))))
    return Side(name, topic, opens)


def matched(a: Side, b: Side, tolerance_ms: int) -> int:
    """Openings of `a` with an opening of `b` for the same entity within the tolerance."""
    by_key: dict[str, list[int]] = {}
    for k, t, _ in b.opens:
        by_key.setdefault(k, []).append(t)
    return sum(any(abs(t - u) <= tolerance_ms for u in by_key.get(k, ())) for k, t, _ in a.opens)


def summarise(live: Side, shadow: Side, tolerance_ms: int, labels: list[Incident] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"tolerance_ms": tolerance_ms}
    for side, other in ((live, shadow), (shadow, live)):
        row: dict[str, Any] = {
            "topic": side.topic,
            "model_versions": side.versions,
            "alerts_opened": len(side.opens),
            "entities_paged": len(side.entities),
            "matched_by_the_other": matched(side, other, tolerance_ms),
            "entities_only_here": sorted(side.entities - other.entities),
        }
        if labels is not None:
            caught, false = match([(k, t) for k, t, _ in side.opens], labels, tolerance_ms)
            row.update(
                incidents=len(labels),
                caught=caught,
                event_recall=round(caught / len(labels), 4) if labels else None,
                alert_precision=round(1 - false / len(side.opens), 4) if side.opens else None,
            )
        out[side.name] = row
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="the live model against its shadow candidate: alerts, overlap, recall/precision with labels",
        description="Read the alerts topic and the shadow alerts topic over the same range (read_committed, no "
        "consumer group) and print side by side, per model version: alerts opened, entities paged, openings the "
        "other model matched (same entity within --tolerance), entities paged by one only, and given --labels "
        "(JSON lines: entity, start_ms, end_ms) incidents caught, event recall and alert precision.",
    )
    p.add_argument("--since", default="1d", help="start: earliest, an ISO-8601 time, a duration before now, @OFFSET")
    p.add_argument("--until", help="end (exclusive), same forms; default latest")
    p.add_argument("--labels", help="incidents to score both models against")
    p.add_argument("--tolerance", default="5m", help="two openings of one entity this close agree (default 5m)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    add_settings_arguments(p)
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        tolerance = parse_bound(args.tolerance, "latest", now_ms=0)
        if tolerance.kind != "time" or tolerance.value > 0:
            raise ConfigError(f"--tolerance {args.tolerance!r} is not a duration such as 90s, 5m or 1h.")
        labels = read_labels(args.labels) if args.labels else None
        live = read_side(settings, "live", settings.kafka.alerts_topic, args.since, args.until)
        shadow = read_side(settings, "shadow", settings.kafka.shadow_topic(), args.since, args.until)
    except (ConfigError, TopicRangeError, LabelsError) as e:
        print(f"stream-detector compare: {e}", file=sys.stderr)
        return 2
    report = summarise(live, shadow, -tolerance.value, labels)
    if args.json:
        print(orjson.dumps(report).decode())
        return 0
    rows: list[tuple[str, ...]] = [("", "live", "shadow")]
    keys = ["model_versions", "alerts_opened", "entities_paged", "matched_by_the_other", "entities_only_here"]
    if labels is not None:
        keys += ["caught", "event_recall", "alert_precision"]
    for k in keys:
        cells = [report[s][k] for s in ("live", "shadow")]
        rows.append((k.replace("_", " "), *(", ".join(c) if isinstance(c, list) else str(c) for c in cells)))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip())
    return 0
