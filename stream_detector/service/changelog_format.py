"""The changelog's record layout: how an entity's state becomes Kafka records and back, no Kafka.

An entity's detection state (`DetectorCore.state_of`: window rows, threshold, alert lifecycle) is
kept as several records (layout below): a small meta record keyed by the entity, which also holds
the input offsets the state reflects (`applied`: {topic: offset of the last event of this entity
applied}), one record per window ring slot and one per chunk of the rolling-quantile history, so a
checkpoint writes what is new since the previous one: a cost per new event, not per window.
Record partition = the input partition number; tombstones (value None) remove an entity.

    write_entity(out, partition, key, state, applied, noted, prev, row_slots, chunk_slots) -> Written
    tombstones(out, partition, key, written)
    StateAssembler(window).add(key, value) ... .states() -> (entity, state, applied, why)

Which entities to write when, and the fences of restored state, are `changelog.StateTracker`'s;
reading the topic back is `changelog.Restorer`'s.

Meta encoding (measured in docs/reliability.md): 4-byte magic, a little-endian uint32 header length, an
orjson header in which every numpy array is replaced by a reference, then the arrays' raw bytes.
float64 arrays whose values are all float32-exact (scores are float32) are stored as float32 and
widened again on decoding, so a round trip is bit-exact.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import orjson

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


def _join_chunks(
    chunks: dict[int, tuple[int, np.ndarray]], start: int, stop: int, size: int, out: np.ndarray, item: str
) -> np.ndarray:
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


# ---- records of one entity ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChangelogRecord:
    partition: int
    key: str
    value: bytes | None  # None = tombstone


@dataclass(slots=True)
class Written:
    """What the changelog holds for a live entity, so the next checkpoint writes only what is new."""

    count: int  # window count covered by the written rows
    seen: int  # history entries covered by the written chunks
    row_slots: int  # row keys that may exist (tombstoned when the entity goes)
    chunk_slots: int
    alert: bytes = b"null"  # the alert record as last written (none written = no alert)
    valid: bool = True  # False: rewrite everything next time (model swap, restore)


class RecordOut(Protocol):
    """Where `write_entity` puts its records: a list, or anything with `append` (changelog.py's emitter)."""

    def append(self, record: ChangelogRecord, /) -> None: ...


def write_entity(
    out: RecordOut,
    p: int,
    k: str,
    state: dict[str, Any],
    applied: dict[str, int],
    noted: int,
    prev: Written | None,
    row_slots: int,
    chunk_slots: int,
) -> Written:
    """Append the records of entity (p, k) to `out`: its new window rows and touched history chunks,
    its alert record if it changed, then its meta record. `prev`: what the changelog holds of it
    (None: nothing known, write it whole); `noted`: events applied to it since `prev` was written.
    Returns what the changelog holds of it once these records are written."""
    win = state["window"]
    count, rows = int(win["count"]), win["rows"]
    # Incremental only when the count moved by exactly the events noted: otherwise the entity was
    # evicted and came back (a new life), or a core feeds it other rows (log stage): write it whole.
    same_life = prev is not None and prev.valid and count == prev.count + noted
    new = min(count - prev.count, rows.shape[0]) if same_life and prev is not None else rows.shape[0]
    oldest = count - rows.shape[0]  # position of rows[0]
    rows_hi = prev.row_slots if prev is not None else 0
    if new > 0:
        for q in range((count - new) // ROW_CHUNK, (count - 1) // ROW_CHUNK + 1):
            a, b = max(q * ROW_CHUNK, oldest), min((q + 1) * ROW_CHUNK, count)
            slot = q % row_slots
            out.append(
                ChangelogRecord(
                    p,
                    _part_key(k, "w", slot),
                    _ROWS.pack(q, a, rows.shape[1]) + rows[a - oldest : b - oldest].tobytes(),
                )
            )
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
                slot = q % chunk_slots
                out.append(
                    ChangelogRecord(p, _part_key(k, "h", slot), _encode_chunk(q, a, hist[a - first : b - first]))
                )
                chunks_hi = max(chunks_hi, slot + 1)
        meta["threshold"] = {**{x: v for x, v in thr.items() if x != "history"}, "history_len": n}
        seen = seen_now
    alert = orjson.dumps(meta.pop("alert", None), option=orjson.OPT_SERIALIZE_NUMPY)
    if alert != (prev.alert if prev is not None else b"null"):  # what the topic holds (no record = no alert)
        out.append(ChangelogRecord(p, k + _SEP + "a", alert))
    out.append(ChangelogRecord(p, k, encode_state(meta, applied)))
    # orjson's small outputs keep a ~4 KB buffer: keep a shared constant or an exact-size copy
    kept = _NULL if alert == _NULL else bytes(memoryview(alert))
    return Written(count, seen, rows_hi, chunks_hi, kept)


def tombstones(out: list[ChangelogRecord], p: int, k: str, w: Written) -> None:
    """Append a tombstone for every key entity (p, k) may have in the changelog."""
    out.append(ChangelogRecord(p, k, None))  # the meta first: without it the parts are never restored
    if w.alert != b"null":
        out.append(ChangelogRecord(p, k + _SEP + "a", None))
    out.extend(ChangelogRecord(p, _part_key(k, "w", s), None) for s in range(w.row_slots))
    out.extend(ChangelogRecord(p, _part_key(k, "h", s), None) for s in range(w.chunk_slots))


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
                win["rows"] = _join_chunks(
                    chunks, count - k, count, ROW_CHUNK, np.empty((k, width), dtype=np.float32), "window row"
                )
        thr = state.get("threshold")
        if isinstance(thr, dict) and "history_len" in thr:
            n, seen = int(thr.pop("history_len")), int(thr["seen"])
            chunks = {}
            for v in self._chunks.get(entity, {}).values():
                if v is not None:
                    q, first, width = _CHUNK.unpack_from(v)
                    chunks[q] = (
                        first,
                        np.frombuffer(v, dtype=np.float32 if width == 4 else np.float64, offset=_CHUNK.size),
                    )
            thr["history"] = _join_chunks(
                chunks, seen - n, seen, HISTORY_CHUNK, np.empty(n, dtype=np.float64), "threshold history entry"
            )
