"""The offset and checkpoint rules (stream_detector/service/checkpoint.py) without a broker: an
in-memory source and sink (tests/memory_kafka.py) in which the test decides when the "broker"
acknowledges each record.

What must hold, checked over the log of everything that happened (`_check`):
- an input offset is stored or committed only after every alert of the events before it was
  acknowledged;
- stored offsets only move forward, per partition, and so do committed ones;
- a state record is produced only once every alert of the events its state holds (its `applied`
  offsets) was acknowledged (at-least-once: restored state fences those events);
- partitions that went away are never stored, committed or written again.
The same rules hold through the real broker in tests/test_service_kafka.py and
tests/test_reliability_faults.py."""

from __future__ import annotations

import pytest

from memory_kafka import FakeCore, MemorySink, MemorySource, events
from stream_detector.service.changelog import StateTracker, decode_state
from stream_detector.service.checkpoint import Checkpointer
from stream_detector.service.kafka_io import KafkaIOError
from stream_detector.service.metrics import Metrics
from stream_detector.service.stats import RunStats

T = "obs"
P0, P1 = (T, 0), (T, 1)


class Loop:
    """Drives a Checkpointer the way loop.Detector does: submit, process, deliver, between batches."""

    def __init__(self, exactly_once: bool = False, changelog: bool = False, assignment=(P0, P1)) -> None:
        self.log: list = []
        self.source = MemorySource(assignment, self.log)
        self.sink = MemorySink(self.log, transactional=exactly_once)
        self.core = FakeCore(log=self.log)
        self.tracker = StateTracker(4, history=32) if changelog else None
        self.restoring: set = set()
        self.stats = RunStats()
        self.now = 0.0
        self.ck = Checkpointer(self.source, self.sink, exactly_once=exactly_once, tracker=self.tracker, core=self.core,
                               active=lambda: self.source.assignment - self.restoring, stats=self.stats,
                               metrics=Metrics(process_metrics=False), commit_interval_s=1.0, clock=lambda: self.now)
        self.alerts: dict[str, tuple[tuple[str, int], int]] = {}  # alert key -> (partition, offset of its event)

    def batch(self, tp, offsets, alerts=(), dead=()):
        """One batch of partition `tp`: messages at `dead` offsets are dead letters, the others
        events, processed; alerts raised at `alerts` offsets."""
        positions = {tp: max(offsets) + 1}
        seq = self.ck.submitted(positions)
        ev = events(tp[0], tp[1], [(f"e{o % 3}", o) for o in offsets if o not in dead])
        if self.tracker is not None:
            self.tracker.note_batch(ev)
        self.core.process(ev)
        ticket = self.ck.ticket()
        for o in dead:
            key = f"dead {tp[0]}[{tp[1]}]@{o}"
            self.alerts[key] = (tp, o)
            self.sink.dead_letter(key, ticket)
        for o in alerts:
            key = f"{tp[0]}[{tp[1]}]@{o}"
            self.alerts[key] = (tp, o)
            self.sink.alert(key, b"{}", ticket)
        self.ck.delivered(seq, positions, ticket, len(alerts))
        return seq

    def between(self) -> None:
        """A pause between batches: a checkpoint slice, then what the acknowledgements allow."""
        self.ck.write_slice()
        self.ck.advance()

    def check(self) -> None:
        _check(self.log, self.alerts)


def _check(log: list, alert_at: dict) -> None:
    acked: set[str] = set()
    produced: list[str] = []
    stored: dict = {}
    committed: dict = {}
    for entry in log:
        what = entry[0]
        if what == "produce" and entry[1] in ("alert", "dead-letter"):
            produced.append(entry[2])
        elif what == "ack" and entry[1] in ("alert", "dead-letter"):
            acked.add(entry[2])
        elif what == "store":
            tp, o = entry[1], entry[2]
            assert o > stored.get(tp, -1), f"stored offsets must only move forward: {tp} {stored.get(tp)} -> {o}"
            stored[tp] = o
            _all_acked_below(tp, o, produced, acked, alert_at, "stored")
        elif what == "commit":
            for tp, o in entry[1].items():
                assert o >= committed.get(tp, -1), f"committed offsets went back: {tp} {committed.get(tp)} -> {o}"
                committed[tp] = o
                _all_acked_below(tp, o, produced, acked, alert_at, "committed")


def _all_acked_below(tp, offset, produced, acked, alert_at, what) -> None:
    late = [k for k in produced if alert_at[k][0] == tp and alert_at[k][1] < offset and k not in acked]
    assert not late, f"offset {offset} of {tp} {what} before its alerts {late} were acknowledged"


