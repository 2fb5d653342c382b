"""A time or offset range of a topic, read the way the running service reads it, without a group.

    read_topic_range(settings, topic, since, until, features=None) -> TopicRange

What `stream-detector-train fit --kafka-topic`, `baseline --kafka-topic` and
`stream-detector replay --kafka-topic` read (offline/topic_table.py turns it into a `DataTable`):

- **Bounds** (`parse_bound`): `earliest`, `latest` (or `now`), an ISO-8601 time
  (`2026-12-01T00:00Z`; no zone = UTC), a duration before now (`90m`, `6h`, `7d`, `2w`), or `@N`
  for offset N in every partition. A time resolves per partition with offsets-for-times: the first
  record whose Kafka timestamp (not an event-time field) is at or after it. `since` is inclusive
  and `until` exclusive. Defaults: `earliest` and `latest`, the end offsets when the read starts,
  so that a live topic still ends.
- **The client** is the changelog restorer's (kafka_config `reader`): the service's security and
  `kafka.consumer` settings, `assign` only (it never joins or commits to a consumer group),
  `read_committed`, partition EOF on.
- **Decoding** is the service's `Decoder`, for `features` (a bundle's, or the ones given), so the
  rows are exactly those the service would score. Without `features`, the numeric fields of the first
  decodable records are the features (the key and timestamp fields of `[input]` and the usual names
  for them, `ts`, `timestamp`, ..., excluded), in the order they first appear. A message the service
  would dead-letter is counted by its reason (`TopicRange.dead_letters`), never fatal.
- **Progress**: a tqdm bar with records/s when tqdm is installed (training has it), else a log line
  every 5 s.
- **Errors**: `TopicRangeError`, one sentence: the broker is unreachable, the topic does not exist,
  a bound cannot be parsed, the range holds no record.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from stream_detector.ingest.decode import Decoder
from stream_detector.ingest.kafka_config import client_config, quiet, unreachable

if TYPE_CHECKING:
    from stream_detector.config import Settings

log = logging.getLogger(__name__)

KEY_NAMES = ("key", "entity")  # never taken as features when the features are discovered
TIME_NAMES = ("timestamp", "time", "ts", "event_time")
DISCOVERY_RECORDS = 1000  # records looked at to find the features when none are given
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNIT_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_CONSUME_BATCH = 5000


class TopicRangeError(Exception):
    """A topic range that cannot be read; one sentence for the user."""


@dataclass(frozen=True)
class Bound:
    """One end of a range: `earliest`, `latest`, a time (`ms`) or an offset in every partition."""

    kind: str  # "earliest" | "latest" | "time" | "offset"
    value: int = 0
    text: str = ""


def duration_ms(text: str) -> int | None:
    """`90s`, `30m`, `6h`, `7d`, `2w` (a decimal number allowed) as milliseconds; None if it is not one."""
    m = _DURATION.match(text.strip().lower())
    return int(float(m.group(1)) * _UNIT_MS[m.group(2)]) if m else None


def parse_bound(text: str | None, default: str, now_ms: int | None = None) -> Bound:
    """`--since` / `--until` as given (module docstring); `default` when not given."""
    raw = (text if text is not None else default).strip()
    low = raw.lower()
    if low == "earliest":
        return Bound("earliest", 0, raw)
    if low in ("latest", "now"):
        return Bound("latest", 0, raw)
    if low.startswith("@"):
        if not low[1:].isdigit():
            raise TopicRangeError(f"the offset {raw!r} is not '@' followed by a whole number.")
        return Bound("offset", int(low[1:]), raw)
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    before = duration_ms(low)
    if before is not None:
        return Bound("time", now_ms - before, raw)
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise TopicRangeError(
            f"cannot read {raw!r} as a time: give earliest, latest, an ISO-8601 time (2026-12-01T00:00Z), "
            "a duration before now (90m, 6h, 7d) or @OFFSET."
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return Bound("time", int(when.timestamp() * 1000), raw)


@dataclass(frozen=True)
class TopicRange:
    """The decoded rows of a range, in read order (partition by partition, offset order)."""

    topic: str
    features: tuple[str, ...]
    keys: list[str]
    rows: np.ndarray  # float32 [n, F]
    event_time_ms: np.ndarray  # int64 [n]
    partition: np.ndarray  # int32 [n]
    offset: np.ndarray  # int64 [n]
    dead_letters: dict[str, int]  # reason code -> messages the service would dead-letter
    records: int  # messages read: rows + dead letters
    seconds: float
    since: str
    until: str

    def summary(self) -> str:
        rate = self.records / self.seconds if self.seconds > 0 else float("inf")
        dead = sum(self.dead_letters.values())
        why = ", ".join(f"{reason} {n}" for reason, n in sorted(self.dead_letters.items(), key=lambda kv: -kv[1]))
        refused = f"{dead:,} that the service would dead-letter ({why})" if dead else "none that the service refuses"
        return (
            f"read {self.records:,} records of {self.topic} from {self.since} to {self.until} in {self.seconds:.1f} s "
            f"({rate:,.0f} records/s): {len(self.keys):,} rows of {len(self.features)} features, {refused}"
        )


def read_topic_range(
    settings: Settings,
    topic: str,
    since: str | None = None,
    until: str | None = None,
    features: Sequence[str] | None = None,
) -> TopicRange:
    from confluent_kafka import KafkaError

    start_bound, end_bound = parse_bound(since, "earliest"), parse_bound(until, "latest")
    t0 = time.perf_counter()
    consumer, ranges = _open_range(settings, topic, start_bound, end_bound)
    try:
        if not ranges:
            raise TopicRangeError(f"topic {topic!r} has no record from {start_bound.text} to {end_bound.text}.")
        return _read(consumer, KafkaError, topic, ranges, features, settings, start_bound, end_bound, t0)
    finally:
        consumer.close()


def read_topic_values(
    settings: Settings, topic: str, since: str | None = None, until: str | None = None
) -> list[bytes]:
    """The raw values of a range, in read order (an empty range gives []): for topics the service
    writes, such as the alert topics that `stream-detector compare` reads."""
    from confluent_kafka import KafkaError

    start_bound, end_bound = parse_bound(since, "earliest"), parse_bound(until, "latest")
    consumer, ranges = _open_range(settings, topic, start_bound, end_bound)
    try:
        values: list[bytes] = []
        progress = _Progress(sum(e - f for f, e in ranges.values()), topic)
        try:
            for kept in _batches(consumer, KafkaError, topic, ranges, settings, progress):
                values.extend(m.value() for m in kept if m.value() is not None)
        finally:
            progress.close()
        return values
    finally:
        consumer.close()


def _open_range(settings: Settings, topic: str, start: Bound, end: Bound) -> tuple[Any, dict[int, tuple[int, int]]]:
    """A consumer assigned to [start, end) of every partition that has records there, and those ranges."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    bootstrap = settings.kafka.bootstrap_servers
    timeout = settings.kafka.timeout_s
    consumer = Consumer(quiet(client_config(settings, "reader")))
    try:
        try:
            meta = consumer.list_topics(topic, timeout=timeout)
        except KafkaException as e:
            raise TopicRangeError(unreachable(settings, e.args[0].str())) from None
        info = meta.topics.get(topic)
        if info is None or info.error is not None or not info.partitions:
            raise TopicRangeError(f"topic {topic!r} does not exist on {bootstrap}.")
        ranges = {}
        for p in sorted(info.partitions):
            try:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout, cached=False)
                first = _resolve(consumer, TopicPartition, topic, p, start, low, high, timeout)
                last = _resolve(consumer, TopicPartition, topic, p, end, low, high, timeout)
            except KafkaException as e:
                raise TopicRangeError(
                    f"could not read the offsets of partition {p} of {topic!r} ({e.args[0].str()})."
                ) from None
            if last > first:
                ranges[p] = (first, last)
        if ranges:
            consumer.assign([TopicPartition(topic, p, first) for p, (first, _) in ranges.items()])
        return consumer, ranges
    except BaseException:
        consumer.close()
        raise


