"""Entity state that moves with its partition: a compacted changelog topic keyed by entity.

An entity's detection state (`DetectorCore.state_of`: window rows, threshold, alert lifecycle) is
kept as several records (layout below): a small meta record keyed by the entity, which also holds
the input offsets the state reflects (`applied`: {topic: offset of the last event of this entity
applied}), one record per window ring slot and one per chunk of the rolling-quantile history, so a
checkpoint writes what is new since the previous one: a cost per new event, not per window.
Record partition = the input partition number; tombstones (value None) remove an entity that is
no longer tracked (evicted).

Written at every checkpoint for the entities that changed since the previous one (`StateTracker`),
inside the Kafka transaction in exactly-once mode, before the offset commit in at-least-once mode.
Read back for newly assigned partitions by `Restorer` (its own consumer, `read_committed`, in
bounded chunks while the main consumer keeps polling).

At-least-once: a crash between writing the changelog and committing the offsets leaves state that
is *ahead* of the committed offsets. The `applied` offsets fence it: after a restore, events of an
entity at or below its applied offset are skipped (they are already in its state, and their alerts
were acknowledged before the changelog was written), so the state after re-processing is the state
the entity would have had without the crash.

Meta encoding (measured in docs/reliability.md): 4-byte magic, a little-endian uint32 header length, an
orjson header in which every numpy array is replaced by a reference, then the arrays' raw bytes.
float64 arrays whose values are all float32-exact (scores are float32) are stored as float32 and
widened again on decoding, so a round trip is bit-exact.
"""

from __future__ import annotations

import logging
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import orjson

from stream_detector.core.events import EventBatch

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


# ---- record layout: one entity = a meta record + window rows by ring slot + history chunks ------
#
# Keys (record partition = input partition number):
#   ENTITY            meta: `encode_state` of the entity's state without the window rows, the
#                     rolling-quantile history and the alert lifecycle (count, last time, threshold
#                     scalars, model version) + `applied`; written whenever the entity changed
#   ENTITY \0 a       the alert lifecycle (orjson; `null` = none), written only when it changed
#   ENTITY \0 w SLOT  a chunk of window rows: int64 chunk number q, int64 absolute position of its
#                     first row (0 = the entity's first event), uint16 F, the rows (float32); the
#                     row at position i lives in chunk q = i // ROW_CHUNK at SLOT = q mod
#                     (ceil(W / ROW_CHUNK) + 1), so compaction keeps every chunk the window needs
#   ENTITY \0 h SLOT  a chunk of the rolling-quantile history: int64 chunk number q, int64 index of
#                     its first entry, uint8 width (4/8), the entries; entry i of the entity's
#                     learned scores lives in chunk q = i // HISTORY_CHUNK at SLOT = q mod K
# So a checkpoint writes the rows and history entries added since the previous one (a touched
# chunk is rewritten whole with its current content: at most ROW_CHUNK - 1 rows or HISTORY_CHUNK
# - 1 entries more), not W x F per changed entity.
# Per entity the parts are written before its meta: a restore trusts the meta's count and checks
# every row's position and every chunk's number, and an entity whose parts do not match (a process
# killed in the middle of writing that one entity, at-least-once mode) starts cold with a warning.

ROW_CHUNK = 4  # window rows per record: fewer records for busy entities, at most 3 rows rewritten
HISTORY_CHUNK = 32
_SEP = "\x00"
_NULL = b"null"
_ROWS = struct.Struct("<qqH")
_CHUNK = struct.Struct("<qqB")


def _part_key(key: str, kind: str, slot: int) -> str:
    return f"{key}{_SEP}{kind}{slot}"


def _split_key(key: str) -> tuple[str, str | None, int]:
    """(entity, part kind 'w'/'h' or None for the meta record, slot)."""
    entity, sep, tail = key.rpartition(_SEP)
    if sep and tail == "a":
        return entity, "a", 0
    if sep and len(tail) > 1 and tail[0] in "wh" and tail[1:].isdigit():
        return entity, tail[0], int(tail[1:])
    return key, None, 0