def _state_records_follow_their_alerts(loop: Loop) -> None:
    """Every meta record produced: the alerts and dead letters of the messages up to the offsets its
    state holds were acknowledged then."""
    acked: set[str] = set()
    metas = 0
    for entry in loop.log:
        if entry[0] == "ack" and entry[1] in ("alert", "dead-letter"):
            acked.add(entry[2])
        elif entry[0] == "produce" and entry[1] == "changelog" and "\x00" not in entry[2] and entry[3].value is not None:
            r = entry[3]
            metas += 1
            _, applied = decode_state(r.value)
            for key, (tp, o) in loop.alerts.items():
                if tp[1] == r.partition and tp[0] in applied and o <= applied[tp[0]]:
                    assert key in acked, f"state of {r.key} (applied {applied}) written before the alert {key} was acknowledged"
    assert metas, "no state was written"


# ---- at-least-once: offsets follow delivery -----------------------------------------------------
def test_a_batch_is_stored_only_once_its_alerts_are_acknowledged():
    loop = Loop()
    loop.batch(P0, [0, 1, 2], alerts=[1])
    loop.between()
    assert loop.source.stored == {}, "stored before the broker acknowledged the batch's alert"
    loop.sink.ack()
    loop.between()
    assert loop.source.stored == {P0: 3}
    loop.check()


def test_a_later_batch_never_overtakes_an_earlier_one():
    loop = Loop()
    loop.batch(P0, [0, 1], alerts=[0])
    loop.batch(P0, [2, 3], alerts=[3])
    first, second = loop.sink.unacked("alert")
    loop.sink.ack([second])  # the broker answers the second batch first
    loop.between()
    assert loop.source.stored == {}, "batch 2 was stored while batch 1 waits for its acknowledgement"
    loop.sink.ack([first])
    loop.between()
    assert loop.source.stored == {P0: 4} and loop.ck.stored_seq == 2
    loop.check()


def test_a_rejected_alert_stops_the_run_and_its_offsets_are_never_stored():
    loop = Loop()
    loop.batch(P0, [0, 1], alerts=[1])
    loop.batch(P1, [0], alerts=[])
    loop.sink.reject(loop.sink.unacked("alert")[0])
    with pytest.raises(KafkaIOError, match="failed"):
        loop.between()
    with pytest.raises(KafkaIOError):
        loop.ck.checkpoint()
    assert loop.source.stored == {} and loop.source.committed == {}


@pytest.mark.parametrize("changelog", [False, True], ids=["no-changelog", "sliced-checkpoints"])
def test_offsets_move_forward_and_follow_delivery_whatever_the_broker_answers_first(rng, changelog):
    """Random batches over two partitions, alerts acknowledged in random order and at random
    times, periodic checkpoints (sliced with a changelog): the rules hold at every step, and a
    final checkpoint commits everything consumed."""
    loop = Loop(changelog=changelog)
    next_offset = {P0: 0, P1: 0}
    for i in range(200):
        tp = (P0, P1)[int(rng.integers(2))]
        n = int(rng.integers(1, 6))
        offsets = list(range(next_offset[tp], next_offset[tp] + n))
        next_offset[tp] += n
        dead = [o for o in offsets if rng.random() < 0.1]
        loop.batch(tp, offsets, alerts=[o for o in offsets if o not in dead and rng.random() < 0.3], dead=dead)
        waiting = loop.sink.unacked()
        if waiting:
            pick = rng.random(len(waiting)) < 0.4
            loop.sink.ack([r for r, p in zip(waiting, pick) if p])
        if i % 17 == 0:
            loop.ck.begin_sliced() if loop.ck.slices else loop.ck.checkpoint()
        loop.now += 0.05
        loop.between()
        loop.check()
    loop.ck.checkpoint()
    loop.check()
    assert loop.source.committed == next_offset, "the final checkpoint commits everything consumed"
    if changelog:
        assert any(e[0] == "commit" and e[1] != loop.source.stored for e in loop.log[:-1]), "no sliced commit happened"
        _state_records_follow_their_alerts(loop)