def _resolve(consumer: Any, tp_type: Any, topic: str, p: int, bound: Bound, low: int, high: int, timeout: float) -> int:
    from confluent_kafka import KafkaException

    if bound.kind == "earliest":
        return low
    if bound.kind == "latest":
        return high
    if bound.kind == "offset":
        return min(max(bound.value, low), high)
    found = consumer.offsets_for_times([tp_type(topic, p, bound.value)], timeout=timeout)[0]
    if found.error is not None:  # never read as "no record after the time": that would skip the partition silently
        raise KafkaException(found.error)
    return high if found.offset < 0 else min(max(found.offset, low), high)  # -1: no record at or after the time


def _read(
    consumer: Any,
    kafka_error: Any,
    topic: str,
    ranges: dict[int, tuple[int, int]],
    features: Sequence[str] | None,
    settings: Settings,
    start_bound: Bound,
    end_bound: Bound,
    t0: float,
) -> TopicRange:
    total = sum(end - first for first, end in ranges.values())
    decoder = None if features is None else Decoder(features, settings.input)
    pending: list[Any] = []  # messages read before the features are known
    parts: list[tuple[Any, ...]] = []
    dead: Counter[str] = Counter()
    records = 0
    progress = _Progress(total, topic)
    try:
        for kept in _batches(consumer, kafka_error, topic, ranges, settings, progress):
            records += len(kept)
            if decoder is None:
                pending.extend(kept)
                found = _discover_features(pending, settings)
                if found is None and len(pending) < DISCOVERY_RECORDS and len(pending) < total:
                    continue
                if found is None:
                    raise TopicRangeError(
                        f"none of the first {len(pending):,} records of {topic!r} is a JSON object with a numeric "
                        "field and a key; name the features (--features) and check [input] key_field."
                    )
                log.info("features found in the first records of %s: %s", topic, ", ".join(found))
                decoder = Decoder(found, settings.input)
                kept, pending = pending, []
            batch, dead_letters = decoder.decode(kept)
            dead.update(d.reason for d in dead_letters)
            if batch.n:
                parts.append((batch.keys, batch.rows, batch.event_time_ms, batch.partition, batch.offset))
    finally:
        progress.close()
    if decoder is None:  # the range ended before enough records to look at
        found = _discover_features(pending, settings)
        if found is None:
            raise TopicRangeError(f"no record of {topic!r} in the range is a JSON object with a numeric field.")
        decoder = Decoder(found, settings.input)
        batch, dead_letters = decoder.decode(pending)
        dead.update(d.reason for d in dead_letters)
        if batch.n:
            parts.append((batch.keys, batch.rows, batch.event_time_ms, batch.partition, batch.offset))
    n_features = len(decoder.features)
    keys = [k for part in parts for k in part[0]]
    return TopicRange(
        topic=topic,
        features=decoder.features,
        keys=keys,
        rows=np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, n_features), np.float32),
        event_time_ms=np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64),
        partition=np.concatenate([p[3] for p in parts]) if parts else np.zeros(0, np.int32),
        offset=np.concatenate([p[4] for p in parts]) if parts else np.zeros(0, np.int64),
        dead_letters=dict(dead),
        records=records,
        seconds=time.perf_counter() - t0,
        since=start_bound.text,
        until=end_bound.text,
    )


