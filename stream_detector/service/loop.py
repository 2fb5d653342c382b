"""`Detector`: the one loop of `stream-detector run` (STYLE.md "one owner, one loop").

    consume(up to max_batch, short slices) -> a forming batch, closed when full or max_wait_ms old
      -> decode -> (inference thread idle) submit it to DetectorCore.process
      -> as soon as a batch's inference finishes: submit the next one, then deliver the finished
         one: produce its alerts and dead letters, serve delivery reports, and store its offsets
         once the broker acknowledged them all (at-least-once; a `DeliveryTicket` per batch)
      -> checkpoint every commit_interval_s: changelog + commit (exactly-once: the transaction;
         at-least-once: the changelog is written in slices between batches, spread evenly over
         half the interval, then the offsets of the batches submitted before it began are
         committed, so the loop never stalls and the broker gets no burst)

One worker thread runs `DetectorCore.process` (ONNX Runtime releases the GIL), so inference of
one batch overlaps consuming and decoding the next; the core is only ever touched by one thread at
a time. A batch's alerts leave when its inference ends, not after the next consume. Backpressure:
at most `runtime.max_inflight` x `max_batch` events are held (in inference, decoded, forming);
beyond that the loop stops consuming and waits for inference, leaving librdkafka's prefetch queue
(bounded by `queued.max.messages.kbytes`) in place instead of pausing partitions, which would drop
it. `runtime.max_inflight = 1` turns the overlap off.

Offsets of a batch (every message in it, dead letters included) are stored only after all its
alerts and dead letters were acknowledged, in batch order, so a crash re-processes and never
skips; a delivery failure stops the loop without storing. On revoke: finish the in-flight batch,
deliver, store, commit, then drop those partitions' state; on lost: finish and deliver, store
nothing, drop. `stop()` (signals) ends the loop: the batches already consumed are processed and
delivered, then the final checkpoint commits, and the clients close.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import orjson

from stream_detector.core.bundle import Bundle, BundleError
from stream_detector.service.changelog import ChangelogError, ChangelogRecord, Restorer, StateAssembler, StateTracker, ensure_changelog_topic
from stream_detector.service.config import ConfigError, Settings, add_settings_arguments, settings_from_args
from stream_detector.service.decode import DeadLetter, Decoder
from stream_detector.core.events import NO_TIME, EventBatch
from stream_detector.service.health import Health
from stream_detector.service.kafka_io import DeliveryTicket, KafkaIOError, KafkaSink, KafkaSource, TransactionAborted, check_broker
from stream_detector.service.metrics import Metrics, MetricsServer
from stream_detector.service.notify import SystemdNotifier
from stream_detector.service.reload import LoadedModel, ModelReloader
from stream_detector.core.pipeline import BatchResult, DetectorCore
from stream_detector.core.scorer import Scorer, ScorerError

log = logging.getLogger(__name__)

_SLICE_S = 0.005  # consume slice while inference runs: how soon a finished batch is noticed
_CHECKPOINT_SLICE_S = 0.005  # changelog writing per pause between batches (sliced checkpoints)
_CHECKPOINT_SPREAD = 0.5  # a sliced checkpoint's entities are written evenly over this share of commit_interval_s

# Debug switch for the fault-injection suite (tests/test_reliability_*.py), not a setting.
FAULT_KILL_BEFORE_COMMIT = "STREAM_DETECTOR_FAULT_KILL_BEFORE_COMMIT"


@dataclass
class RunStats:
    consumed: int = 0  # messages taken from Kafka
    decoded: int = 0  # valid events handed to the core
    dead_letters: int = 0
    scored: int = 0  # windows scored
    alerts: Counter = field(default_factory=Counter)  # by state
    batches: int = 0
    commits: int = 0
    elapsed_s: float = 0.0
    first_message_s: float | None = None  # seconds from start to the first consumed message (group join)
    backpressure_s: float = 0.0  # time spent with partitions paused waiting for inference
    changelog_records: int = 0  # state records (tombstones included) written
    changelog_bytes: int = 0
    restored_entities: int = 0  # entities whose state was read back from the changelog
    aborted_transactions: int = 0
    rewinds: int = 0  # back to the committed state after an abort or lost partitions


@dataclass
class _Work:
    """One consumed batch on its way through the loop."""

    positions: dict[tuple[str, int], int]  # next offset per (topic, partition), stored after delivery
    dead: list[DeadLetter]
    n_messages: int
    by_topic: dict[str, int]
    batch: EventBatch | None  # the decoded events, until submitted
    future: Future | None = None  # DetectorCore.process(batch) on the inference thread
    ticket: DeliveryTicket | None = None  # at-least-once: its alerts/dead letters until acknowledged
    started: float = 0.0
    oldest_event_ms: int | None = None  # for the event-lag gauge
    seq: int = 0  # submit order (1, 2, ...)


@dataclass
class _SlicedCheckpoint:
    """At-least-once, with a changelog: a periodic checkpoint whose state records are made in
    slices between batches (`StateTracker.begin/write_some`). A record made after batch n was
    processed is held until batch n's alerts were acknowledged: restored state fences the events it
    holds (changelog.py), so it must never hold an event whose alert could still be lost. Its
    offsets are committed once every record is produced and acknowledged and every batch submitted
    before it began was stored."""

    positions: dict[tuple[str, int], int]  # next offset per partition as of `begin`
    seq: int  # the last batch submitted before `begin`
    ticket: DeliveryTicket  # its changelog records
    held: deque = field(default_factory=deque)  # (last batch their state includes, records of one slice), oldest first
    written: bool = False
    begun_at: float = 0.0  # time.monotonic() at `begin`
    entities: int = 0  # entities to write, as of `begin`


def paced_quota(entities: int, left: int, elapsed_s: float, spread_s: float) -> int:
    """How many more of a checkpoint's `entities` may be written now, `elapsed_s` after it began,
    `left` of them still unwritten, so that they go out evenly over `spread_s`: the records (and
    the broker's work to store them) come as a steady trickle, not as a burst that delays the
    batches behind it."""
    if spread_s <= 0 or elapsed_s >= spread_s:
        return left
    due = -(-entities * elapsed_s // spread_s)  # ceil: the first call after begin writes at least one
    return max(0, min(left, int(due) - (entities - left)))


class Detector:
    """Builds everything from `Settings` and fails at construction, with one sentence, on a bad
    bundle, an unusable provider or a broker/topic problem: nothing is consumed before that."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, health: Health | None = None) -> None:
        from stream_detector.service.check import load_model

        self.settings = settings
        self.bundle: Bundle = load_model(settings)
        self.scorer = Scorer.from_settings(self.bundle, settings)
        self.scorer.warm_up()  # a model that scores NaN is refused here, before anything is consumed
        self.core = DetectorCore(self.bundle, self.scorer, settings.detection.to_core())
        self.decoder = Decoder(self.bundle.features, settings.input)
        self._fence_rows = True  # at-least-once replays: skip rows that restored state holds (changelog.py)
        self._use_log_stage_if_log_bundle(settings)
        self.metrics = metrics if metrics is not None else Metrics()  # process_* (RSS, CPU, fds) included
        self.health = health if health is not None else Health(stall_after_s=max(30.0, 10 * settings.runtime.max_wait_ms / 1000))
        partitions = check_broker(settings, [*settings.kafka.topics, settings.kafka.alerts_topic, settings.kafka.dlq_topic])
        proc = settings.processing
        self.exactly_once = proc.guarantee == "exactly_once"
        self.changelog_topic = ensure_changelog_topic(settings, max(partitions[t] for t in settings.kafka.topics)) if proc.changelog else None
        self.tracker = StateTracker(self.bundle.window, settings.detection.history) if proc.changelog else None
        self.health.broker_reachable()
        self.health.model_loaded(self.bundle.model_version)
        self.metrics.set_model(self.bundle.model_version, self.scorer.provider, self.bundle.window, self.bundle.n_features)
        # operations hooks (notify.py: systemd READY/WATCHDOG/STOPPING; reload.py: hot model reload)
        self.notifier = SystemdNotifier()
        self.reloader = ModelReloader(
            settings.model.bundle, self.bundle, self._build_scorer, watch=settings.model.watch,
            watch_interval_s=settings.model.watch_interval_s, on_result=lambda ok, _: self.metrics.reload_result(ok),
        )
        self._ready_sent = False
        self._next_state_report = 0.0
        self.stats = RunStats()
        self._stop = threading.Event()
        self._pending: _Work | None = None
        self._source: KafkaSource | None = None
        self._sink: KafkaSink | None = None
        self._restorer: Restorer | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._forming: list[Any] = []  # messages of the next batch, not yet decoded
        self._forming_since = 0.0  # when the loop started waiting for the forming batch
        self._ready: deque[_Work] = deque()  # decoded, waiting for the inference thread
        self._unstored: deque[_Work] = deque()  # at-least-once: delivered, offsets stored once acknowledged
        self._submitted_seq = 0  # the last batch submitted ...
        self._stored_seq = 0  # ... and the last one whose offsets were stored
        self._submitted_positions: dict[tuple[str, int], int] = {}  # next offset per partition, submitted batches
        self._sliced: _SlicedCheckpoint | None = None  # at-least-once checkpoint in progress
        self._txn_positions: dict[tuple[str, int], int] = {}  # exactly-once: offsets of the open transaction
        self._restoring: set[tuple[str, int]] = set()  # paused until their partition's state is restored
        self._slipped: dict[tuple[str, int], int] = {}  # first offset fetched (and dropped) while restoring
        self._rewind_needed = False
        self._consumed_at = self._committed_at = 0.0  # time.monotonic() of the last message consumed / commit (describe)
        self._checkpoints_with_alerts = 0
        self._alerts_since_checkpoint = 0
        # Fault injection for the reliability suite: die by SIGKILL at the N-th checkpoint that
        # follows produced alerts, after they reached the broker and before the commit.
        self._kill_at = int(os.environ.get(FAULT_KILL_BEFORE_COMMIT, "0") or 0)

    def _use_log_stage_if_log_bundle(self, settings: Settings) -> None:
        """A log model bundle (issue 8): messages are raw log lines, turned into rows by the log
        stage (logstage.py), and alerts carry the offending template and a sample line."""
        from stream_detector.logs.spec import is_log_bundle, load_log_spec
        from stream_detector.logs.core import LogDetectorCore
        from stream_detector.service.decode_logs import LogDecoder

        if is_log_bundle(self.bundle):
            spec = load_log_spec(self.bundle)
            self.decoder = LogDecoder(spec, settings.input.max_message_bytes)  # type: ignore[assignment]
            # with a changelog, the entities' log sessions move with their partitions too
            stage = self.decoder.stage if settings.processing.changelog else None  # type: ignore[attr-defined]
            self.core = LogDetectorCore(self.core, spec, stage)  # type: ignore[assignment]
            # The stage skips lines that restored sessions hold already, before it makes rows. An
            # offset fence on rows would also drop new idle-check and session-end rows, which
            # repeat the offset of the entity's last line.
            self._fence_rows = False

    def stop(self) -> None:
        """Ask the loop to finish the current batch, deliver, commit and close (signal-safe)."""
        self._stop.set()

    def describe(self) -> str:
        """The loop's state in one line (`kill -USR1`, next to the thread stacks): what it holds,
        what it waits for, and where each partition stands, so that a service that runs but makes
        no progress says why."""
        now = time.monotonic()
        source, pending, ck = self._source, self._pending, self._sliced

        def ago(t: float) -> str:
            return f"{now - t:.1f} s ago" if t else "never"

        parts = [f"consumed={self.stats.consumed} (last {ago(self._consumed_at)}) scored={self.stats.scored} "
                 f"commits={self.stats.commits} (last {ago(self._committed_at)}) batches={self.stats.batches}",
                 f"forming={len(self._forming)} ready={len(self._ready)} held={self._held()}"]
        if pending is not None:
            running = pending.future is not None and not pending.future.done()
            parts.append(f"in-flight batch {pending.seq}: {pending.n_messages} msgs, {now - pending.started:.1f} s, {'running' if running else 'finished'}")
        parts.append(f"submitted={self._submitted_seq} stored={self._stored_seq}")
        if self._unstored:
            head = self._unstored[0]
            parts.append(f"unstored={len(self._unstored)} (oldest batch {head.seq}: {head.ticket.pending if head.ticket else '-'} unacknowledged)")
        if ck is not None:
            parts.append(f"sliced checkpoint: after batch {ck.seq}, {now - ck.begun_at if ck.seq >= 0 else 0:.1f} s, "
                         f"written={ck.written}, held slices={len(ck.held)}, unacknowledged={ck.ticket.pending}")
        if self._txn_positions:
            parts.append(f"open transaction over {len(self._txn_positions)} partition(s)")
        if self._restoring:
            parts.append(f"restoring (paused): {_fmt_tps(self._restoring)}; slipped: {_fmt_tps(self._slipped)}")
        if self._restorer is not None and self._restorer.busy:
            parts.append(f"changelog partitions still read: {self._restorer.partitions()}")
        if source is not None:
            try:
                lag = _fmt_tps(source.lag())
            except Exception as e:  # noqa: BLE001 - a diagnostic line must not fail the service
                lag = f"unavailable ({e})"
            parts.append(f"assigned={_fmt_tps(source.assignment)} lag={lag}")
        parts.append(f"loop last ticked {self.health.since_tick():.1f} s ago")
        return "; ".join(parts)

    # ------------------------------------------------------------------ the loop
    def run(self, max_messages: int | None = None, timeout: float | None = None) -> RunStats:
        """Consume until stop(), until `max_messages` were consumed and handled, or until `timeout`
        seconds passed; then deliver, commit and close. Raises KafkaIOError/DeliveryError (one
        sentence) if the broker fails; offsets of undelivered batches are then not stored."""
        rt = self.settings.runtime
        t0 = time.monotonic()
        deadline = None if timeout is None else t0 + timeout
        next_commit = t0 + rt.commit_interval_s
        with ExitStack() as stack:
            txn_id = self.settings.processing.transactional_id_for(self.settings.kafka.group_id) if self.exactly_once else None
            self._sink = sink = KafkaSink(self.settings, transactional_id=txn_id)
            stack.callback(sink.close, rt.shutdown_grace_s)
            if self.changelog_topic is not None:
                self._restorer = Restorer(self.settings, self.changelog_topic, self.bundle.window)
                stack.callback(self._restorer.close)
            self._source = source = KafkaSource(self.settings, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)
            stack.callback(source.close)
            self._executor = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="sd-inference"))
            if rt.metrics_port is not None:
                stack.enter_context(MetricsServer(self.metrics, self.health, port=rt.metrics_port))
            loop_done = threading.Event()  # ends the stall guard with this run (tests run the loop in-process)
            stack.callback(loop_done.set)
            if rt.stall_exit_s > 0:
                threading.Thread(target=self._stall_guard, args=(rt.stall_exit_s, loop_done), name="sd-stall-guard", daemon=True).start()
            # What exists now (modules, clients, the model) lives as long as the loop: out of the
            # collector's sight, a full collection walks only what the loop made since, instead of
            # pausing it for tens of ms (docs/performance.md, "Phase 4").
            gc.collect()
            gc.freeze()
            stack.callback(gc.unfreeze)  # a process that runs the loop again (tests) can collect it later
            try:
                while not self._stop.is_set():
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        break
                    if max_messages is not None and self.stats.consumed >= max_messages:
                        break
                    self.health.tick()
                    self.metrics.tick(time.time())
                    self._ops_tick(now - t0)
                    try:
                        self._iteration(max_messages, t0)
                        if time.monotonic() >= next_commit:
                            self._periodic_checkpoint()
                            next_commit = time.monotonic() + rt.commit_interval_s
                    except TransactionAborted as e:
                        self._rewind(str(e))
                self.health.stopping()
                self.notifier.stopping(f"draining: finishing the batch, delivering, committing (grace {rt.shutdown_grace_s:g} s)")
                try:
                    self._process_rest()
                    self._checkpoint()
                except TransactionAborted as e:  # nothing of the open transaction is visible; a restart redoes it
                    log.warning("the final transaction was aborted (%s); its input is re-processed on restart", e)
            finally:
                self.stats.elapsed_s = time.monotonic() - t0
                if self._pending is not None and self._pending.future is not None:
                    self._pending.future.cancel()  # an error path: this batch is neither delivered nor stored
                self._pending = None
        return self.stats

    def _iteration(self, max_messages: int | None, t0: float) -> None:
        rt = self.settings.runtime
        source = self._source
        assert source is not None
        if self._rewind_needed:
            self._rewind("partitions were lost")
        self._advance()
        pending = self._pending
        if pending is not None and self._held() >= rt.max_inflight * rt.max_batch:
            # Backpressure: hold what was consumed, let inference catch up; the prefetch stays.
            t = time.monotonic()
            if pending.future is not None:
                try:
                    pending.future.result(timeout=0.05)
                except FutureTimeout:
                    pass
            self.stats.backpressure_s += time.monotonic() - t
            self._advance()
            return
        want = rt.max_batch - len(self._forming)
        if max_messages is not None:
            want = min(want, max_messages - self.stats.consumed)
        if want <= 0:
            if pending is not None and pending.future is not None:
                try:
                    pending.future.result(timeout=0.005)
                except FutureTimeout:
                    pass
            return
        now = time.monotonic()
        if not self._forming:
            self._forming_since = now
        left = max(0.0, self._forming_since + rt.max_wait_ms / 1000 - now)
        busy = pending is not None or bool(self._ready)
        restoring = self._restorer is not None and self._restorer.busy
        # While inference runs, consume in short slices so its end is noticed (and its alerts sent) soon.
        wait = min(left, _SLICE_S) if busy or restoring else left
        msgs = source.consume(want, wait)
        if self._rewind_needed:
            return  # lost partitions (exactly-once): everything consumed is discarded by the rewind
        if msgs and self.stats.first_message_s is None:
            self.stats.first_message_s = time.monotonic() - t0
        msgs = self._owned(msgs)
        if msgs:
            self._forming.extend(msgs)
            self.stats.consumed += len(msgs)
            self._consumed_at = time.monotonic()
        self._advance()

    def _held(self) -> int:
        """Events held by the loop: in inference, decoded and waiting, forming."""
        n = len(self._forming) + sum(w.n_messages for w in self._ready)
        return n + (self._pending.n_messages if self._pending is not None else 0)

    def _advance(self) -> None:
        """Move batches along without blocking: close the forming batch when it is full or old
        enough; when inference is idle, submit the next batch and deliver the finished one; store
        the offsets of batches whose records were acknowledged."""
        rt = self.settings.runtime
        sink = self._sink
        forming_due = self._forming and (len(self._forming) >= rt.max_batch
                                         or time.monotonic() >= self._forming_since + rt.max_wait_ms / 1000)
        done = self._pending
        if done is not None and done.future is not None and not done.future.done():
            if forming_due and not self._ready and rt.max_inflight > 1:
                self._ready.append(self._decode(self._take_forming()))  # decode now; submitted when inference is free
            if sink is not None:
                sink.poll(0)
            self._store_acked()
            self._commit_sliced_if_done()
            return
        self._pending = None
        result = done.future.result() if done is not None and done.future is not None else None
        self._between_batches()  # the inference thread is idle here
        if self._ready:
            self._submit(self._ready.popleft())
        elif forming_due:
            self._submit(self._decode(self._take_forming()))
        if done is not None:
            self._deliver(done, result)
        elif sink is not None:
            sink.poll(0)
        self._store_acked()
        self._commit_sliced_if_done()
        if rt.max_inflight == 1 and self._pending is not None:
            self._drain()

    def _take_forming(self) -> list[Any]:
        msgs, self._forming = self._forming, []
        return msgs

    def _process_rest(self) -> None:
        """At the end of a run: process and deliver every batch already consumed."""
        if self._forming:
            self._ready.append(self._decode(self._take_forming()))
        self._drain()
        while self._ready:
            self._between_batches()
            self._submit(self._ready.popleft())
            self._drain()

    def _store_acked(self) -> None:
        """At-least-once: store the offsets of delivered batches, oldest first, once every record
        of theirs was acknowledged (a later batch never overtakes an earlier one)."""
        source, unstored = self._source, self._unstored
        while unstored and unstored[0].ticket is not None and unstored[0].ticket.done:
            work = unstored.popleft()
            if work.ticket is not None and work.ticket.failed:
                assert self._sink is not None
                self._sink.raise_if_failed()  # the first failure, in one sentence
                raise KafkaIOError("a record of a batch was not acknowledged; its offsets are not stored.")
            if source is not None:
                source.store(work.positions)
            self._stored_seq = work.seq

    def _owned(self, msgs: list[Any]) -> list[Any]:
        """Drop messages of partitions we no longer own, or whose state is still being restored
        (remembering where to seek back to for the latter). After a rebalance, the batches held
        but not yet submitted lose the messages of partitions that went away too."""
        source = self._source
        assert source is not None
        if source.rebalanced:
            source.rebalanced = False
            msgs = [m for m in msgs if (m.topic(), m.partition()) in source.assignment]
            self._forming = [m for m in self._forming if (m.topic(), m.partition()) in source.assignment]
            allowed = source.assignment - self._restoring
            self._ready = deque(_restrict(w, allowed) for w in self._ready)
        if self._restoring and msgs:
            kept = []
            for m in msgs:
                tp = (m.topic(), m.partition())
                if tp in self._restoring:
                    self._slipped.setdefault(tp, m.offset())
                else:
                    kept.append(m)
            msgs = kept
        return msgs

    def _decode(self, msgs: list[Any]) -> _Work:
        positions: dict[tuple[str, int], int] = {}
        by_topic: Counter = Counter()
        for m in msgs:  # messages of a partition arrive in offset order; the last one wins
            positions[(m.topic(), m.partition())] = m.offset() + 1
            by_topic[m.topic()] += 1
        batch, dead = self.decoder.decode(msgs)
        self.stats.decoded += batch.n
        self.stats.dead_letters += len(dead)
        times = batch.event_time_ms[batch.event_time_ms != NO_TIME]
        return _Work(positions, dead, len(msgs), dict(by_topic), batch, oldest_event_ms=int(times.min()) if times.size else None)

    def _submit(self, work: _Work) -> None:
        batch, work.batch = work.batch, None
        work.started = time.monotonic()
        self._submitted_seq += 1
        work.seq = self._submitted_seq
        self._submitted_positions.update(work.positions)
        if batch is not None and self.tracker is not None:
            batch = self.tracker.fence(batch)  # at-least-once replay: skip what restored state already holds
            self.tracker.note_batch(batch)
        if batch is not None and batch.n and self._executor is not None:
            work.future = self._executor.submit(self.core.process, batch)
        self._pending = work

    def _drain(self, exclude: set[tuple[str, int]] | None = None) -> None:
        """Finish and deliver the in-flight batch (if any)."""
        work, self._pending = self._pending, None
        if work is not None:
            result = work.future.result() if work.future else None
            self._deliver(work, result, exclude)

    def _deliver(self, work: _Work, result: BatchResult | None, exclude: set[tuple[str, int]] | None = None) -> None:
        sink, source = self._sink, self._source
        assert sink is not None and source is not None
        inference_s = time.monotonic() - work.started
        ticket = None if self.exactly_once else sink.ticket()
        for d in work.dead:
            log.warning("dead letter %s[%d]@%d: %s (%s)", d.message.topic(), d.message.partition(), d.message.offset(), d.reason, d.detail)
            sink.dead_letter(d, ticket)
        alerts = result.alerts if result is not None else []
        for a in alerts:
            sink.alert(a["key"], orjson.dumps(a, option=orjson.OPT_SERIALIZE_NUMPY), ticket)
        self._alerts_since_checkpoint += len(alerts)
        positions = work.positions if not exclude else {tp: o for tp, o in work.positions.items() if tp not in exclude}
        if self.exactly_once:
            # Delivered and committed together with the offsets at the next checkpoint.
            self._txn_positions.update({tp: o for tp, o in positions.items() if tp in source.assignment})
        else:
            # Offsets are stored by _store_acked once the broker acknowledged every record of the batch.
            work.positions, work.ticket = positions, ticket
            self._unstored.append(work)
            try:
                sink.poll(0)
            except KafkaIOError:
                self.metrics.delivery_failed()
                raise
        # bookkeeping (in exactly-once mode the transaction may still abort; the counts are then redone)
        published_ms = int(time.time() * 1000)
        for a in alerts:
            self.stats.alerts[a["state"]] += 1
            self.metrics.observe_alert(a["state"], _iso_to_ms(a.get("event_time")), published_ms)
            log.info("alert %s %s key=%s score=%.4g threshold=%.4g", a["state"], a["alert_id"][:12], a["key"], a["score"], a["threshold"])
        if result is not None:
            self.metrics.evicted(result.evicted)
        scored = result.n_scored if result is not None else 0
        self.stats.scored += scored
        self.stats.batches += 1
        self.metrics.observe_batch(
            consumed_by_topic=work.by_topic,
            decoded=(result.n_events if result is not None else 0),
            dead_lettered=Counter(d.reason for d in work.dead),
            scored=scored,
            max_batch=self.settings.runtime.max_batch,
            inference_s=inference_s if result is not None else None,
            oldest_event_time_ms=work.oldest_event_ms,
            now_ms=published_ms,
        )

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self) -> None:
        """Finish the in-flight batch, write the changed entities' state to the changelog, then
        commit: at-least-once = flush (alerts, dead letters, state acknowledged) and commit the
        stored offsets; exactly-once = add the offsets to the transaction and commit it."""
        sink, source = self._sink, self._source
        if sink is None or source is None:
            return
        self._drain()
        grace = self.settings.runtime.shutdown_grace_s if self._stop.is_set() else None
        if self.tracker is not None:
            if not self.exactly_once:
                # every alert acknowledged before the state that fences its event is written
                self._flush_and_store(sink, grace)
                self._release_held(self._submitted_seq)
            owned = {p for (_, p) in source.assignment - self._restoring}
            self.tracker.snapshot(self.core, owned, emit=self._write_changelog)  # produced as made, never collected
        self._sliced = None  # its records are written by now and its offsets are among those committed below
        self._fault_point(sink)
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
            self._flush_and_store(sink, grace)
            ok = source.commit()
        if ok:
            self._count_commit()

    def _count_commit(self) -> None:
        self.stats.commits += 1
        self.metrics.committed()
        self._committed_at = time.monotonic()

    def _periodic_checkpoint(self) -> None:
        """At-least-once with a changelog: begin a sliced checkpoint (none is begun while the
        previous one is still in progress). Otherwise: the whole checkpoint now."""
        if self.exactly_once or self.tracker is None or self._sink is None:
            self._checkpoint()
            return
        if self._sliced is None:
            self._sliced = _SlicedCheckpoint({}, -1, self._sink.ticket())  # begun when the core is idle

    def _write_slice(self) -> None:
        """Between batches (the core idle): begin the sliced checkpoint, then write its entities
        evenly over `_CHECKPOINT_SPREAD` of the commit interval, for at most `_CHECKPOINT_SLICE_S`
        per call."""
        ck, source, tracker = self._sliced, self._source, self.tracker
        if ck is None or ck.written or source is None or tracker is None:
            return
        seq = self._submitted_seq  # every batch submitted so far has been processed
        records: list[ChangelogRecord] = []  # held as one list per slice: few objects for the GC to track
        now = time.monotonic()
        if ck.seq < 0:  # begin
            ck.positions, ck.seq = dict(self._submitted_positions), seq
            tracker.begin(self.core, {p for (_, p) in source.assignment - self._restoring}, records.append)
            ck.begun_at, ck.entities = now, tracker.writing
        spread_s = self.settings.runtime.commit_interval_s * _CHECKPOINT_SPREAD
        quota = paced_quota(ck.entities, tracker.writing, now - ck.begun_at, spread_s)
        ck.written = tracker.write_some(self.core, records.append, budget_s=_CHECKPOINT_SLICE_S, max_entities=quota)
        if records:
            ck.held.append((seq, records))

    def _release_held(self, upto_seq: int) -> None:
        """Produce the held changelog records whose state includes no batch after `upto_seq`."""
        ck = self._sliced
        if ck is None:
            return
        while ck.held and ck.held[0][0] <= upto_seq:
            records = ck.held.popleft()[1]
            assert self._sink is not None
            self.stats.changelog_bytes += self._sink.changelog_records(records, ck.ticket)
            self.stats.changelog_records += len(records)

    def _commit_sliced_if_done(self) -> None:
        self._release_held(self._stored_seq)
        ck, source, sink = self._sliced, self._source, self._sink
        if (ck is None or not ck.written or ck.held or not ck.ticket.done or self._stored_seq < ck.seq
                or source is None or sink is None):
            return
        self._sliced = None
        if ck.ticket.failed:
            sink.raise_if_failed()
            raise KafkaIOError("a state changelog record was not acknowledged; offsets are not committed.")
        self._fault_point(sink)
        positions = {tp: o for tp, o in ck.positions.items() if tp in source.assignment and tp not in self._restoring}
        if source.commit(positions):
            self._count_commit()

    def _flush_and_store(self, sink: KafkaSink, grace: float | None) -> None:
        try:
            sink.flush(grace)
            self._store_acked()
        except KafkaIOError:
            self.metrics.delivery_failed()
            raise

    def _write_changelog(self, r: ChangelogRecord, ticket: DeliveryTicket | None = None) -> None:
        assert self._sink is not None
        self._sink.changelog(r.partition, r.key, r.value, ticket)
        self.stats.changelog_records += 1
        self.stats.changelog_bytes += len(r.value) if r.value is not None else 0

    def _fault_point(self, sink: KafkaSink) -> None:
        if not self._kill_at or not self._alerts_since_checkpoint:
            return
        self._alerts_since_checkpoint = 0
        self._checkpoints_with_alerts += 1
        if self._checkpoints_with_alerts == self._kill_at:
            sink.flush(30.0)  # exactly-once: written inside the open transaction, invisible to read_committed
            log.error("%s=%d: killing this process between producing alerts and committing", FAULT_KILL_BEFORE_COMMIT, self._kill_at)
            os.kill(os.getpid(), signal.SIGKILL)

    def _rewind(self, why: str) -> None:
        """Exactly-once, after an aborted transaction (or lost partitions): nothing of it is
        visible, so go back to the committed state: discard the in-flight batch, seek every
        partition to its committed offset and restore its entities from the changelog."""
        self._rewind_needed = False
        source, sink = self._source, self._sink
        assert source is not None and sink is not None
        log.warning("rewinding to the last committed transaction: %s", why)
        work, self._pending = self._pending, None
        if work is not None and work.future is not None:
            work.future.result()  # the core must be idle before its state is replaced
        sink.abort_transaction()
        self._txn_positions.clear()
        self._forming, self._ready = [], deque()  # read again after the seek
        tps = set(source.assignment)
        numbers = {p for _, p in tps}
        self.core.drop_partitions(sorted(numbers))
        if self.tracker is not None:
            self.tracker.forget_partitions(numbers)
        if self._restorer is not None:
            self._restorer.cancel(numbers)
            source.pause(tps)
            self._restoring |= tps
            self._restorer.start(numbers)
        source.rewind(tps)
        self._slipped = {tp: o for tp, o in self._slipped.items() if tp not in tps}
        self.stats.rewinds += 1

    # ------------------------------------------------------------------ state restore
    def _restore_step(self) -> None:
        restorer, source = self._restorer, self._source
        if restorer is None or source is None or not restorer.busy:
            return
        for partition, latest in restorer.step(self.settings.processing.restore_chunk, 0.05).items():
            self._install(partition, latest)

    def _install(self, partition: int, latest: StateAssembler) -> None:
        """Put a restored partition's entities into the core (idle), fence them, resume the partition."""
        source = self._source
        assert source is not None and self.tracker is not None
        t = time.monotonic()
        tps = {tp for tp in self._restoring if tp[1] == partition}
        committed = source.committed_offsets(tps)
        by_topic = {topic: off for (topic, _), off in committed.items() if off >= 0}
        restored = cold = 0
        for key, state, applied, why in latest.states():
            try:
                if state is None:
                    raise ChangelogError(why or "unusable record")
                self.core.restore(partition, key, state)
            except (ChangelogError, ValueError, KeyError) as e:
                cold += 1
                if cold == 1:
                    log.warning("changelog state of %s in partition %d is not usable (%s); such entities start cold", key, partition, e)
                continue
            self.tracker.restored(partition, key, applied if self._fence_rows else {}, by_topic, state)
            restored += 1
        self._restoring -= tps
        for tp in tps:
            first = self._slipped.pop(tp, None)
            if first is not None:  # fetched before the pause took hold: read it again
                source.seek(tp, first)
        source.resume(tps)
        self.stats.restored_entities += restored
        log.info("restored %d entities of partition %d from %s in %.2f s (%d cold)", restored, partition, self.changelog_topic, time.monotonic() - t, cold)

    # ------------------------------------------------------------------ rebalance (inside consume)
    def _on_assign(self, partitions: list[Any]) -> None:
        self.health.assigned((tp.topic, tp.partition) for tp in partitions)
        if self._restorer is not None and self._source is not None:
            new = {(tp.topic, tp.partition) for tp in partitions}
            owned_before = {p for (t, p) in self._source.assignment - new}
            fresh = {p for _, p in new} - owned_before
            self._restorer.start(fresh)
            hold = {tp for tp in new if self._restorer.restoring(tp[1])}
            if hold:
                self._source.pause(hold)
                self._restoring |= hold
        self._notify_ready()

    # ------------------------------------------------------------------ operations hooks
    def _build_scorer(self, bundle: Bundle) -> Scorer:
        return Scorer.from_settings(bundle, self.settings)

    def _notify_ready(self) -> None:
        """READY=1 after the first assignment (systemd Type=notify), then STATUS on every change."""
        n = len(self._source.assignment) if self._source is not None else 0
        status = f"model {self.bundle.model_version} on {self.scorer.provider}, {n} partition(s) assigned"
        if not self._ready_sent:
            self._ready_sent = True
            self.notifier.ready(status)
        else:
            self.notifier.status(status)

    def _stall_guard(self, limit_s: float, loop_done: threading.Event) -> None:
        """A loop that stops ticking (e.g. librdkafka blocking in a call far past its timeout after
        a broker outage) would hold its partitions forever: exit 1 in one sentence instead, so the
        supervisor restarts the member and it resumes from its committed offsets. systemd's
        watchdog does the same from outside; this covers supervisors without one. Ends with the
        run, and is off while draining on stop (bounded by the grace period)."""
        while not loop_done.wait(1.0):
            if self._stop.is_set():
                return
            stalled = self.health.since_tick()
            if stalled > limit_s:
                print(f"run: the main loop has not ticked for {stalled:.0f} s (runtime.stall_exit_s = {limit_s:g}); "
                      "exiting so that the supervisor restarts this member from its committed offsets.", file=sys.stderr, flush=True)
                os._exit(1)

    def _ops_tick(self, running_s: float) -> None:
        self.notifier.watchdog()
        if not self._ready_sent and running_s > 60.0:  # joined, but the group gave us nothing to do
            self._notify_ready()

    def _between_batches(self) -> None:
        """Restore changelog state, swap in a reloaded model, refresh state metrics; only here is
        the core not in use."""
        self._restore_step()
        self._write_slice()
        loaded = self.reloader.poll()
        if loaded is not None:
            self._swap_model(loaded)
        now = time.monotonic()
        if now >= self._next_state_report:
            self._next_state_report = now + 5.0
            entities, open_alerts, thresholds = self.core.summary()
            self.metrics.set_state(tracked_entities=entities, open_alerts=open_alerts)
            self.metrics.set_thresholds(thresholds)
            if self._source is not None:
                self.metrics.set_consumer_lag(self._source.lag())

    def _swap_model(self, loaded: LoadedModel) -> None:
        old = self.bundle.model_version
        self.core.swap_model(loaded.bundle, loaded.scorer)
        if self.tracker is not None:
            self.tracker.invalidate()  # thresholds restarted, rows may be renormalised: next writes are whole
        self.bundle, self.scorer = loaded.bundle, loaded.scorer
        self.health.model_loaded(loaded.bundle.model_version)
        self.metrics.set_model(loaded.bundle.model_version, loaded.scorer.provider, loaded.bundle.window, loaded.bundle.n_features)
        log.info("model %s replaced by %s; alerts from the next batch on carry the new version", old, loaded.bundle.model_version)
        self._notify_ready()

    def _on_revoke(self, partitions: list[Any]) -> None:
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        try:
            self._checkpoint()  # finish, write state, commit (exactly-once: the transaction) ...
        finally:
            self._drop(revoked)  # ... then forget the partitions, whatever happened

    def _on_lost(self, partitions: list[Any]) -> None:
        lost = {(tp.topic, tp.partition) for tp in partitions}
        try:
            if self.exactly_once:
                # The open transaction holds offsets we may no longer commit: it is aborted and the
                # remaining partitions go back to their committed state (`_rewind`, from the loop).
                work, self._pending = self._pending, None
                if work is not None and work.future is not None:
                    work.future.result()
                self._rewind_needed = True
            else:
                self._drain(exclude=lost)  # alerts still go out (deterministic ids); offsets of lost partitions do not
                for w in self._unstored:
                    w.positions = {tp: o for tp, o in w.positions.items() if tp not in lost}
        finally:
            self._drop(lost)

    def _drop(self, gone: set[tuple[str, int]]) -> None:
        # The core keys state by partition number: drop a number only when no input topic keeps it.
        keep = {p for (t, p) in (self._source.assignment if self._source else set()) if (t, p) not in gone}
        numbers = sorted({p for _, p in gone} - keep)
        dropped = self.core.drop_partitions(numbers)
        if self.tracker is not None:
            self.tracker.forget_partitions(numbers)
        if self._restorer is not None:
            self._restorer.cancel(numbers)
        self._restoring -= gone
        for tp in gone:
            self._slipped.pop(tp, None)
            self._txn_positions.pop(tp, None)
            self._submitted_positions.pop(tp, None)  # if it comes back, its offsets are another owner's
        if self._sliced is not None:  # never write a partition's state once it may have another owner
            for tp in gone:
                self._sliced.positions.pop(tp, None)
            gone_numbers = set(numbers)
            self._sliced.held = deque((q, [r for r in records if r.partition not in gone_numbers]) for q, records in self._sliced.held)
        self.health.revoked(gone)
        self.metrics.drop_partitions(gone)
        log.info("dropped state of %d entities on %d partition(s)", dropped, len(gone))


