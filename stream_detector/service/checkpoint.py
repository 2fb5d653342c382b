"""`Checkpointer`: when input offsets may be stored and committed, and how state and offsets are
checkpointed together (STYLE.md "offsets follow delivery"; docs/reliability.md "Checkpoints").

The rules it keeps, whatever the loop around it does:
- A batch's offsets are stored only after every alert and dead letter of that batch was
  acknowledged by the broker (a delivery ticket per batch), and batches are stored in the order
  they were submitted: a later batch never overtakes an earlier one, so stored offsets only move
  forward. A batch with a failed record stops everything: its offsets are never stored.
- At-least-once with a changelog, periodic checkpoints are sliced: `begin_sliced()` asks for one,
  the next pause between batches begins it (noting the offsets of every batch submitted so far)
  and each pause writes some of its entities (`write_slice`), paced over half the commit interval.
  A state record made after batch n was processed is held until batch n is stored (restored state
  fences the events it holds, so it must never hold an event whose alert could still be lost). The
  offsets of the begin are committed once every record is produced and acknowledged and every
  batch submitted before the begin is stored.
- A whole checkpoint (`checkpoint()`; exactly-once always; on revoke and at shutdown): with the
  in-flight batch finished by the caller, flush (at-least-once), write every changed entity, then
  commit: the stored offsets (at-least-once) or the transaction with its offsets (exactly-once).
- Offsets of partitions that went away (`forget`) are never stored, committed or put in a
  transaction afterwards, and no state record of theirs is produced.

It talks to a source and a sink through the narrow interfaces below (`OffsetSource`,
`RecordSink`), so these rules are tested with in-memory fakes (tests/test_checkpoint.py) as well
as through the broker. Main thread only; the core must be idle when `write_slice`/`checkpoint`
run (the loop calls them between batches).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from stream_detector.service.changelog import ChangelogRecord, StateTracker
from stream_detector.service.kafka_io import KafkaIOError, TransactionAborted
from stream_detector.service.stats import RunStats

log = logging.getLogger(__name__)

TP = tuple[str, int]  # (topic, partition)

CHECKPOINT_SLICE_S = 0.005  # changelog writing per pause between batches (sliced checkpoints)
CHECKPOINT_SPREAD = 0.5  # a sliced checkpoint's entities are written evenly over this share of commit_interval_s

# Debug switch for the fault-injection suite (tests/test_reliability_*.py), not a setting.
FAULT_KILL_BEFORE_COMMIT = "STREAM_DETECTOR_FAULT_KILL_BEFORE_COMMIT"


class Ticket(Protocol):
    """Counts the records produced with it until the broker acknowledged them (kafka_sink.DeliveryTicket)."""

    pending: int
    failed: bool

    @property
    def done(self) -> bool: ...


class OffsetSource(Protocol):
    """What the checkpointer needs of the consumer (kafka_io.KafkaSource)."""

    assignment: set[TP]

    def store(self, positions: dict[TP, int]) -> None: ...

    def commit(self, positions: dict[TP, int] | None = None) -> bool: ...

    def group_metadata(self) -> Any: ...


TicketT = TypeVar("TicketT", bound=Ticket)


class RecordSink(Protocol[TicketT]):
    """What the checkpointer needs of the producer (kafka_sink.KafkaSink). A sink takes back only the
    tickets it hands out (its own ticket type)."""

    def ticket(self) -> TicketT: ...

    def poll(self, timeout: float = 0.0) -> None: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def raise_if_failed(self) -> None: ...

    def changelog(self, partition: int, key: str, value: bytes | None, ticket: TicketT | None = None) -> None: ...

    def changelog_records(self, records: Sequence[ChangelogRecord], ticket: TicketT) -> int: ...

    def commit_transaction(self, offsets: dict[TP, int], group_metadata: Any, timeout: float | None = None) -> None: ...

    def abort_transaction(self) -> None: ...


def paced_quota(entities: int, left: int, elapsed_s: float, spread_s: float) -> int:
    """How many more of a checkpoint's `entities` may be written now, `elapsed_s` after it began,
    `left` of them still unwritten, so that they go out evenly over `spread_s`: the records (and
    the broker's work to store them) come as a steady trickle, not as a burst that delays the
    batches behind it."""
    if spread_s <= 0 or elapsed_s >= spread_s:
        return left
    due = -(-entities * elapsed_s // spread_s)  # ceil: the first call after begin writes at least one
    return max(0, min(left, int(due) - (entities - left)))


@dataclass
class _Delivered:
    """At-least-once: a delivered batch whose offsets wait for its records' acknowledgement."""

    seq: int
    positions: dict[TP, int]  # next offset per partition
    ticket: Ticket | None


@dataclass
class _SlicedCheckpoint:
    positions: dict[TP, int]  # next offset per partition as of `begin`
    seq: int  # the last batch submitted before `begin` (-1: not begun yet)
    ticket: Ticket  # its changelog records
    held: deque = field(default_factory=deque)  # (last batch their state includes, records of one slice), oldest first
    written: bool = False
    begun_at: float = 0.0  # clock() at `begin`
    entities: int = 0  # entities to write, as of `begin`


class Checkpointer:
    """The offset, checkpoint and transaction rules of one run (module docstring).

    `active()` gives the partitions whose state may be written and whose offsets may be committed
    now: assigned and not being restored (partitions.PartitionOwner.active). `tracker`/`core`:
    the changelog's bookkeeping and the core whose state it writes (None: no changelog)."""

    def __init__(
        self,
        source: OffsetSource,
        sink: RecordSink[Any],
        *,
        exactly_once: bool,
        tracker: StateTracker | None,
        core: Any,
        active: Callable[[], set[TP]],
        stats: RunStats,
        metrics: Any,
        commit_interval_s: float,
        kill_at: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source, self.sink = source, sink
        self.exactly_once = exactly_once
        self.tracker, self.core = tracker, core
        self._active = active
        self.stats, self.metrics = stats, metrics
        self.commit_interval_s = commit_interval_s
        self._clock = clock
        self.submitted_seq = 0  # the last batch submitted ...
        self.stored_seq = 0  # ... and the last one whose offsets were stored
        self.committed_at = 0.0  # clock() of the last commit (0: none yet)
        self._submitted_positions: dict[TP, int] = {}  # next offset per partition, submitted batches
        self._unstored: deque[_Delivered] = deque()  # at-least-once: delivered, stored once acknowledged
        self._sliced: _SlicedCheckpoint | None = None  # at-least-once checkpoint in progress
        self._txn_positions: dict[TP, int] = {}  # exactly-once: offsets of the open transaction
        # Fault injection for the reliability suite: die by SIGKILL at the N-th checkpoint that
        # follows produced alerts, after they reached the broker and before the commit.
        self._kill_at = kill_at
        self._checkpoints_with_alerts = 0
        self._alerts_since_checkpoint = 0

    # ------------------------------------------------------------------ batches
    @property
    def slices(self) -> bool:
        """Periodic checkpoints are sliced (at-least-once with a changelog), else whole."""
        return not self.exactly_once and self.tracker is not None

    def ticket(self) -> Ticket | None:
        """The ticket a batch's alerts and dead letters are produced with (None in exactly-once
        mode: the transaction holds them)."""
        return None if self.exactly_once else self.sink.ticket()

    def submitted(self, positions: dict[TP, int]) -> int:
        """A batch (next offset per partition of its messages) goes to the core; returns its number."""
        self.submitted_seq += 1
        self._submitted_positions.update(positions)
        return self.submitted_seq

    def delivered(self, seq: int, positions: dict[TP, int], ticket: Ticket | None, alerts: int = 0) -> None:
        """Batch `seq`'s alerts and dead letters were produced (with `ticket`). At-least-once: its
        offsets are stored by `advance` once the ticket is done; exactly-once: they join the open
        transaction."""
        self._alerts_since_checkpoint += alerts
        if self.exactly_once:
            # Delivered and committed together with the offsets at the next checkpoint.
            assigned = self.source.assignment
            self._txn_positions.update({tp: o for tp, o in positions.items() if tp in assigned})
            return
        self._unstored.append(_Delivered(seq, positions, ticket))
        try:
            self.sink.poll(0)
        except KafkaIOError:
            self.metrics.delivery_failed()
            raise

    def advance(self) -> None:
        """Without blocking: store the offsets of batches whose records were all acknowledged, and
        commit a sliced checkpoint that is complete."""
        self.store_acked()
        self._commit_sliced_if_done()

    def store_acked(self) -> None:
        """At-least-once: store the offsets of delivered batches, oldest first, once every record
        of theirs was acknowledged (a later batch never overtakes an earlier one)."""
        unstored = self._unstored
        while unstored and unstored[0].ticket is not None and unstored[0].ticket.done:
            batch = unstored.popleft()
            if batch.ticket is not None and batch.ticket.failed:
                self.sink.raise_if_failed()  # the first failure, in one sentence
                raise KafkaIOError("a record of a batch was not acknowledged; its offsets are not stored.")
            self.source.store(batch.positions)
            self.stored_seq = batch.seq

    # ------------------------------------------------------------------ checkpoints
    def begin_sliced(self) -> None:
        """Ask for a sliced checkpoint, begun at the next `write_slice` (none while one is in progress)."""
        if self._sliced is None:
            self._sliced = _SlicedCheckpoint({}, -1, self.sink.ticket())

    def write_slice(self) -> None:
        """Between batches (every batch submitted so far processed, the core idle): begin the
        sliced checkpoint, then write its entities evenly over `CHECKPOINT_SPREAD` of the commit
        interval, for at most `CHECKPOINT_SLICE_S` per call."""
        ck, tracker = self._sliced, self.tracker
        if ck is None or ck.written or tracker is None:
            return
        seq = self.submitted_seq
        records: list[ChangelogRecord] = []  # held as one list per slice: few objects for the GC to track
        now = self._clock()
        if ck.seq < 0:  # begin
            ck.positions, ck.seq = dict(self._submitted_positions), seq
            tracker.begin(self.core, {p for _, p in self._active()}, records.append)
            ck.begun_at, ck.entities = now, tracker.writing
        spread_s = self.commit_interval_s * CHECKPOINT_SPREAD
        quota = paced_quota(ck.entities, tracker.writing, now - ck.begun_at, spread_s)
        ck.written = tracker.write_some(self.core, records.append, budget_s=CHECKPOINT_SLICE_S, max_entities=quota)
        if records:
            ck.held.append((seq, records))

    def checkpoint(self, grace: float | None = None) -> None:
        """The whole checkpoint; the caller has finished the in-flight batch (its alerts produced).
        At-least-once: flush (alerts, dead letters acknowledged), write the changed entities' state,
        flush, commit the stored offsets. Exactly-once: write the state into the open transaction
        and commit it with its offsets. `grace` bounds the flushes and the commit (shutdown).
        TransactionAborted: the caller rewinds; KafkaIOError: the run ends."""
        sink, source = self.sink, self.source
        if self.tracker is not None:
            if not self.exactly_once:
                # every alert acknowledged before the state that fences its event is written
                self._flush_and_store(grace)
                self._release_held(self.submitted_seq)
            owned = {p for _, p in self._active()}
            self.tracker.snapshot(self.core, owned, emit=self._write_changelog)  # produced as made, never collected
        self._sliced = None  # its records are written by now and its offsets are among those committed below
        self._fault_point()
        if self.exactly_once:
            positions, self._txn_positions = self._txn_positions, {}
            try:
                sink.commit_transaction(positions, source.group_metadata(), timeout=grace)
            except TransactionAborted:
                self.stats.aborted_transactions += 1
                raise
            except KafkaIOError:
                self.metrics.delivery_failed()
                raise
            ok = True
        else:
            self._flush_and_store(grace)
            ok = source.commit()
        if ok:
            self._count_commit()

    def _count_commit(self) -> None:
        self.stats.commits += 1
        self.metrics.committed()
        self.committed_at = self._clock()

    def _release_held(self, upto_seq: int) -> None:
        """Produce the held changelog records whose state includes no batch after `upto_seq`."""
        ck = self._sliced
        if ck is None:
            return
        while ck.held and ck.held[0][0] <= upto_seq:
            records = ck.held.popleft()[1]
            self.stats.changelog_bytes += self.sink.changelog_records(records, ck.ticket)
            self.stats.changelog_records += len(records)

    def _commit_sliced_if_done(self) -> None:
        self._release_held(self.stored_seq)
        ck = self._sliced
        if ck is None or not ck.written or ck.held or not ck.ticket.done or self.stored_seq < ck.seq:
            return
        self._sliced = None
        if ck.ticket.failed:
            self.sink.raise_if_failed()
            raise KafkaIOError("a state changelog record was not acknowledged; offsets are not committed.")
        self._fault_point()
        active = self._active()
        positions = {tp: o for tp, o in ck.positions.items() if tp in active}
        if self.source.commit(positions):
            self._count_commit()

    def _flush_and_store(self, grace: float | None) -> None:
        try:
            self.sink.flush(grace)
            self.store_acked()
        except KafkaIOError:
            self.metrics.delivery_failed()
            raise

    def _write_changelog(self, r: ChangelogRecord) -> None:
        self.sink.changelog(r.partition, r.key, r.value)
        self.stats.changelog_records += 1
        self.stats.changelog_bytes += len(r.value) if r.value is not None else 0

    def _fault_point(self) -> None:
        if not self._kill_at or not self._alerts_since_checkpoint:
            return
        self._alerts_since_checkpoint = 0
        self._checkpoints_with_alerts += 1
        if self._checkpoints_with_alerts == self._kill_at:
            self.sink.flush(30.0)  # exactly-once: written inside the open transaction, invisible to read_committed
            log.error(
                "%s=%d: killing this process between producing alerts and committing",
                FAULT_KILL_BEFORE_COMMIT,
                self._kill_at,
            )
            os.kill(os.getpid(), signal.SIGKILL)

    # ------------------------------------------------------------------ partitions, aborts
    def forget(self, gone: set[TP], numbers: Sequence[int]) -> None:
        """Partitions `gone` (state of partition `numbers` dropped) may have another owner now:
        none of their offsets is stored, committed or put in a transaction any more, and none of
        their state records is produced; if one comes back, its offsets are another owner's."""
        for tp in gone:
            self._txn_positions.pop(tp, None)
            self._submitted_positions.pop(tp, None)
        for batch in self._unstored:
            if any(tp in gone for tp in batch.positions):
                batch.positions = {tp: o for tp, o in batch.positions.items() if tp not in gone}
        ck = self._sliced
        if ck is not None:
            for tp in gone:
                ck.positions.pop(tp, None)
            dropped = set(numbers)
            ck.held = deque((q, [r for r in records if r.partition not in dropped]) for q, records in ck.held)

    def abort(self) -> None:
        """Exactly-once: abort the open transaction; nothing of it is visible, its offsets are forgotten."""
        self.sink.abort_transaction()
        self._txn_positions.clear()

    def describe(self, now: float) -> list[str]:
        """Parts of the loop's state line (`Detector.describe`)."""
        parts = [f"submitted={self.submitted_seq} stored={self.stored_seq}"]
        if self._unstored:
            head = self._unstored[0]
            parts.append(
                f"unstored={len(self._unstored)} (oldest batch {head.seq}: "
                f"{head.ticket.pending if head.ticket else '-'} unacknowledged)"
            )
        ck = self._sliced
        if ck is not None:
            parts.append(
                f"sliced checkpoint: after batch {ck.seq}, {now - ck.begun_at if ck.seq >= 0 else 0:.1f} s, "
                f"written={ck.written}, held slices={len(ck.held)}, unacknowledged={ck.ticket.pending}"
            )
        if self._txn_positions:
            parts.append(f"open transaction over {len(self._txn_positions)} partition(s)")
        return parts
