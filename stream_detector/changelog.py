"""Entity state that moves with its partition: a compacted changelog topic keyed by entity.

Each record holds one entity's complete detection state (`DetectorCore.state_of`: window rows,
threshold, alert lifecycle) plus the input offsets it reflects (`applied`: {topic: offset of the
last event of this entity applied}). Record partition = the input partition number, record key =
the entity key; a tombstone (value None) marks an entity that is no longer tracked (evicted).

Written at every checkpoint for the entities that changed since the previous one (`StateTracker`),
inside the Kafka transaction in exactly-once mode, before the offset commit in at-least-once mode.
Read back for newly assigned partitions by `Restorer` (its own consumer, `read_committed`, in
bounded chunks while the main consumer keeps polling).

At-least-once: a crash between writing the changelog and committing the offsets leaves state that
is *ahead* of the committed offsets. The `applied` offsets fence it: after a restore, events of an
entity at or below its applied offset are skipped (they are already in its state, and their alerts
were acknowledged before the changelog was written), so the state after re-processing is the state
the entity would have had without the crash.

Encoding (measured in docs/reliability.md): 4-byte magic, a little-endian uint32 header length, an
orjson header in which every numpy array is replaced by a reference, then the arrays' raw bytes.
float64 arrays whose values are all float32-exact (scores are float32) are stored as float32 and
widened again on decoding, so a round trip is bit-exact.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import orjson

from stream_detector.events import EventBatch

log = logging.getLogger(__name__)

MAGIC = b"SDS1"
_HEADER = struct.Struct("<4sI")
_ND = "$nd"


class ChangelogError(Exception):
    """A changelog record or topic that cannot be used; one sentence for the operator."""


# ---- encoding --------------------------------------------------------------------------------


def encode_state(state: dict[str, Any], applied: dict[str, int]) -> bytes:
    blobs: list[bytes] = []
    size = 0

    def walk(v: Any) -> Any:
        nonlocal size
        if isinstance(v, np.ndarray):
            arr = np.ascontiguousarray(v)
            stored = arr
            if arr.dtype == np.float64:
                narrow = arr.astype(np.float32)
                if np.array_equal(narrow.astype(np.float64), arr, equal_nan=True):
                    stored = narrow
            ref = {_ND: [str(stored.dtype), list(arr.shape), size, str(arr.dtype)]}
            b = stored.tobytes()
            blobs.append(b)
            size += len(b)
            return ref
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        if isinstance(v, np.generic):
            return v.item()
        return v

    header = orjson.dumps({"state": walk(state), "applied": applied})
    return _HEADER.pack(MAGIC, len(header)) + header + b"".join(blobs)


def decode_state(value: bytes) -> tuple[dict[str, Any], dict[str, int]]:
    """(state, applied); ChangelogError if the bytes are not a changelog record."""
    if len(value) < _HEADER.size:
        raise ChangelogError("a changelog record is too short to hold its header.")
    magic, n = _HEADER.unpack_from(value)
    if magic != MAGIC:
        raise ChangelogError(f"a changelog record starts with {magic!r}, not {MAGIC!r} (another writer or format).")
    start = _HEADER.size + n
    try:
        doc = orjson.loads(value[_HEADER.size : start])
    except orjson.JSONDecodeError as e:
        raise ChangelogError(f"a changelog record header is not valid JSON ({e}).") from None
    body = memoryview(value)[start:]

    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            if _ND in v and len(v) == 1:
                dtype, shape, off, orig = v[_ND]
                count = int(np.prod(shape)) if shape else 1
                arr = np.frombuffer(body, dtype=dtype, count=count, offset=off).reshape(shape)
                return arr.astype(orig)  # a copy, widened where it was narrowed
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    return walk(doc["state"]), {str(t): int(o) for t, o in doc["applied"].items()}


# ---- what to write at a checkpoint ----------------------------------------------------------


@dataclass(frozen=True)
class ChangelogRecord:
    partition: int
    key: str
    value: bytes | None  # None = tombstone


class StateTracker:
    """Which entities changed since the last checkpoint, the input offsets their state reflects,
    which entities have a live record (to tombstone them once evicted), and the fences of
    restored entities (at-least-once re-processing). Main thread only."""

    def __init__(self) -> None:
        self._dirty: dict[tuple[int, str], dict[str, int]] = {}  # entity -> {topic: last applied offset}
        self._live: set[tuple[int, str]] = set()
        self._fences: dict[tuple[int, str], dict[str, int]] = {}
        self.skipped = 0  # events skipped by fences (already in the restored state)

    @property
    def pending(self) -> int:
        return len(self._dirty)

    def note_batch(self, batch: EventBatch) -> None:
        """Record the entities (and offsets) of a batch about to be processed."""
        dirty = self._dirty
        for p, k, t, o in zip(batch.partition.tolist(), batch.keys, batch.topic, batch.offset.tolist()):
            d = dirty.get((p, k))
            if d is None:
                dirty[(p, k)] = {t: o}
            else:
                d[t] = o

    def snapshot(self, core: Any, owned: Iterable[int]) -> list[ChangelogRecord]:
        """Records for every entity changed since the last call (its state now) and tombstones for
        entities with a live record that the core no longer tracks. Call with the core idle."""
        owned = set(owned)
        tracked = set(core.entities())
        out: list[ChangelogRecord] = []
        for (p, k), applied in self._dirty.items():
            if p not in owned:
                continue
            state = core.state_of(p, k) if (p, k) in tracked else None
            if state is not None:
                out.append(ChangelogRecord(p, k, encode_state(state, applied)))
                self._live.add((p, k))
        gone = [e for e in self._live if e not in tracked]
        for p, k in gone:
            if p in owned:
                out.append(ChangelogRecord(p, k, None))
            self._live.discard((p, k))
        self._dirty.clear()
        return out

    def discard_pending(self, partitions: Iterable[int] | None = None) -> None:
        """Forget unwritten changes (of these partitions, or all): after an abort or a loss."""
        if partitions is None:
            self._dirty.clear()
            return
        drop = set(partitions)
        for e in [e for e in self._dirty if e[0] in drop]:
            del self._dirty[e]

    def forget_partitions(self, partitions: Iterable[int]) -> None:
        drop = set(partitions)
        self.discard_pending(drop)
        self._live = {e for e in self._live if e[0] not in drop}
        self._fences = {e: f for e, f in self._fences.items() if e[0] not in drop}

    def restored(self, partition: int, key: str, applied: dict[str, int], committed: dict[str, int]) -> None:
        """An entity's state was installed from the changelog; fence the events it already holds
        beyond the committed input offsets ({topic: next offset to read} of this partition)."""
        self._live.add((partition, key))
        ahead = {t: o for t, o in applied.items() if o >= committed.get(t, 0)}
        if ahead:
            self._fences[(partition, key)] = ahead

    def fence(self, batch: EventBatch) -> EventBatch:
        """The batch without events already applied to restored state (at-least-once replays)."""
        fences = self._fences
        if not fences:
            return batch
        keep = np.ones(batch.n, dtype=bool)
        for i, (p, k, t, o) in enumerate(zip(batch.partition.tolist(), batch.keys, batch.topic, batch.offset.tolist())):
            f = fences.get((p, k))
            if f is None or t not in f:
                continue
            if o <= f[t]:
                keep[i] = False
            else:
                del f[t]
                if not f:
                    del fences[(p, k)]
        if keep.all():
            return batch
        idx = np.flatnonzero(keep)
        self.skipped += int(batch.n - idx.size)
        return EventBatch(
            [batch.keys[i] for i in idx], batch.rows[idx], batch.event_time_ms[idx],
            [batch.topic[i] for i in idx], batch.partition[idx], batch.offset[idx],
        )


# ---- the topic and reading it back ------------------------------------------------------------


def ensure_changelog_topic(settings: Any, partitions: int) -> str:
    """The changelog topic, created (compacted, `partitions` partitions) if missing; ChangelogError
    with one sentence if it exists with too few partitions or without compaction."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

    topic = settings.processing.changelog_topic_for(settings.kafka.group_id)
    timeout = settings.kafka.timeout_s
    admin = AdminClient({"bootstrap.servers": settings.kafka.bootstrap_servers, **settings.kafka.client_settings()})
    try:
        meta = admin.list_topics(timeout=timeout)
        if topic not in meta.topics or meta.topics[topic].error is not None:
            fut = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=-1,
                                                config={"cleanup.policy": "compact"})], operation_timeout=timeout)
            try:
                fut[topic].result(timeout=timeout)
                log.info("created the state changelog topic %s (%d partitions, compacted)", topic, partitions)
            except KafkaException as e:
                if e.args[0].code() != 36:  # TOPIC_ALREADY_EXISTS: another member was quicker
                    raise ChangelogError(
                        f"the state changelog topic {topic} does not exist and could not be created ({e.args[0].str()});"
                        f" create it compacted with {partitions} partitions, or set processing.changelog = false."
                    ) from None
            return topic
        have = len(meta.topics[topic].partitions)
        if have < partitions:
            raise ChangelogError(f"the state changelog topic {topic} has {have} partitions, but the input has {partitions}; it needs at least as many.")
        res = ConfigResource(ConfigResource.Type.TOPIC, topic)
        policy = admin.describe_configs([res])[res].result(timeout=timeout)["cleanup.policy"].value
        if "compact" not in policy:
            raise ChangelogError(f"the state changelog topic {topic} has cleanup.policy={policy}; it must be compacted (cleanup.policy=compact).")
        return topic
    except KafkaException as e:
        raise ChangelogError(f"checking the state changelog topic {topic} failed ({e.args[0].str()}).") from None