def _batches(
    consumer: Any, kafka_error: Any, topic: str, ranges: dict[int, tuple[int, int]], settings: Settings, progress: Any
) -> Iterator[list[Any]]:
    """The range's messages, a consumed batch at a time, until every partition reached its end."""
    open_parts = set(ranges)
    left = sum(end - first for first, end in ranges.values())
    last_data = time.monotonic()
    while open_parts:
        kept = []
        for m in consumer.consume(_CONSUME_BATCH, timeout=0.5):
            err = m.error()
            if err is not None:
                if err.code() == kafka_error._PARTITION_EOF:
                    open_parts.discard(m.partition())
                    continue
                raise TopicRangeError(f"reading {topic!r} failed ({err.str()}).")
            end = ranges[m.partition()][1]
            if m.offset() >= end:
                open_parts.discard(m.partition())
                continue
            if m.offset() == end - 1:
                open_parts.discard(m.partition())
            kept.append(m)
        if kept:
            last_data = time.monotonic()
            left -= len(kept)
            progress.update(len(kept))
            yield kept
        elif time.monotonic() - last_data > 3 * settings.kafka.timeout_s:
            raise TopicRangeError(
                f"no record arrived from {topic!r} for {3 * settings.kafka.timeout_s:g} s with up to {left:,} of "
                "the range still to read; is the broker still reachable?"
            )


def _discover_features(messages: Sequence[Any], settings: Settings) -> tuple[str, ...] | None:
    """The numeric fields of the records, in order of first appearance, without key and time fields."""
    skip = {*KEY_NAMES, *TIME_NAMES, settings.input.key_field, settings.input.timestamp_field}
    names: dict[str, None] = {}
    for m in messages[:DISCOVERY_RECORDS]:
        try:
            obj = orjson.loads(m.value() or b"")
        except orjson.JSONDecodeError:
            continue
        if type(obj) is not dict:
            continue
        for k, v in obj.items():
            if k not in skip and type(v) in (int, float):
                names.setdefault(k, None)
    return tuple(names) or None


class _Progress:
    """tqdm when installed, else a log line every 5 s."""

    def __init__(self, total: int, topic: str) -> None:
        self.total, self.topic, self.done = total, topic, 0
        self.t0 = self.last = time.monotonic()
        try:
            from tqdm import tqdm

            self.bar: Any = tqdm(total=total, unit=" records", unit_scale=True, desc=topic, leave=False, delay=1.0)
        except ImportError:
            self.bar = None

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self.last >= 5.0:
            self.last = time.monotonic()
            rate = self.done / max(self.last - self.t0, 1e-9)
            log.info(
                "%s: %s of %s records (%.0f%%), %s records/s",
                self.topic,
                f"{self.done:,}",
                f"{self.total:,}",
                100 * self.done / max(self.total, 1),
                f"{rate:,.0f}",
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
