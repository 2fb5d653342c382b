"""In-memory stand-ins for the service's Kafka side (no broker), for the unit tests of the offset
and checkpoint rules (tests/test_checkpoint.py) and of the partition owner (tests/test_partitions.py).

- `MemorySink`: a producer whose records stay unacknowledged until the test says the broker
  acknowledged (`ack`) or rejected (`reject`) them; transactions kept apart until committed.
- `MemorySource`: a consumer's offset side (store, commit, assignment) and its partition side
  (pause, resume, seek, rewind, committed offsets), every call logged in order.
- `MemoryRestorer`: the changelog reader over records the test wrote, finished in one `step`.
- `FakeCore`: a detection core that counts events per (partition, entity), with the state shape
  the changelog writes (`state_of`) and reads back (`restore`).

They implement the narrow interfaces of stream_detector/service/checkpoint.py and partitions.py,
nothing more, and check nothing themselves: the tests decide what must hold. One `log` list can be
shared by all of them, so a test can assert the order of what happened (e.g. "commit" before
"drop").
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from stream_detector.core.events import EventBatch
from stream_detector.service.changelog import StateAssembler
from stream_detector.service.kafka_io import DeliveryError

TP = tuple[str, int]


class MemoryTicket:
    def __init__(self) -> None:
        self.pending = 0
        self.failed = False

    @property
    def done(self) -> bool:
        return self.pending == 0


class Record:
    """A produced record: kind (alert / dead-letter / changelog), partition, key, value, ticket."""

    def __init__(self, kind: str, partition: int | None, key: str, value: Any, ticket: MemoryTicket | None) -> None:
        self.kind, self.partition, self.key, self.value, self.ticket = kind, partition, key, value, ticket
        self.acked = False

    def __repr__(self) -> str:
        return f"Record({self.kind}, {self.partition}, {self.key!r}, acked={self.acked})"


class MemorySink:
    def __init__(self, log: list | None = None, transactional: bool = False) -> None:
        self.log = log if log is not None else []
        self.transactional = transactional
        self.records: list[Record] = []  # everything produced (and not aborted), in order
        self.committed_transactions: list[tuple[list[Record], dict[TP, int]]] = []
        self._txn: list[Record] = []
        self._first_error: str | None = None
        self.aborts = 0

    # -- producing -------------------------------------------------------------------------------
    def ticket(self) -> MemoryTicket:
        return MemoryTicket()

    def _produce(self, kind: str, partition: int | None, key: str, value: Any, ticket: MemoryTicket | None) -> None:
        r = Record(kind, partition, key, value, ticket)
        if ticket is not None:
            ticket.pending += 1
        self.records.append(r)
        if self.transactional:
            self._txn.append(r)
        self.log.append(("produce", kind, key, r))

    def alert(self, key: str, payload: Any, ticket: MemoryTicket | None = None) -> None:
        self._produce("alert", None, key, payload, ticket)

    def dead_letter(self, d: Any, ticket: MemoryTicket | None = None) -> None:
        self._produce("dead-letter", None, str(d), d, ticket)

    def changelog(self, partition: int, key: str, value: bytes | None, ticket: MemoryTicket | None = None) -> None:
        self._produce("changelog", partition, key, value, ticket)

    def changelog_records(self, records: Iterable[Any], ticket: MemoryTicket) -> int:
        size = 0
        for r in records:
            self._produce("changelog", r.partition, r.key, r.value, ticket)
            size += len(r.value) if r.value is not None else 0
        return size

    # -- the broker's answers (the test decides) -------------------------------------------------
    def unacked(self, kind: str | None = None) -> list[Record]:
        return [r for r in self.records if not r.acked and (kind is None or r.kind == kind)]

    def ack(self, records: Iterable[Record] | None = None) -> None:
        """The broker acknowledged these records (default: all so far)."""
        for r in list(self.unacked() if records is None else records):
            if r.acked:
                continue
            r.acked = True
            if r.ticket is not None:
                r.ticket.pending -= 1
            self.log.append(("ack", r.kind, r.key))

    def reject(self, record: Record) -> None:
        """The broker gave up on this record (delivery failed)."""
        record.acked = True  # answered, not stored
        if record.ticket is not None:
            record.ticket.pending -= 1
            record.ticket.failed = True
        if self._first_error is None:
            self._first_error = f"delivery of {record.kind} {record.key} failed"
        self.log.append(("reject", record.kind, record.key))

    # -- what the checkpointer calls ---------------------------------------------------------------
    def poll(self, timeout: float = 0.0) -> None:
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self._first_error is not None:
            raise DeliveryError(self._first_error + ".")

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything is acknowledged: here the broker answers at once."""
        self.ack()
        self.raise_if_failed()
        self.log.append(("flush",))

    def commit_transaction(self, offsets: dict[TP, int], group_metadata: Any, timeout: float | None = None) -> None:
        self.ack(self._txn)
        self.committed_transactions.append((self._txn, dict(offsets)))
        self.log.append(("commit-transaction", dict(offsets)))
        self._txn = []

    def abort_transaction(self) -> None:
        aborted = set(map(id, self._txn))
        self.records = [r for r in self.records if id(r) not in aborted]
        self._txn = []
        self._first_error = None
        self.aborts += 1
        self.log.append(("abort-transaction",))


