"""Kafka messages → an `EventBatch` of the valid observations + dead letters for the rest.

Contract 2: one message = one JSON object with the bundle's features by name; the entity key is the
message key or `input.key_field`; the event time is `input.timestamp_field` or the Kafka timestamp.
Anything else becomes a `DeadLetter` with a reason code (never a crash, never a silent drop).

Cost matters (DESIGN.md: decoding is the CPU ingest floor, ~20 µs/event): one `orjson.loads` per
message, the features pulled with one C-level `itemgetter`, their types checked with one set
operation, and the float32 [n, F] array built once per batch, where non-finite values are found
with a single vectorised check.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Sequence

import numpy as np
import orjson
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE

from stream_detector.config import InputSettings
from stream_detector.events import NO_TIME, EventBatch

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

_NUMBER_TYPES = frozenset((int, float))  # bool is excluded on purpose: type(True) is bool


@dataclass(frozen=True)
class DeadLetter:
    message: Any  # the original confluent_kafka.Message (bytes, key, headers, position)
    reason: str  # one of the reason codes above
    detail: str  # one line for humans, e.g. "feature 'cpu' is missing"


class Decoder:
    """Decodes batches for one feature schema (the bundle's feature order) and input mapping."""

    def __init__(self, features: Sequence[str], settings: InputSettings) -> None:
        self.features = tuple(features)
        self.settings = settings
        self._get = itemgetter(*self.features)
        self._single = len(self.features) == 1
        self._scale_ts = 1000 if settings.timestamp_unit == "s" else 1

    def decode(self, messages: Sequence[Any]) -> tuple[EventBatch, list[DeadLetter]]:
        s = self.settings
        max_bytes, key_field, ts_field = s.max_message_bytes, s.key_field, s.timestamp_field
        get, single, number_types = self._get, self._single, _NUMBER_TYPES
        loads, decode_error = orjson.loads, orjson.JSONDecodeError
        dead: list[DeadLetter] = []
        kept: list[Any] = []
        keys: list[str] = []
        times: list[int] = []
        values: list[Any] = []

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


def dead_letter_headers(d: DeadLetter) -> list[tuple[str, bytes]]:
    """The original headers plus where the message came from and why it was rejected."""
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
