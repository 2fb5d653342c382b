"""The partition owner (stream_detector/service/partitions.py) without a broker, wired to a real
`Checkpointer` and `StateTracker` the way loop.Detector wires them, over the in-memory source, sink
and changelog of tests/memory_kafka.py: a revoked partition's state is dropped after its final
commit (and even when that fails), a lost one without a commit, a new one waits paused for its
state and resumes where it was fetched, and an exactly-once rewind restores everything."""

from __future__ import annotations

import pytest

from memory_kafka import FakeCore, MemoryRestorer, MemorySink, MemorySource, events
from stream_detector.service.changelog import StateTracker
from stream_detector.service.checkpoint import Checkpointer
from stream_detector.service.kafka_io import KafkaIOError
from stream_detector.service.metrics import Metrics
from stream_detector.service.partitions import PartitionOwner
from stream_detector.service.stats import RunStats

T = "obs"
P0, P1 = (T, 0), (T, 1)
W = 4


class Message:
    def __init__(self, tp, offset):
        self._tp, self._offset = tp, offset

    def topic(self):
        return self._tp[0]

    def partition(self):
        return self._tp[1]

    def offset(self):
        return self._offset


class Member:
    """One group member's offset and partition side: source, sink, core, tracker, restorer, the
    checkpointer and the owner, wired as in loop.Detector.run."""

    def __init__(self, assignment=(P0, P1), changelog_records=None, exactly_once=False) -> None:
        self.log: list = []
        self.source = MemorySource(assignment, self.log)
        self.sink = MemorySink(self.log, transactional=exactly_once)
        self.core = FakeCore(W, log=self.log)
        self.tracker = StateTracker(W, history=32)
        self.restorer = MemoryRestorer(changelog_records or {}, W, self.log)
        self.stats = RunStats()
        self.owner = PartitionOwner(self.source, self.core, tracker=self.tracker, restorer=self.restorer, stats=self.stats)
        self.ck = Checkpointer(self.source, self.sink, exactly_once=exactly_once, tracker=self.tracker, core=self.core,
                               active=self.owner.active, stats=self.stats, metrics=Metrics(process_metrics=False), commit_interval_s=1.0)
        self.owner.on_drop(self.ck.forget)
        self.owner.on_drop(lambda gone, numbers: self.log.append(("hook", set(gone), list(numbers))))

    def batch(self, tp, offsets, alerts=()):
        positions = {tp: max(offsets) + 1}
        seq = self.ck.submitted(positions)
        ev = self.tracker.fence(events(tp[0], tp[1], [(f"e{o % 3}", o) for o in offsets]))
        self.tracker.note_batch(ev)
        self.core.process(ev)
        ticket = self.ck.ticket()
        for o in alerts:
            self.sink.alert(f"{tp}@{o}", b"{}", ticket)
        self.ck.delivered(seq, positions, ticket, len(alerts))
        return ev

    def revoke(self, gone, checkpoint=None):
        """What KafkaSource does: the callback (here the owner's, as Detector._on_revoke), then forget."""
        try:
            self.owner.revoked(gone, checkpoint or self.ck.checkpoint)
        finally:
            self.source.revoke(gone)

    def lose(self, gone):
        try:
            self.owner.lost(gone, lambda: None)  # at-least-once with nothing in flight: nothing to finish
        finally:
            self.source.revoke(gone)

    def index(self, what):
        return next(i for i, e in enumerate(self.log) if what(e))


def test_a_revoked_partition_is_dropped_after_its_final_commit():
    m = Member()
    m.batch(P0, [0, 1, 2], alerts=[1])
    m.batch(P1, [0, 1, 2, 3, 4], alerts=[4])
    m.revoke({P1})
    commit = m.index(lambda e: e[0] == "commit")
    drop = m.index(lambda e: e[0] == "drop")
    assert m.log[commit][1][P1] == 5, "the revoked partition's offsets are committed ..."
    assert commit < drop, "... before its state is dropped"
    assert max(i for i, e in enumerate(m.log) if e[0] == "produce" and e[3].partition == 1) < commit, "its state is written before the commit"
    assert m.log[drop] == ("drop", [1]) and ("hook", {P1}, [1]) in m.log
    assert {p for p, _ in m.core.entities()} == {0} and m.owner.active() == {P0}


def test_a_revoked_partition_is_dropped_even_when_its_final_commit_fails():
    m = Member()
    m.batch(P1, [0, 1], alerts=[1])
    m.sink.reject(m.sink.unacked("alert")[0])
    with pytest.raises(KafkaIOError):
        m.revoke({P1})
    assert not any(e[0] in ("commit", "store") for e in m.log), "offsets committed past an undelivered alert"
    assert ("drop", [1]) in m.log and m.core.entities() == []