class MemorySource:
    def __init__(self, assignment: Iterable[TP] = (), log: list | None = None) -> None:
        self.log = log if log is not None else []
        self.assignment: set[TP] = set(assignment)
        self.stored: dict[TP, int] = {}
        self.committed: dict[TP, int] = {}
        self.paused: set[TP] = set()
        self.seeks: list[tuple[TP, int]] = []

    # -- offsets -------------------------------------------------------------------------------
    def store(self, positions: dict[TP, int]) -> None:
        for tp, o in positions.items():
            if tp in self.assignment:  # as KafkaSource: positions of partitions not assigned are ignored
                self.stored[tp] = o
                self.log.append(("store", tp, o))

    def commit(self, positions: dict[TP, int] | None = None) -> bool:
        what = dict(self.stored) if positions is None else dict(positions)
        self.committed.update(what)
        self.log.append(("commit", what))
        return True

    def group_metadata(self) -> Any:
        return "group-metadata"

    # -- partitions ------------------------------------------------------------------------------
    def pause(self, tps: Iterable[TP]) -> None:
        tps = {tp for tp in tps if tp in self.assignment}
        self.paused |= tps
        self.log.append(("pause", tps))

    def resume(self, tps: Iterable[TP]) -> None:
        tps = {tp for tp in tps if tp in self.assignment}
        self.paused -= tps
        self.log.append(("resume", tps))

    def seek(self, tp: TP, offset: int) -> None:
        self.seeks.append((tp, offset))
        self.log.append(("seek", tp, offset))

    def committed_offsets(self, tps: Iterable[TP], timeout: float = 30.0) -> dict[TP, int]:
        return {tp: self.committed.get(tp, -1001) for tp in tps}

    def rewind(self, tps: Iterable[TP]) -> dict[TP, int]:
        back = self.committed_offsets([tp for tp in tps if tp in self.assignment])
        for tp in back:
            self.stored.pop(tp, None)
        self.log.append(("rewind", back))
        return back

    # -- the group ---------------------------------------------------------------------------------
    def revoke(self, tps: Iterable[TP]) -> None:
        """What KafkaSource does after the revoke/lost callback returned."""
        for tp in tps:
            self.assignment.discard(tp)
            self.stored.pop(tp, None)


class MemoryRestorer:
    """The changelog reader over `topic_records` ({partition: [(key, value)]}); a partition started
    is complete at the next `step`."""

    def __init__(self, topic_records: dict[int, list[tuple[str, bytes | None]]], window: int, log: list | None = None) -> None:
        self.topic = "memory-changelog"
        self.window = window
        self.log = log if log is not None else []
        self.records = topic_records
        self._reading: set[int] = set()

    @property
    def busy(self) -> bool:
        return bool(self._reading)

    def restoring(self, partition: int) -> bool:
        return partition in self._reading

    def partitions(self) -> list[int]:
        return sorted(self._reading)

    def start(self, partitions: Iterable[int]) -> None:
        new = set(partitions) - self._reading
        self._reading |= new
        if new:
            self.log.append(("restore-start", sorted(new)))

    def cancel(self, partitions: Iterable[int]) -> None:
        gone = self._reading & set(partitions)
        self._reading -= gone
        if gone:
            self.log.append(("restore-cancel", sorted(gone)))

    def step(self, max_records: int, timeout: float = 0.0) -> dict[int, StateAssembler]:
        done = {}
        for p in sorted(self._reading):
            a = StateAssembler(self.window)
            for key, value in self.records.get(p, []):
                a.add(key, value)
            done[p] = a
        self._reading.clear()
        return done


class FakeCore:
    """Counts events per (partition, entity); its state has the shape the changelog writes."""

    def __init__(self, window: int = 4, features: int = 2, log: list | None = None) -> None:
        self.window, self.features = window, features
        self.log = log if log is not None else []
        self.counts: dict[tuple[int, str], int] = {}

    def process(self, batch: EventBatch) -> None:
        for p, k in zip(batch.partition.tolist(), batch.keys):
            self.counts[(p, k)] = self.counts.get((p, k), 0) + 1

    def entities(self) -> list[tuple[int, str]]:
        return list(self.counts)

    def state_of(self, partition: int, key: str) -> dict[str, Any] | None:
        c = self.counts.get((partition, key))
        if c is None:
            return None
        n = min(c, self.window)
        rows = (np.arange(c - n, c, dtype=np.float32)[:, None] * np.ones(self.features, dtype=np.float32))
        return {"window": {"count": c, "rows": rows}, "threshold": {"seen": 0}, "alert": None, "model_version": "v1"}

    def restore(self, partition: int, key: str, state: dict[str, Any]) -> None:
        self.counts[(partition, key)] = int(state["window"]["count"])

    def drop_partitions(self, partitions: Iterable[int]) -> int:
        drop = set(partitions)
        gone = [e for e in self.counts if e[0] in drop]
        for e in gone:
            del self.counts[e]
        self.log.append(("drop", sorted(drop)))
        return len(gone)


def events(topic: str, partition: int, keys_offsets: list[tuple[str, int]]) -> EventBatch:
    """A batch of events of one partition: [(entity, offset)]."""
    keys = [k for k, _ in keys_offsets]
    return EventBatch.build(keys, np.zeros((len(keys), 2), dtype=np.float32), None, topic, partition, [o for _, o in keys_offsets])