# ---- at-least-once with a changelog: sliced checkpoints -----------------------------------------
def test_a_sliced_checkpoint_commits_its_begin_once_everything_before_it_is_acknowledged():
    loop = Loop(changelog=True)
    loop.batch(P0, [0, 1], alerts=[0])
    loop.batch(P1, [0, 1, 2], alerts=[2])
    loop.ck.begin_sliced()
    loop.between()  # begins: notes the offsets of both batches (writes nothing yet: paced)
    loop.now += 1.0  # past the spread (half the commit interval): the rest at once
    loop.between()  # makes the records, holds them
    assert loop.stats.changelog_records == 0 and loop.tracker.writing == 0
    assert [r for r in loop.sink.records if r.kind == "changelog"] == [], "state records produced before their batches' alerts were acknowledged"
    loop.batch(P0, [2, 3], alerts=[])  # submitted after the begin: not part of this checkpoint
    loop.sink.ack([r for r in loop.sink.unacked("alert")])
    loop.between()  # batches 1-3 stored; the held records go out, unacknowledged yet
    state = loop.sink.unacked("changelog")
    assert state and not any(e[0] == "commit" for e in loop.log), "committed before the state records were acknowledged"
    loop.sink.ack(state)
    loop.between()
    commits = [e[1] for e in loop.log if e[0] == "commit"]
    assert commits == [{P0: 2, P1: 3}], "a sliced checkpoint commits the offsets as of its begin"
    loop.check()
    _state_records_follow_their_alerts(loop)


def test_a_sliced_checkpoint_over_dead_letters_alone_waits_for_them_too():
    """A batch of nothing but dead letters changes no entity: the checkpoint has no state to write,
    and still commits its offsets only once the dead letters were acknowledged."""
    loop = Loop(changelog=True)
    loop.batch(P0, [0, 1, 2], dead=[0, 1, 2])
    loop.ck.begin_sliced()
    loop.between()
    loop.now += 1.0
    loop.between()
    assert not any(e[0] == "commit" for e in loop.log), "committed before the dead letters were acknowledged"
    loop.sink.ack()
    loop.between()
    assert [e[1] for e in loop.log if e[0] == "commit"] == [{P0: 3}]
    loop.check()


def test_the_whole_checkpoint_flushes_then_writes_state_then_commits():
    loop = Loop(changelog=True)
    loop.batch(P0, [0, 1, 2], alerts=[2])
    loop.ck.checkpoint()
    kinds = [e[0] if e[0] != "produce" else f"produce {e[1]}" for e in loop.log]
    first_state = kinds.index("produce changelog")
    assert kinds.index("flush") < first_state < kinds.index("commit"), kinds
    assert ("ack", "alert", "obs[0]@2") in loop.log[:first_state]
    assert loop.source.committed == {P0: 3} and loop.stats.commits == 1
    loop.check()


# ---- exactly-once -----------------------------------------------------------------------------
def test_exactly_once_commits_alerts_state_and_offsets_in_one_transaction():
    loop = Loop(exactly_once=True, changelog=True)
    loop.batch(P0, [0, 1], alerts=[1])
    loop.batch(P1, [0], alerts=[])
    loop.between()
    assert loop.source.stored == {} and not any(e[0] == "commit" for e in loop.log), "exactly-once never stores or commits by itself"
    loop.ck.checkpoint()
    (records, offsets), = loop.sink.committed_transactions
    assert offsets == {P0: 2, P1: 1}
    assert {r.kind for r in records} == {"alert", "changelog"}, "the alerts and the state go in the transaction with the offsets"
    # an aborted transaction: its offsets are forgotten, the next one does not carry them
    loop.batch(P0, [2, 3], alerts=[3])
    loop.ck.abort()
    loop.ck.checkpoint()
    assert loop.sink.committed_transactions[-1][1] == {} and loop.sink.aborts == 1


# ---- partitions that go away ----------------------------------------------------------------------
def test_a_forgotten_partition_is_never_stored_committed_or_written_even_when_it_comes_back():
    """P1 is lost while its batch waits for acknowledgement and a checkpoint slice holds its state;
    the group gives it back a moment later (its offsets are another owner's by then)."""
    loop = Loop(changelog=True)
    loop.batch(P0, [0, 1], alerts=[1])
    loop.batch(P1, [0, 1], alerts=[0])
    loop.ck.begin_sliced()
    loop.between()
    loop.now += 1.0
    loop.between()  # the slice holds records of both partitions
    # lost, as partitions.PartitionOwner.drop and kafka_io.KafkaSource do it
    loop.ck.forget({P1}, [1])
    loop.tracker.forget_partitions([1])
    loop.core.drop_partitions([1])
    loop.source.revoke({P1})
    loop.source.assignment.add(P1)  # assigned again
    loop.sink.ack()
    loop.between()
    loop.sink.ack()
    loop.between()
    loop.ck.checkpoint()
    assert not [e for e in loop.log if e[0] == "store" and e[1] == P1], "a stale offset of the lost partition was stored"
    assert all(P1 not in e[1] for e in loop.log if e[0] == "commit")
    assert {r.partition for r in loop.sink.records if r.kind == "changelog"} == {0}, "state of the lost partition was written"
    assert loop.source.committed == {P0: 2}