def test_a_lost_partition_is_dropped_without_a_commit():
    m = Member()
    m.batch(P0, [0, 1, 2], alerts=[0])
    m.batch(P1, [0, 1, 2, 3], alerts=[3])
    m.lose({P1})
    assert ("drop", [1]) in m.log and not any(e[0] == "commit" for e in m.log), "a lost partition is dropped without committing"
    m.source.assignment.add(P1)  # and the group gives it back later: its old offsets are another owner's now
    m.sink.ack()
    m.ck.advance()
    m.ck.checkpoint()
    assert all(P1 not in e[1] for e in m.log if e[0] == "commit") and not [e for e in m.log if e[0] == "store" and e[1] == P1]
    assert {r.partition for r in m.sink.records if r.kind == "changelog"} == {0}, "state of the lost partition was written"


def test_a_partition_number_that_another_input_topic_keeps_keeps_its_state():
    a0, b0 = ("a", 0), ("b", 0)
    m = Member(assignment=(a0, b0))
    m.batch(a0, [0, 1])
    m.batch(b0, [0, 1])
    m.revoke({a0})
    assert ("drop", []) in m.log and ("hook", {a0}, []) in m.log
    assert len(m.core.entities()) == 2, "state is keyed by partition number: (b, 0) still needs it"


def _changelog_of_partition_1(events_up_to: int) -> tuple[dict, dict]:
    """The changelog a previous owner of P1 left after `events_up_to` events: records and counts."""
    prev = Member()
    prev.batch(P1, list(range(events_up_to)))
    records = prev.tracker.snapshot(prev.core, {1})
    return {1: [(r.key, r.value) for r in records]}, dict(prev.core.counts)


def test_a_new_partition_waits_paused_for_its_state_and_resumes_where_it_was_fetched():
    records, counts = _changelog_of_partition_1(10)
    m = Member(assignment=(P0,), changelog_records=records)
    m.source.committed[P1] = 7  # the previous owner committed up to 7; its state holds events up to 9
    m.source.assignment.add(P1)
    m.owner.assigned({P1})
    assert m.source.paused == {P1} and m.owner.active() == {P0} and m.restorer.partitions() == [1]
    kept = m.owner.admit([Message(P1, 7), Message(P0, 3), Message(P1, 8)])
    assert [(x.partition(), x.offset()) for x in kept] == [(0, 3)], "messages of a partition being restored are not processed"
    m.owner.restore_step()
    assert m.core.counts == counts and m.stats.restored_entities == len(counts)
    assert m.source.seeks == [(P1, 7)], "the partition is read again from the first message fetched during the restore"
    assert m.source.paused == set() and m.owner.active() == {P0, P1}
    again = m.batch(P1, [7, 8, 9, 10, 11])
    assert again.offset.tolist() == [10, 11], "events the restored state holds already are fenced (at-least-once re-reads)"
    assert m.core.counts[(1, "e1")] == counts[(1, "e1")] + 1 and m.core.counts[(1, "e2")] == counts[(1, "e2")] + 1


def test_a_partition_dropped_while_its_state_is_read_cancels_the_restore():
    records, _ = _changelog_of_partition_1(6)
    m = Member(assignment=(P0,), changelog_records=records)
    m.source.assignment.add(P1)
    m.owner.assigned({P1})
    m.owner.admit([Message(P1, 0)])
    m.lose({P1})
    assert ("restore-cancel", [1]) in m.log and m.owner.restoring == set() and not m.restorer.busy
    m.owner.restore_step()
    assert m.core.entities() == [] and m.source.seeks == []


def test_an_exactly_once_rewind_restores_every_partition_from_its_committed_state():
    records, counts = _changelog_of_partition_1(8)
    m = Member(changelog_records=records, exactly_once=True)
    m.source.committed.update({P0: 0, P1: 8})
    m.batch(P1, [8, 9], alerts=[9])  # in the open transaction, then aborted
    m.ck.abort()
    m.owner.rewind()
    assert m.core.entities() == [] and m.source.paused == {P0, P1} and m.restorer.partitions() == [0, 1]
    assert ("rewind", {P0: 0, P1: 8}) in m.log and m.stats.rewinds == 1
    m.owner.restore_step()
    assert m.core.counts == counts, "state as of the last committed transaction, nothing of the aborted one"
    assert m.source.paused == set()