class Restorer:
    """Reads changelog partitions from the beginning up to their end (the last stable offset:
    records of open or aborted transactions are never seen) with its own consumer, a bounded chunk
    per `step`, keeping only the newest value per entity. Main thread only."""

    def __init__(self, settings: Any, topic: str) -> None:
        from confluent_kafka import Consumer

        self.topic = topic
        conf = {
            "bootstrap.servers": settings.kafka.bootstrap_servers,
            **settings.kafka.client_settings(),
            "group.id": f"{settings.kafka.group_id}-restore",  # required by the client; never joined
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
            "queued.max.messages.kbytes": 16_384,
        }
        self._consumer = Consumer(conf)
        self._latest: dict[int, dict[str, bytes | None]] = {}
        self.records_read = 0

    @property
    def busy(self) -> bool:
        return bool(self._latest)

    def restoring(self, partition: int) -> bool:
        return partition in self._latest

    def start(self, partitions: Iterable[int]) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        new = sorted({int(p) for p in partitions} - set(self._latest))
        if new:
            for p in new:
                self._latest[p] = {}
            self._consumer.incremental_assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in new])

    def cancel(self, partitions: Iterable[int]) -> None:
        from confluent_kafka import TopicPartition

        gone = [p for p in partitions if p in self._latest]
        for p in gone:
            del self._latest[p]
        if gone:
            self._consumer.incremental_unassign([TopicPartition(self.topic, p) for p in gone])

    def step(self, max_records: int, timeout: float = 0.0) -> dict[int, dict[str, bytes | None]]:
        """Read up to `max_records`; returns {partition: {key: newest value or None}} for the
        partitions that reached their end in this step."""
        from confluent_kafka import KafkaError, TopicPartition

        if not self._latest:
            return {}
        done: dict[int, dict[str, bytes | None]] = {}
        for m in self._consumer.consume(max_records, timeout):
            p = m.partition()
            latest = self._latest.get(p)
            if latest is None:
                continue  # cancelled meanwhile
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    done[p] = self._latest.pop(p)
                elif err.fatal():
                    raise ChangelogError(f"reading the state changelog {self.topic}[{p}] failed: {err.str()}.")
                else:
                    log.warning("reading the state changelog %s[%d]: %s", self.topic, p, err.str())
                continue
            key = m.key()
            if key is not None:
                latest[key.decode("utf-8")] = m.value()
                self.records_read += 1
        if done:
            self._consumer.incremental_unassign([TopicPartition(self.topic, p) for p in done])
        return done

    def close(self) -> None:
        self._consumer.close()