def history_slots(history: int) -> int:
    """Chunk slots per entity: enough that the chunks of the newest `history` entries never share one."""
    return -(-int(history) // HISTORY_CHUNK) + 1


def _encode_chunk(q: int, first: int, values: np.ndarray) -> bytes:
    narrow = values.astype(np.float32)
    if np.array_equal(narrow.astype(np.float64), values, equal_nan=True):
        return _CHUNK.pack(q, first, 4) + narrow.tobytes()
    return _CHUNK.pack(q, first, 8) + values.astype(np.float64).tobytes()


def _join_chunks(chunks: dict[int, tuple[int, np.ndarray]], start: int, stop: int, size: int, out: np.ndarray, item: str) -> np.ndarray:
    """Entries [start, stop) of a sequence stored in chunks of `size` ({chunk index: (absolute index
    of its first entry, entries)}) copied into `out`; ChangelogError naming the first missing or
    partly written entry."""
    i = start
    while i < stop:
        q = i // size
        got = chunks.get(q)
        if got is None or got[0] > i:
            raise ChangelogError(f"{item} {i} is missing")
        first, vals = got
        end = min((q + 1) * size, stop)
        if first + len(vals) < end:
            raise ChangelogError(f"{item}s {i}-{end - 1} are not all there (written partly)")
        out[i - start : end - start] = vals[i - first : end - first]
        i = end
    return out


# ---- what to write at a checkpoint ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChangelogRecord:
    partition: int
    key: str
    value: bytes | None  # None = tombstone


@dataclass(slots=True)
class _Written:
    """What the changelog holds for a live entity, so the next checkpoint writes only what is new."""

    count: int  # window count covered by the written rows
    seen: int  # history entries covered by the written chunks
    row_slots: int  # row keys that may exist (tombstoned when the entity goes)
    chunk_slots: int
    alert: bytes = b"null"  # the alert record as last written (none written = no alert)
    valid: bool = True  # False: rewrite everything next time (model swap, restore)


class _Emitter:
    """`append` that hands each record on instead of collecting it (snapshot with `emit`)."""

    __slots__ = ("append",)

    def __init__(self, emit: Callable[[ChangelogRecord], None]) -> None:
        self.append = emit


class StateTracker:
    """Which entities changed since the last checkpoint (and how many events each got), the input
    offsets their state reflects, what the changelog already holds of each live entity (to write
    only new rows/history entries, and to tombstone every key once it is evicted), and the fences
    of restored entities (at-least-once re-processing). Main thread only."""

    def __init__(self, window: int, history: int = 1000) -> None:
        self.window = int(window)
        self.row_slots = -(-self.window // ROW_CHUNK) + 1
        self.chunk_slots = history_slots(history)
        self._dirty: dict[tuple[int, str], list] = {}  # entity -> [{topic: last applied offset}, events noted]
        self._writing: dict[tuple[int, str], list] = {}  # the same, for the checkpoint being written (begin)
        self._live: dict[tuple[int, str], _Written] = {}
        self._fences: dict[tuple[int, str], dict[str, int]] = {}
        self.skipped = 0  # events skipped by fences (already in the restored state)

    @property
    def pending(self) -> int:
        """Changed entities whose state is not written yet."""
        return len(self._dirty) + len(self._writing)

    def note_batch(self, batch: EventBatch) -> None:
        """Record the entities (and offsets) of a batch about to be processed."""
        dirty = self._dirty
        for p, k, t, o in zip(batch.partition.tolist(), batch.keys, batch.topic, batch.offset.tolist()):
            d = dirty.get((p, k))
            if d is None:
                dirty[(p, k)] = [{t: o}, 1]
            else:
                d[0][t] = o
                d[1] += 1

    def invalidate(self) -> None:
        """Every live entity is written whole at its next change (after a model swap: thresholds
        restart and rows may be renormalised, so earlier records no longer match)."""
        for w in self._live.values():
            w.valid = False

    def snapshot(self, core: Any, owned: Iterable[int], emit: Callable[[ChangelogRecord], None] | None = None) -> list[ChangelogRecord]:
        """Records for every entity changed since the last call (new rows, touched history chunks,
        then its meta record), including any checkpoint still being written in slices, and
        tombstones for every key of entities the core no longer tracks. With `emit`, each record
        is handed to it as it is made (nothing is collected; returns []). Call with the core idle."""
        out: Any = [] if emit is None else _Emitter(emit)
        self.begin(core, owned, out.append)
        self.write_some(core, out.append, budget_s=None)
        return out if emit is None else []

    def begin(self, core: Any, owned: Iterable[int], emit: Callable[[ChangelogRecord], None]) -> None:
        """Start a checkpoint written in slices by `write_some` between batches, so that the loop
        never stalls for a whole snapshot (a fixed Python cost per changed entity). The entities changed so far
        are written later, each with its state *then*, which may be newer than at `begin`:
        at-least-once commits the input offsets of `begin`, and the state being ahead of them is
        what `applied` + fences already handle. Tombstones for untracked entities go out now. Call
        with the core idle."""
        owned = set(owned)
        writing = self._writing
        for e, d in self._dirty.items():
            if e[0] not in owned:
                continue
            w = writing.get(e)
            if w is None:
                writing[e] = d
            else:  # still unwritten from an earlier begin
                w[0].update(d[0])
                w[1] += d[1]
        self._dirty.clear()
        tracked = set(core.entities())
        tombstones: list[ChangelogRecord] = []
        for e in [e for e in self._live if e not in tracked]:
            w = self._live.pop(e)
            if e[0] in owned:
                self._tombstones(tombstones, e[0], e[1], w)
        for r in tombstones:
            emit(r)

    def write_some(self, core: Any, emit: Callable[[ChangelogRecord], None], budget_s: float | None,
                   max_entities: int | None = None) -> bool:
        """Write entities of the checkpoint begun, until `budget_s` seconds passed (None: no time
        limit) or `max_entities` were written (None: no count limit); True once none is left. An
        entity that changed again since `begin` is written with its current state, covering those
        changes too. Call with the core idle."""
        writing, dirty = self._writing, self._dirty
        out = _Emitter(emit)
        deadline = None if budget_s is None else time.perf_counter() + budget_s
        left = len(writing) if max_entities is None else max(0, int(max_entities))
        while writing and left > 0:
            left -= 1
            e, (applied, noted) = writing.popitem()
            later = dirty.pop(e, None)
            if later is not None:
                applied = {**applied, **later[0]}
                noted += later[1]
            state = core.state_of(*e)
            if state is not None:
                self._write(out, e[0], e[1], state, applied, noted)  # type: ignore[arg-type]
            if deadline is not None and time.perf_counter() >= deadline:
                break
        return not writing

    @property
    def writing(self) -> int:
        """Entities of the checkpoint begun that are not written yet."""
        return len(self._writing)

    def _write(self, out: list[ChangelogRecord], p: int, k: str, state: dict[str, Any], applied: dict[str, int], noted: int) -> None:
        win = state["window"]
        count, rows = int(win["count"]), win["rows"]
        prev = self._live.get((p, k))
        # Incremental only when the count moved by exactly the events noted: otherwise the entity was
        # evicted and came back (a new life), or a core feeds it other rows (log stage): write it whole.
        same_life = prev is not None and prev.valid and count == prev.count + noted
        new = min(count - prev.count, rows.shape[0]) if same_life else rows.shape[0]
        oldest = count - rows.shape[0]  # position of rows[0]
        rows_hi = prev.row_slots if prev is not None else 0
        if new > 0:
            for q in range((count - new) // ROW_CHUNK, (count - 1) // ROW_CHUNK + 1):
                a, b = max(q * ROW_CHUNK, oldest), min((q + 1) * ROW_CHUNK, count)
                slot = q % self.row_slots
                out.append(ChangelogRecord(p, _part_key(k, "w", slot), _ROWS.pack(q, a, rows.shape[1]) + rows[a - oldest : b - oldest].tobytes()))
                rows_hi = max(rows_hi, slot + 1)
        meta = dict(state)
        meta["window"] = {x: v for x, v in win.items() if x != "rows"}
        thr = state.get("threshold")
        seen = prev.seen if prev is not None else 0
        chunks_hi = prev.chunk_slots if prev is not None else 0
        if isinstance(thr, dict) and isinstance(thr.get("history"), np.ndarray) and "seen" in thr:
            hist = np.asarray(thr["history"], dtype=np.float64)
            seen_now, n = int(thr["seen"]), int(hist.size)
            first = seen_now - n  # absolute index of hist[0]
            lo = max(first, seen if (same_life and seen <= seen_now) else first)
            if lo < seen_now:
                for q in range(lo // HISTORY_CHUNK, (seen_now - 1) // HISTORY_CHUNK + 1):
                    a, b = max(q * HISTORY_CHUNK, first), min((q + 1) * HISTORY_CHUNK, seen_now)
                    slot = q % self.chunk_slots
                    out.append(ChangelogRecord(p, _part_key(k, "h", slot), _encode_chunk(q, a, hist[a - first : b - first])))
                    chunks_hi = max(chunks_hi, slot + 1)
            meta["threshold"] = {**{x: v for x, v in thr.items() if x != "history"}, "history_len": n}
            seen = seen_now
        alert = orjson.dumps(meta.pop("alert", None), option=orjson.OPT_SERIALIZE_NUMPY)
        if alert != (prev.alert if prev is not None else b"null"):  # what the topic holds (no record = no alert)
            out.append(ChangelogRecord(p, k + _SEP + "a", alert))
        out.append(ChangelogRecord(p, k, encode_state(meta, applied)))
        # orjson's small outputs keep a ~4 KB buffer: keep a shared constant or an exact-size copy
        kept = _NULL if alert == _NULL else bytes(memoryview(alert))
        self._live[(p, k)] = _Written(count, seen, rows_hi, chunks_hi, kept)

    def _tombstones(self, out: list[ChangelogRecord], p: int, k: str, w: _Written) -> None:
        out.append(ChangelogRecord(p, k, None))  # the meta first: without it the parts are never restored
        if w.alert != b"null":
            out.append(ChangelogRecord(p, k + _SEP + "a", None))
        out.extend(ChangelogRecord(p, _part_key(k, "w", s), None) for s in range(w.row_slots))
        out.extend(ChangelogRecord(p, _part_key(k, "h", s), None) for s in range(w.chunk_slots))

    def discard_pending(self, partitions: Iterable[int] | None = None) -> None:
        """Forget unwritten changes (of these partitions, or all): after an abort or a loss."""
        if partitions is None:
            self._dirty.clear()
            self._writing.clear()
            return
        drop = set(partitions)
        for pending in (self._dirty, self._writing):
            for e in [e for e in pending if e[0] in drop]:
                del pending[e]

    def forget_partitions(self, partitions: Iterable[int]) -> None:
        drop = set(partitions)
        self.discard_pending(drop)
        self._live = {e: w for e, w in self._live.items() if e[0] not in drop}
        self._fences = {e: f for e, f in self._fences.items() if e[0] not in drop}

    def restored(self, partition: int, key: str, applied: dict[str, int], committed: dict[str, int],
                 state: dict[str, Any] | None = None) -> None:
        """An entity's state was installed from the changelog; fence the events it already holds
        beyond the committed input offsets ({topic: next offset to read} of this partition). The
        next write of the entity is whole (earlier lives may have left other keys: all are
        tombstoned when it goes)."""
        count = int(state["window"]["count"]) if state is not None else 0
        # alert b"?": what the topic holds for it is not known here, so the next write includes it
        self._live[(partition, key)] = _Written(count, 0, self.row_slots, self.chunk_slots, b"?", valid=False)
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
        return batch.take(idx)


# ---- reading records back into entity states ------------------------------------------------


class StateAssembler:
    """Collects one changelog partition's records in offset order (the newest record per key wins,
    as compaction keeps it) and rebuilds each entity's state: the meta record, the rows at the last
    min(count, W) positions, the history entries [seen - history_len, seen)."""

    def __init__(self, window: int) -> None:
        self.window = int(window)
        self._meta: dict[str, bytes | None] = {}
        self._rows: dict[str, dict[int, bytes | None]] = {}
        self._chunks: dict[str, dict[int, bytes | None]] = {}
        self._alerts: dict[str, bytes | None] = {}
        self.records = 0

    def add(self, key: str, value: bytes | None) -> None:
        self.records += 1
        entity, kind, slot = _split_key(key)
        if kind is None:
            self._meta[entity] = value
        elif kind == "a":
            self._alerts[entity] = value
        else:
            (self._rows if kind == "w" else self._chunks).setdefault(entity, {})[slot] = value

    def __len__(self) -> int:
        return sum(v is not None for v in self._meta.values())

    def states(self) -> Iterator[tuple[str, dict[str, Any] | None, dict[str, int], str | None]]:
        """(entity, state, applied, None) per live entity, or (entity, None, {}, why) when its
        records do not make up a state."""
        for entity, value in self._meta.items():
            if value is None:
                continue
            try:
                state, applied = decode_state(value)
                self._assemble(entity, state)
            except (ChangelogError, ValueError, KeyError, TypeError) as e:
                yield entity, None, {}, str(e)
                continue
            yield entity, state, applied, None

    def _assemble(self, entity: str, state: dict[str, Any]) -> None:
        if "alert" not in state:
            a = self._alerts.get(entity)
            state["alert"] = None if a is None else orjson.loads(a)
        win = state["window"]
        if "rows" not in win:  # (a whole-state record of the earlier layout carries its rows itself)
            count = int(win["count"])
            chunks = {}
            for v in self._rows.get(entity, {}).values():
                if v is not None:
                    q, first, f = _ROWS.unpack_from(v)
                    chunks[q] = (first, np.frombuffer(v, dtype=np.float32, offset=_ROWS.size).reshape(-1, f))
            k = min(count, self.window)
            if k == 0:
                win["rows"] = np.zeros((0, 0), dtype=np.float32)
            else:
                width = next(iter(chunks.values()))[1].shape[1] if chunks else 0
                win["rows"] = _join_chunks(chunks, count - k, count, ROW_CHUNK, np.empty((k, width), dtype=np.float32), "window row")
        thr = state.get("threshold")
        if isinstance(thr, dict) and "history_len" in thr:
            n, seen = int(thr.pop("history_len")), int(thr["seen"])
            chunks = {}
            for v in self._chunks.get(entity, {}).values():
                if v is not None:
                    q, first, width = _CHUNK.unpack_from(v)
                    chunks[q] = (first, np.frombuffer(v, dtype=np.float32 if width == 4 else np.float64, offset=_CHUNK.size))
            thr["history"] = _join_chunks(chunks, seen - n, seen, HISTORY_CHUNK, np.empty(n, dtype=np.float64), "threshold history entry")


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
                return topic
            except KafkaException as e:
                if e.args[0].code() != 36:
                    raise ChangelogError(
                        f"the state changelog topic {topic} does not exist and could not be created ({e.args[0].str()});"
                        f" create it compacted with {partitions} partitions, or set processing.changelog = false."
                    ) from None
            # TOPIC_ALREADY_EXISTS: another member was quicker, or the metadata we read was stale
            # (a topic created a moment ago); check the one that exists like any other.
            meta = admin.list_topics(topic=topic, timeout=timeout)
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
    per `step`, assembling entity states as records arrive (`StateAssembler`). Main thread only."""

    def __init__(self, settings: Any, topic: str, window: int) -> None:
        from confluent_kafka import Consumer

        from stream_detector.service.kafka_io import CONSUMER_DEFAULTS

        self.topic = topic
        self.window = int(window)
        conf = {
            "bootstrap.servers": settings.kafka.bootstrap_servers,
            **settings.kafka.client_settings(),
            "group.id": f"{settings.kafka.group_id}-restore",  # required by the client; never joined
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
            "queued.max.messages.kbytes": 16_384,
            # a restore reads whole partitions: the service consumer's fetch backoff (kafka_io.py)
            "fetch.queue.backoff.ms": CONSUMER_DEFAULTS["fetch.queue.backoff.ms"],
        }
        self._consumer = Consumer(conf)
        self._latest: dict[int, StateAssembler] = {}
        self.records_read = 0

    @property
    def busy(self) -> bool:
        return bool(self._latest)

    def restoring(self, partition: int) -> bool:
        return partition in self._latest

    def partitions(self) -> list[int]:
        """The changelog partitions still being read."""
        return sorted(self._latest)

    def start(self, partitions: Iterable[int]) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        new = sorted({int(p) for p in partitions} - set(self._latest))
        if new:
            for p in new:
                self._latest[p] = StateAssembler(self.window)
            self._consumer.incremental_assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in new])

    def cancel(self, partitions: Iterable[int]) -> None:
        from confluent_kafka import TopicPartition

        gone = [p for p in partitions if p in self._latest]
        for p in gone:
            del self._latest[p]
        if gone:
            self._consumer.incremental_unassign([TopicPartition(self.topic, p) for p in gone])

    def step(self, max_records: int, timeout: float = 0.0) -> dict[int, StateAssembler]:
        """Read up to `max_records`; returns {partition: its records assembled} for the partitions
        that reached their end in this step."""
        from confluent_kafka import KafkaError, TopicPartition

        if not self._latest:
            return {}
        done: dict[int, StateAssembler] = {}
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
                latest.add(key.decode("utf-8"), m.value())
                self.records_read += 1
        if done:
            self._consumer.incremental_unassign([TopicPartition(self.topic, p) for p in done])
        return done

    def close(self) -> None:
        self._consumer.close()