def _restrict(work: _Work, allowed: set[tuple[str, int]]) -> _Work:
    """The part of a decoded batch that belongs to `allowed` partitions (after a rebalance)."""
    positions = {tp: o for tp, o in work.positions.items() if tp in allowed}
    if len(positions) == len(work.positions):
        return work
    dead = [d for d in work.dead if (d.message.topic(), d.message.partition()) in allowed]
    batch = work.batch
    if batch is not None and batch.n:
        idx = np.flatnonzero([(t, p) in allowed for t, p in zip(batch.topic, batch.partition.tolist())])
        batch = batch.take(idx)
    return _Work(positions, dead, work.n_messages, work.by_topic, batch, oldest_event_ms=work.oldest_event_ms)


def _fmt_tps(tps: Any) -> str:
    """{(topic, partition): value} or a set of them, compactly: `topic[0]=12,topic[1]=7`."""
    if isinstance(tps, dict):
        return ",".join(f"{t}[{p}]={v}" for (t, p), v in sorted(tps.items())) or "-"
    return ",".join(f"{t}[{p}]" for t, p in sorted(tps)) or "-"


def _log_state_on_sigusr1(detector: Detector) -> None:
    """`kill -USR1`: the loop's state in the log (run by the main thread between two steps of the
    loop), after the thread stacks that the CLI's faulthandler writes at once (chained to it)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def log_state(signum: int, frame: Any) -> None:
        log.warning("state: %s", detector.describe())

    faulthandler.unregister(signal.SIGUSR1)  # the CLI's registration; re-made below, chained to this handler
    signal.signal(signal.SIGUSR1, log_state)
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True, chain=True)
    except (OSError, ValueError, AttributeError):  # stderr is not a file (main() in-process, captured): the state alone
        pass


def _iso_to_ms(value: Any) -> int | None:
    if not isinstance(value, str):
        return None
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


# ---- CLI ------------------------------------------------------------------------------------


def handle(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        log.info("settings: %s", orjson.dumps(settings.redacted()).decode())
        detector = Detector(settings)
    except (ConfigError, BundleError, ScorerError, ChangelogError) as e:
        print(f"run: {e}", file=sys.stderr)
        return 2
    except KafkaIOError as e:
        print(f"run: {e}", file=sys.stderr)
        return 1

    def on_signal(signum: int, frame: Any) -> None:
        log.info("%s: finishing the current batch, then deliver, commit and close (again to kill)", signal.Signals(signum).name)
        detector.stop()
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)  # a second signal kills
        grace = settings.runtime.shutdown_grace_s
        timer = threading.Timer(grace, lambda: (log.error("shutdown exceeded the %g s grace period; exiting", grace), os._exit(1)))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    detector.reloader.install_sighup()  # SIGHUP: hot model reload (systemctl reload)
    _log_state_on_sigusr1(detector)
    try:
        stats = detector.run()
    except KafkaIOError as e:
        print(f"run: {e}", file=sys.stderr)
        return 1
    log.info(
        "stopped: %d consumed, %d dead letters, %d scored, alerts %s, %d commits in %.1f s",
        stats.consumed, stats.dead_letters, stats.scored, dict(stats.alerts), stats.commits, stats.elapsed_s,
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run the detector: consume observations, publish alerts",
                              description="Consume observations from Kafka, score every entity's window with the bundle's model and publish alert events.")
    add_settings_arguments(p)
    p.set_defaults(func=handle)
