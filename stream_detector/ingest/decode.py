"""Kafka messages → an `EventBatch` of the valid observations + dead letters for the rest.

Contract 2: one message = one JSON object with the bundle's features by name; the entity key is the
message key or `input.key_field`; the event time is `input.timestamp_field` or the Kafka timestamp.
Anything else becomes a `DeadLetter` with a reason code (never a crash, never a silent drop).

Cost matters (DESIGN.md: decoding is the CPU ingest floor): each message is decoded by a typed
`msgspec` decoder built for the bundle's features (float fields, unknown fields skipped; measured
1.5x faster than `orjson.loads` + `itemgetter` on ~1.2 KB events, bench/e2e.py's decoder table),
the features pulled with one C-level `attrgetter`, and the float32 [n, F] array built once per
batch, where non-finite values are found with a single vectorised check. A message the typed
decoder refuses (missing feature, wrong type, not JSON, ...) goes through the orjson path, which
names the exact dead-letter reason; without msgspec installed every message takes that path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from stream_detector.core.events import NO_TIME, EventBatch

try:
    from confluent_kafka import TIMESTAMP_NOT_AVAILABLE
except ImportError:  # decoding pre-encoded messages without a Kafka client (bench/inprocess.py)
    TIMESTAMP_NOT_AVAILABLE = 0

try:
    import msgspec
except ImportError:  # the orjson path alone: same results, slower
    msgspec = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from stream_detector.config import InputSettings

log = logging.getLogger(__name__)

# Reason codes carried in the dead-letter header `dlq.reason`.
OVERSIZE = "oversize"
EMPTY = "empty-value"
UNDECODABLE = "undecodable-json"
NOT_OBJECT = "not-an-object"
MISSING_KEY = "missing-key"
MISSING_FEATURE = "missing-feature"
NON_NUMERIC = "non-numeric"
NON_FINITE = "non-finite"
BAD_TIMESTAMP = "bad-timestamp"
BAD_CONTROL_RECORD = "bad-control-record"  # a control-topic record (ingest/control.py), not an input event
INPUT_REASONS = (
    OVERSIZE,
    EMPTY,
    UNDECODABLE,
    NOT_OBJECT,
    MISSING_KEY,
    MISSING_FEATURE,
    NON_NUMERIC,
    NON_FINITE,
    BAD_TIMESTAMP,
)

_NUMBER_TYPES = frozenset((int, float))  # bool is excluded on purpose: type(True) is bool


@dataclass(frozen=True)
class DeadLetter:
    message: Any  # the original confluent_kafka.Message (bytes, key, headers, position)
    reason: str  # one of the reason codes above
    detail: str  # one line for humans, e.g. "feature 'cpu' is missing"


class Decoder:
    """Decodes batches for one feature schema (the bundle's feature order) and input mapping."""

    def __init__(self, features: Sequence[str], settings: InputSettings, typed: bool = True) -> None:
        self.features = tuple(features)
        self.settings = settings
        self._get = itemgetter(*self.features)
        self._single = len(self.features) == 1
        self._scale_ts = 1000 if settings.timestamp_unit == "s" else 1
        self._typed = _typed_decoder(self.features, settings) if typed else None

    def decode(self, messages: Sequence[Any]) -> tuple[EventBatch, list[DeadLetter]]:
        if self._typed is not None:
            return self._decode_typed(messages)
        return self._decode_orjson(messages)

    def _decode_typed(self, messages: Sequence[Any]) -> tuple[EventBatch, list[DeadLetter]]:
        """The fast path for a batch of good messages. At the first message it cannot take (bad,
        or merely unusual: no key, an empty key), the orjson path decodes the whole batch, so
        dead-letter reasons and event order are exactly that path's."""
        s = self.settings
        max_bytes, key_field, ts_field = s.max_message_bytes, s.key_field, s.timestamp_field
        assert self._typed is not None  # decode() takes this path only with a typed decoder
        decode_one, get_row = self._typed
        errors = (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError)
        scale = self._scale_ts
        keys: list[str] = []
        times: list[int] = []
        values: list[Any] = []
        try:
            for m in messages:
                value = m.value()
                if value is None or len(value) > max_bytes:
                    raise _Unusual
                obj = decode_one(value)
                if key_field is None:
                    raw_key = m.key()
                    if not raw_key or type(raw_key) is not bytes:
                        raise _Unusual
                    key = raw_key.decode("utf-8")
                else:
                    key = obj.sd_key
                    if type(key) is not str:
                        key = str(key)
                    elif not key:
                        raise _Unusual
                if ts_field is None:
                    ts_type, ts = m.timestamp()
                    if ts_type == TIMESTAMP_NOT_AVAILABLE:
                        ts = NO_TIME
                else:
                    ts = obj.sd_ts
                    if not (-1e15 < ts < 1e15):
                        raise _Unusual
                    ts = int(ts * scale)
                keys.append(key)
                times.append(ts)
                values.append(get_row(obj))
        except (_Unusual, *errors):
            return self._decode_orjson(messages)
        return self._finish(list(messages), keys, times, self._rows(values), [])

    def _rows(self, values: list[Any]) -> np.ndarray:
        n_features = len(self.features)
        with np.errstate(over="ignore", invalid="ignore"):  # float32 overflow (e.g. 1e39) becomes inf, caught later
            return np.array(values, dtype=np.float32).reshape(len(values), n_features)

    def _finish(
        self, kept: list[Any], keys: list[str], times: list[int], rows: np.ndarray, dead: list[DeadLetter]
    ) -> tuple[EventBatch, list[DeadLetter]]:
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            for i in np.flatnonzero(~finite):
                bad = self.features[int(np.flatnonzero(~np.isfinite(rows[i]))[0])]
                dead.append(DeadLetter(kept[i], NON_FINITE, f"feature {bad!r} is NaN or infinite (as float32)"))
            keep = np.flatnonzero(finite)
            kept = [kept[i] for i in keep]
            keys = [keys[i] for i in keep]
            times = [times[i] for i in keep]
            rows = rows[finite]
        batch = EventBatch(
            keys,
            np.ascontiguousarray(rows),
            np.array(times, dtype=np.int64),
            [m.topic() for m in kept],
            np.array([m.partition() for m in kept], dtype=np.int32),
            np.array([m.offset() for m in kept], dtype=np.int64),
        )
        return batch, dead

    def _decode_orjson(self, messages: Sequence[Any]) -> tuple[EventBatch, list[DeadLetter]]:
        s = self.settings
        max_bytes, key_field, ts_field = s.max_message_bytes, s.key_field, s.timestamp_field
        get, single, number_types = self._get, self._single, _NUMBER_TYPES
        loads, decode_error = orjson.loads, orjson.JSONDecodeError
        dead: list[DeadLetter] = []
        kept: list[Any] = []
        keys: list[str] = []
        times: list[int] = []
        values: list[Any] = []
        key: Any  # a str once checked; before that, whatever the JSON field holds
        ts: Any  # an int once checked; before that, whatever the JSON field holds

        for m in messages:
            value = m.value()
            if value is None:
                dead.append(DeadLetter(m, EMPTY, "the message has no value"))
                continue
            if len(value) > max_bytes:
                dead.append(DeadLetter(m, OVERSIZE, f"{len(value)} bytes exceeds input.max_message_bytes={max_bytes}"))
                continue
            try:
                obj = loads(value)
            except decode_error as e:
                dead.append(DeadLetter(m, UNDECODABLE, f"not valid JSON: {e}"))
                continue
            if type(obj) is not dict:
                dead.append(DeadLetter(m, NOT_OBJECT, f"JSON {type(obj).__name__}, expected an object"))
                continue

            if key_field is None:
                raw_key = m.key()
                if not raw_key:
                    dead.append(DeadLetter(m, MISSING_KEY, "the message has no key"))
                    continue
                try:
                    key = raw_key.decode("utf-8") if type(raw_key) is bytes else str(raw_key)
                except UnicodeDecodeError:
                    dead.append(DeadLetter(m, MISSING_KEY, "the message key is not UTF-8"))
                    continue
            else:
                key = obj.get(key_field)
                if type(key) is not str or not key:
                    if type(key) is int:
                        key = str(key)
                    else:
                        dead.append(DeadLetter(m, MISSING_KEY, f"field {key_field!r} is missing or not a string"))
                        continue

            if ts_field is None:
                ts_type, ts = m.timestamp()
                ts = NO_TIME if ts_type == TIMESTAMP_NOT_AVAILABLE else ts
            else:
                ts = obj.get(ts_field)
                if type(ts) not in number_types or not (-1e15 < ts < 1e15):
                    dead.append(DeadLetter(m, BAD_TIMESTAMP, f"field {ts_field!r} is missing or not an epoch number"))
                    continue
                ts = int(ts * self._scale_ts)

            try:
                row = get(obj)
            except KeyError as e:
                dead.append(DeadLetter(m, MISSING_FEATURE, f"feature {e.args[0]!r} is missing"))
                continue
            if single:
                row = (row,)
            if not number_types.issuperset(map(type, row)):
                bad = next(f for f, v in zip(self.features, row) if type(v) not in number_types)
                dead.append(DeadLetter(m, NON_NUMERIC, f"feature {bad!r} is not a number"))
                continue
            kept.append(m)
            keys.append(key)
            times.append(ts)
            values.append(row)

        n_features = len(self.features)
        with np.errstate(over="ignore", invalid="ignore"):  # float32 overflow (e.g. 1e39) becomes inf, caught below
            try:
                rows = np.array(values, dtype=np.float32).reshape(len(values), n_features)
            except OverflowError:  # an int beyond float64 range (rare): convert row by row
                rows = np.array([[float(v) if abs(v) < 1e300 else np.inf for v in r] for r in values], dtype=np.float32)
                rows = rows.reshape(len(values), n_features)
        return self._finish(kept, keys, times, rows, dead)


class _Unusual(Exception):
    """A message the typed fast path leaves to the orjson path."""


def _typed_decoder(features: tuple[str, ...], settings: InputSettings) -> tuple[Any, Any] | None:
    """(decode(bytes) -> struct, struct -> feature tuple) of a msgspec decoder typed for these
    features (float, bool refused) and the key/time fields; None without msgspec or if the names
    clash (the orjson path then does everything)."""
    if msgspec is None:
        return None
    from operator import attrgetter

    fields: list[tuple[str, Any]] = [(f"f{i}", float) for i in range(len(features))]
    rename = {f"f{i}": name for i, name in enumerate(features)}
    if settings.key_field is not None:
        fields.append(("sd_key", str | int))
        rename["sd_key"] = settings.key_field
    if settings.timestamp_field is not None:
        fields.append(("sd_ts", int | float))
        rename["sd_ts"] = settings.timestamp_field
    if len(set(rename.values())) != len(rename):
        return None
    try:
        event = msgspec.defstruct("Event", fields, rename=rename)
        decoder = msgspec.json.Decoder(event)
    except (TypeError, ValueError) as e:
        log.info("typed decoder not available for these fields (%s); using orjson", e)
        return None
    names = [f"f{i}" for i in range(len(features))]
    get_row = attrgetter(*names) if len(names) > 1 else (lambda o: (o.f0,))
    return decoder.decode, get_row


def dead_letter_headers(d: DeadLetter) -> list[tuple[str, str | bytes | None]]:
    """The original headers (a value may be None) plus where the message came from and why it was rejected."""
    m = d.message
    headers = list(m.headers() or [])
    headers += [
        ("dlq.reason", d.reason.encode()),
        ("dlq.detail", d.detail.encode("utf-8", "replace")),
        ("dlq.topic", str(m.topic()).encode()),
        ("dlq.partition", str(m.partition()).encode()),
        ("dlq.offset", str(m.offset()).encode()),
    ]
    if m.key() is not None:
        headers.append(("dlq.key", m.key() if isinstance(m.key(), bytes) else str(m.key()).encode()))
    return headers
