"""Silences and feedback: the records of the control topic, parsed, written and applied.

    parse_control(key, value) -> Silence | Feedback | SilenceDeleted      (ControlRecordError)
    encode_silence(silence) / encode_feedback(feedback) -> (key, value)    the one writer of the format
    encode_silence_deleted(id) -> (key, None)                             a tombstone
    SilenceTable: apply(record), match(key, at_ms), active(at_ms), expire(at_ms)

The control topic (`[kafka] control_topic`) is compacted, keyed by what a record is about, so the
latest record of each key is what every instance reads from the beginning (service/control.py).
Written by `stream-detector silence` and `stream-detector feedback` (service/control_cli.py).

Record format (schema `stream-detector.control/1`, values are UTF-8 JSON objects):

- **Silence**: key `silence:<id>`, value
  `{"schema": "stream-detector.control/1", "type": "silence", "id": str, "entities": str,
  "starts_at": ISO-8601, "ends_at": ISO-8601, "reason": str, "created_by": str}`.
  `entities` is an fnmatch glob over entity keys (`web-*`, `db-[12]`, `*`), matched case-sensitively
  (`fnmatch.fnmatchcase`); a silence holds for `starts_at <= t < ends_at`. `id`, `entities` and
  `reason` are non-empty; `ends_at` is after `starts_at`. A record with the same key replaces the
  silence (e.g. to end it early), a tombstone (value null) on `silence:<id>` deletes it.
- **Feedback**: key `feedback:<alert_id>`, value
  `{"schema": "stream-detector.control/1", "type": "feedback", "alert_id": str,
  "verdict": "false_positive" | "true_positive", "key": str | null, "comment": str, "at": ISO-8601}`.
  `key` (the alert's entity) may be null or absent; `comment` may be empty or absent. One verdict per
  alert: a later record for the same alert replaces the earlier one.

Times: ISO-8601 with a zone (`2026-12-01T00:00:00.000Z`, `+02:00`); one without a zone is taken as
UTC; they are written in UTC with milliseconds and `Z`, and held as epoch milliseconds. The key's
id must be the value's `id` / `alert_id`. Fields not named here are ignored (a later writer may add
some under the same schema). Anything else (not JSON, another schema or type, a missing or ill-typed
field, a bad time, a tombstone on a feedback key) is a `ControlRecordError` with a one-line reason,
which the reader turns into a dead letter (`bad-control-record`), never a crash.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any, Literal

import orjson

from stream_detector.core.alerts import iso_utc

SCHEMA = "stream-detector.control/1"
SILENCE_PREFIX = "silence:"
FEEDBACK_PREFIX = "feedback:"
VERDICTS = ("false_positive", "true_positive")

Verdict = Literal["false_positive", "true_positive"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


class ControlRecordError(ValueError):
    """A control record that cannot be used; the one-line reason for humans (and dead letters)."""


@dataclass(frozen=True)
class Silence:
    """Alerts of entities matching `pattern` are silenced while `starts_ms <= t < ends_ms`."""

    id: str
    pattern: str  # an fnmatch glob over entity keys
    starts_ms: int
    ends_ms: int
    reason: str
    created_by: str

    def active_at(self, at_ms: int) -> bool:
        return self.starts_ms <= at_ms < self.ends_ms

    def matches(self, key: str, at_ms: int) -> bool:
        # fnmatch caches the compiled pattern (an LRU of 32k patterns)
        return self.starts_ms <= at_ms < self.ends_ms and fnmatchcase(key, self.pattern)


@dataclass(frozen=True)
class Feedback:
    """A human verdict on one alert."""

    alert_id: str
    verdict: Verdict
    key: str | None  # the alert's entity, when given
    comment: str
    at_ms: int


@dataclass(frozen=True)
class SilenceDeleted:
    """A tombstone: the silence `id` is gone."""

    id: str


ControlRecord = Silence | Feedback | SilenceDeleted


# ---- times -------------------------------------------------------------------------------------


def parse_time(text: str) -> int:
    """ISO-8601 (a time without a zone is UTC) as epoch milliseconds; ControlRecordError otherwise."""
    try:
        when = datetime.fromisoformat(text.strip())
    except (ValueError, AttributeError, TypeError):
        raise ControlRecordError(f"{text!r} is not an ISO-8601 time such as 2026-12-01T00:00:00Z") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - _EPOCH) // _MS


# ---- parsing -----------------------------------------------------------------------------------


def parse_control(key: bytes | None, value: bytes | None) -> ControlRecord:
    """One control record (module docstring); ControlRecordError with a one-line reason otherwise."""
    if key is None:
        raise ControlRecordError("the record has no key (expected silence:<id> or feedback:<alert_id>)")
    try:
        text_key = key.decode("utf-8")
    except UnicodeDecodeError:
        raise ControlRecordError("the record key is not UTF-8") from None
    kind, sep, ident = text_key.partition(":")
    if not sep or kind not in ("silence", "feedback") or not ident:
        raise ControlRecordError(f"key {_short(text_key)!r} is not silence:<id> or feedback:<alert_id>")
    if value is None:
        if kind != "silence":
            raise ControlRecordError(f"a tombstone on {_short(text_key)!r}: only a silence can be deleted")
        return SilenceDeleted(ident)
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as e:
        raise ControlRecordError(f"the value of {_short(text_key)!r} is not valid JSON ({e})") from None
    if type(obj) is not dict:
        raise ControlRecordError(f"the value of {_short(text_key)!r} is a JSON {type(obj).__name__}, not an object")
    if obj.get("schema") != SCHEMA:
        raise ControlRecordError(f"schema {_short(obj.get('schema'))!r} is not {SCHEMA!r}")
    if obj.get("type") != kind:
        raise ControlRecordError(f"type {_short(obj.get('type'))!r} does not match the {kind} key {_short(text_key)!r}")
    if kind == "silence":
        return _silence(obj, ident)
    return _feedback(obj, ident)


def _silence(obj: dict[str, Any], ident: str) -> Silence:
    sid = _text(obj, "id", "silence")
    if sid != ident:
        raise ControlRecordError(f"silence id {_short(sid)!r} does not match its key silence:{_short(ident)}")
    what = f"silence {_short(sid)!r}"
    pattern = _text(obj, "entities", what)
    reason = _text(obj, "reason", what)
    if not reason.strip():
        raise ControlRecordError(f"{what}: 'reason' is empty")
    starts_ms, ends_ms = _time(obj, "starts_at", what), _time(obj, "ends_at", what)
    if ends_ms <= starts_ms:
        raise ControlRecordError(f"{what}: ends_at {iso_utc(ends_ms)} is not after starts_at {iso_utc(starts_ms)}")
    return Silence(sid, pattern, starts_ms, ends_ms, reason, _text(obj, "created_by", what, empty=True))


def _feedback(obj: dict[str, Any], ident: str) -> Feedback:
    alert_id = _text(obj, "alert_id", "feedback")
    if alert_id != ident:
        raise ControlRecordError(f"alert_id {_short(alert_id)!r} does not match its key feedback:{_short(ident)}")
    what = f"feedback on {_short(alert_id)!r}"
    verdict = obj.get("verdict")
    if verdict not in VERDICTS:
        raise ControlRecordError(f"{what}: verdict {_short(verdict)!r} is not false_positive or true_positive")
    key = obj.get("key")
    if key is not None and (type(key) is not str or not key):
        raise ControlRecordError(f"{what}: 'key' is not a non-empty string or null")
    comment = obj.get("comment", "")
    if type(comment) is not str:
        raise ControlRecordError(f"{what}: 'comment' is not a string")
    return Feedback(alert_id, verdict, key, comment, _time(obj, "at", what))


def _text(obj: dict[str, Any], field: str, what: str, empty: bool = False) -> str:
    v = obj.get(field)
    if v is None:
        raise ControlRecordError(f"{what}: field {field!r} is missing")
    if type(v) is not str:
        raise ControlRecordError(f"{what}: field {field!r} is a {type(v).__name__}, not a string")
    if not v and not empty:
        raise ControlRecordError(f"{what}: field {field!r} is empty")
    return v


def _time(obj: dict[str, Any], field: str, what: str) -> int:
    v = _text(obj, field, what)
    try:
        return parse_time(v)
    except ControlRecordError as e:
        raise ControlRecordError(f"{what}: {field} {e}") from None


def _short(v: Any, n: int = 80) -> Any:
    """A value quoted in a reason, cut so that a reason stays one short line."""
    if isinstance(v, str):
        v = v.replace("\n", " ").replace("\r", " ")
        return v if len(v) <= n else v[: n - 3] + "..."
    return v


# ---- writing -----------------------------------------------------------------------------------


def encode_silence(silence: Silence) -> tuple[bytes, bytes]:
    """The record of a silence; ControlRecordError if parse_control would refuse it."""
    key = (SILENCE_PREFIX + silence.id).encode()
    value = orjson.dumps(
        {
            "schema": SCHEMA,
            "type": "silence",
            "id": silence.id,
            "entities": silence.pattern,
            "starts_at": iso_utc(silence.starts_ms),
            "ends_at": iso_utc(silence.ends_ms),
            "reason": silence.reason,
            "created_by": silence.created_by,
        }
    )
    parse_control(key, value)  # what is written is what every reader accepts
    return key, value


def encode_silence_deleted(silence_id: str) -> tuple[bytes, None]:
    """The tombstone that deletes a silence."""
    if not silence_id:
        raise ControlRecordError("a silence id is empty")
    return (SILENCE_PREFIX + silence_id).encode(), None


def encode_feedback(feedback: Feedback) -> tuple[bytes, bytes]:
    """The record of a verdict on an alert; ControlRecordError if parse_control would refuse it."""
    key = (FEEDBACK_PREFIX + feedback.alert_id).encode()
    value = orjson.dumps(
        {
            "schema": SCHEMA,
            "type": "feedback",
            "alert_id": feedback.alert_id,
            "verdict": feedback.verdict,
            "key": feedback.key,
            "comment": feedback.comment,
            "at": iso_utc(feedback.at_ms),
        }
    )
    parse_control(key, value)
    return key, value


# ---- the silences in force ---------------------------------------------------------------------


class SilenceTable:
    """The silences read so far, by id, in the order they were first applied (a replaced silence keeps
    its place). Main thread only."""

    def __init__(self, records: Iterable[ControlRecord] = ()) -> None:
        self._by_id: dict[str, Silence] = {}
        for r in records:
            self.apply(r)

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, silence_id: str) -> Silence | None:
        return self._by_id.get(silence_id)

    def apply(self, record: ControlRecord) -> None:
        """Add or replace a silence, delete one on its tombstone; feedback is not the table's business."""
        if isinstance(record, Silence):
            self._by_id[record.id] = record
        elif isinstance(record, SilenceDeleted):
            self._by_id.pop(record.id, None)

    def match(self, key: str, at_ms: int) -> Silence | None:
        """The first silence in force at `at_ms` whose pattern matches the entity `key`, or None."""
        for s in self._by_id.values():
            if s.matches(key, at_ms):
                return s
        return None

    def active(self, at_ms: int) -> list[Silence]:
        """The silences in force at `at_ms` (started, not ended)."""
        return [s for s in self._by_id.values() if s.active_at(at_ms)]

    def upcoming(self, at_ms: int) -> list[Silence]:
        """The silences that start after `at_ms`."""
        return [s for s in self._by_id.values() if s.starts_ms > at_ms]

    def expire(self, at_ms: int) -> int:
        """Drop the silences that ended at or before `at_ms`; how many were dropped."""
        ended = [i for i, s in self._by_id.items() if s.ends_ms <= at_ms]
        for i in ended:
            del self._by_id[i]
        return len(ended)
