"""Entity state that moves with its partition: a compacted changelog topic keyed by entity.

Written at every checkpoint for the entities that changed since the previous one (`StateTracker`),
inside the Kafka transaction in exactly-once mode, before the offset commit in at-least-once mode.
Read back for newly assigned partitions by `Restorer` (its own consumer, `read_committed`, in
bounded chunks while the main consumer keeps polling). How one entity's state is laid out as
records (meta + window row chunks + history chunks + alert) and rebuilt from them is
changelog_format.py; this module decides which entities to write when, fences restored state, and
talks to the topic.

At-least-once: a crash between writing the changelog and committing the offsets leaves state that
is *ahead* of the committed offsets. The `applied` offsets fence it: after a restore, events of an
entity at or below its applied offset are skipped (they are already in its state, and their alerts
were acknowledged before the changelog was written), so the state after re-processing is the state
the entity would have had without the crash.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from stream_detector.core.events import EventBatch
from stream_detector.ingest.kafka_config import admin_config, restorer_config
from stream_detector.service.changelog_format import (
    HISTORY_CHUNK,
    ROW_CHUNK,
    ChangelogError,
    ChangelogRecord,
    StateAssembler,
    Written,
    decode_state,
    encode_state,
    history_slots,
    tombstones,
    write_entity,
)
from stream_detector.service.compacted_topic import TopicNotCreated, ensure_compacted

# The record layout's names stay importable from here (the changelog's public surface).
__all__ = [
    "HISTORY_CHUNK",
    "ROW_CHUNK",
    "ChangelogError",
    "ChangelogRecord",
    "Restorer",
    "StateAssembler",
    "StateTracker",
    "decode_state",
    "encode_state",
    "ensure_changelog_topic",
    "history_slots",
]

log = logging.getLogger(__name__)


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
        self._live: dict[tuple[int, str], Written] = {}
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

    def snapshot(
        self, core: Any, owned: Iterable[int], emit: Callable[[ChangelogRecord], None] | None = None
    ) -> list[ChangelogRecord]:
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
        gone: list[ChangelogRecord] = []
        for e in [e for e in self._live if e not in tracked]:
            held = self._live.pop(e)
            if e[0] in owned:
                tombstones(gone, e[0], e[1], held)
        for r in gone:
            emit(r)

    def write_some(
        self,
        core: Any,
        emit: Callable[[ChangelogRecord], None],
        budget_s: float | None,
        max_entities: int | None = None,
    ) -> bool:
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
                self._live[e] = write_entity(
                    out, e[0], e[1], state, applied, noted, self._live.get(e), self.row_slots, self.chunk_slots
                )
            if deadline is not None and time.perf_counter() >= deadline:
                break
        return not writing

    @property
    def writing(self) -> int:
        """Entities of the checkpoint begun that are not written yet."""
        return len(self._writing)

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

    def restored(
        self,
        partition: int,
        key: str,
        applied: dict[str, int],
        committed: dict[str, int],
        state: dict[str, Any] | None = None,
    ) -> None:
        """An entity's state was installed from the changelog; fence the events it already holds
        beyond the committed input offsets ({topic: next offset to read} of this partition). The
        next write of the entity is whole (earlier lives may have left other keys: all are
        tombstoned when it goes)."""
        count = int(state["window"]["count"]) if state is not None else 0
        # alert b"?": what the topic holds for it is not known here, so the next write includes it
        self._live[(partition, key)] = Written(count, 0, self.row_slots, self.chunk_slots, b"?", valid=False)
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


# ---- the topic and reading it back ------------------------------------------------------------


def ensure_changelog_topic(settings: Any, partitions: int) -> str:
    """The changelog topic, created (compacted, `partitions` partitions) if missing; ChangelogError
    with one sentence if it exists with too few partitions or without compaction."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    topic = settings.processing.changelog_topic_for(settings.kafka.group_id)
    admin = AdminClient(admin_config(settings))
    try:
        found = ensure_compacted(admin, topic, partitions, settings.kafka.timeout_s)
    except TopicNotCreated as e:
        raise ChangelogError(
            f"the state changelog topic {topic} does not exist and could not be created ({e});"
            f" create it compacted with {partitions} partitions, or set processing.changelog = false."
        ) from None
    except KafkaException as e:
        raise ChangelogError(f"checking the state changelog topic {topic} failed ({e.args[0].str()}).") from None
    if found.created:
        log.info("created the state changelog topic %s (%d partitions, compacted)", topic, partitions)
        return topic
    if found.partitions < partitions:
        raise ChangelogError(
            f"the state changelog topic {topic} has {found.partitions} partitions, but the input has {partitions}; "
            "it needs at least as many."
        )
    if "compact" not in found.cleanup_policy:
        raise ChangelogError(
            f"the state changelog topic {topic} has cleanup.policy={found.cleanup_policy}; it must be compacted "
            "(cleanup.policy=compact)."
        )
    return topic


class Restorer:
    """Reads changelog partitions from the beginning up to their end (the last stable offset:
    records of open or aborted transactions are never seen) with its own consumer, a bounded chunk
    per `step`, assembling entity states as records arrive (`StateAssembler`). Main thread only."""

    def __init__(self, settings: Any, topic: str, window: int) -> None:
        from confluent_kafka import Consumer

        self.topic = topic
        self.window = int(window)
        # kafka.client, secret files and kafka.consumer (under the consumer's merge guard), then what
        # the restorer works by: read_committed, partition EOF, its own never-joined group id
        conf = restorer_config(settings)
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
            latest = None if p is None else self._latest.get(p)
            if p is None or latest is None:
                continue  # cancelled meanwhile, or a client-wide error (no partition)
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
