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

The loop owns the batch flow; the rules live in the parts it owns, each with its own state:
- checkpoint.py `Checkpointer`: when offsets are stored and committed (only after delivery, in
  batch order), sliced checkpoints, transactions;
- partitions.py `PartitionOwner`: restore on assignment, revoke (checkpoint, then drop), lost
  (finish, drop without commit), the one `drop` of a partition's state, exactly-once rewind;
- run.py: the command line, signals. `stop()` (signals) ends the loop: the batches already
  consumed are processed and delivered, then the final checkpoint commits, and the clients close.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack
from typing import Any

from stream_detector.config import ConfigError, Settings
from stream_detector.core.bundle import Bundle
from stream_detector.core.pipeline import BatchResult, DetectorCore
from stream_detector.core.scorer import Scorer
from stream_detector.ingest.decode import Decoder
from stream_detector.ingest.decode_logs import log_path_for
from stream_detector.ingest.kafka_config import check_client_configs
from stream_detector.service.alertmanager import AlertmanagerSink
from stream_detector.service.batches import Work, count_batch, decode_work, publish, restrict
from stream_detector.service.brokerwatch import BrokerWatch
from stream_detector.service.changelog import Restorer, StateTracker, ensure_changelog_topic
from stream_detector.service.checkpoint import FAULT_KILL_BEFORE_COMMIT, Checkpointer
from stream_detector.service.control import ControlReader, ensure_control_topic
from stream_detector.service.control_state import ControlState
from stream_detector.service.health import Health
from stream_detector.service.kafka_errors import DeliveryError
from stream_detector.service.kafka_io import KafkaSource, TransactionAborted, check_broker
from stream_detector.service.kafka_sink import KafkaSink
from stream_detector.service.metrics import Metrics, MetricsServer
from stream_detector.service.ops import Operations, stall_guard
from stream_detector.service.partitions import PartitionOwner, fmt_tps
from stream_detector.service.reload import LoadedModel
from stream_detector.service.shadow import ShadowModel, load_shadow, shadow_topic
from stream_detector.service.stats import RunStats

log = logging.getLogger(__name__)

_SLICE_S = 0.005  # consume slice while inference runs: how soon a finished batch is noticed

__all__ = ["FAULT_KILL_BEFORE_COMMIT", "Detector", "RunStats"]


class Detector:
    """Builds everything from `Settings` and fails at construction, with one sentence, on a bad
    setting, bundle, an unusable provider or a broker/topic problem: nothing is consumed before that."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, health: Health | None = None) -> None:
        from stream_detector.service.check import load_model

        check_client_configs(settings)  # a kafka.consumer/producer value the guarantees forbid: ConfigError now
        self.settings = settings
        self.bundle: Bundle = load_model(settings)
        self.scorer = Scorer.from_settings(self.bundle, settings)
        self.scorer.warm_up()  # a model that scores NaN is refused here, before anything is consumed
        try:  # a detection setting the bundle cannot support (e.g. calibrated thresholds, an older calibration)
            self.core = DetectorCore(self.bundle, self.scorer, settings.detection.to_core())
        except ValueError as e:
            raise ConfigError(f"[detection] {e}") from None
        self.decoder: Any = Decoder(self.bundle.features, settings.input)
        # at-least-once replays: skip rows that restored state holds (changelog.py); a log bundle's
        # stage skips its lines itself (an offset fence on rows would also drop new idle-check and
        # session-end rows, which repeat the offset of the entity's last line)
        self._fence_rows = True
        log_path = log_path_for(self.bundle, self.core, settings)
        if log_path is not None:
            self.decoder, self.core = log_path
            self._fence_rows = False
        self.metrics = metrics if metrics is not None else Metrics()  # process_* (RSS, CPU, fds) included
        self.health = health if health is not None else Health.for_runtime(settings.runtime)
        self.broker = BrokerWatch(self.health)  # librdkafka's errors and statistics, failed commits -> /readyz
        shadow = load_shadow(settings, self.bundle)
        if shadow is not None and log_path is not None:
            raise ConfigError("a shadow bundle is built for metric bundles; the live model here is a log bundle.")
        topics = [*settings.kafka.topics, settings.kafka.alerts_topic, settings.kafka.dlq_topic]
        partitions = check_broker(settings, topics + ([shadow_topic(settings)] if shadow is not None else []))
        self.shadow = ShadowModel(settings, shadow, self.metrics) if shadow is not None else None
        proc = settings.processing
        self.exactly_once = proc.guarantee == "exactly_once"
        self.changelog_topic = (
            ensure_changelog_topic(settings, max(partitions[t] for t in settings.kafka.topics))
            if proc.changelog
            else None
        )
        self.tracker = StateTracker(self.bundle.window, settings.detection.history) if proc.changelog else None
        # silences and feedback (control topic), incidents to Alertmanager: docs/operations.md "Alerting pipelines"
        self.control_topic = ensure_control_topic(settings) if settings.kafka.control_topic else None
        self.control = ControlState(on_applied=self.metrics.feedback_applied.inc)
        self._control: ControlReader | None = None
        self._alertmanager: AlertmanagerSink | None = None
        self.health.broker_reachable()
        self.health.model_loaded(self.bundle.model_version)
        self.metrics.set_model(
            self.bundle.model_version, self.scorer.provider, self.bundle.window, self.bundle.n_features
        )
        # operations hooks (ops.py: systemd READY/WATCHDOG/STOPPING, hot model reload)
        self.ops = Operations(settings, self.bundle, self._build_scorer, self.metrics)
        self.reloader = self.ops.reloader
        self._next_state_report = 0.0
        self.stats = RunStats()
        self._stop = threading.Event()
        # made by run(): the clients, and the parts that keep the offset and partition rules
        self._source: KafkaSource | None = None
        self._sink: KafkaSink | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.offsets: Checkpointer | None = None
        self.partitions: PartitionOwner | None = None
        # the batch flow
        self._pending: Work | None = None  # in inference (or finished, not delivered yet)
        self._forming: list[Any] = []  # messages of the next batch, not yet decoded
        self._forming_since = 0.0  # when the loop started waiting for the forming batch
        self._ready: deque[Work] = deque()  # decoded, waiting for the inference thread
        self._rewind_needed = False
        self._consumed_at = 0.0  # time.monotonic() of the last message consumed (describe)
        # Fault injection for the reliability suite: die by SIGKILL at the N-th checkpoint that
        # follows produced alerts, after they reached the broker and before the commit.
        self._kill_at = int(os.environ.get(FAULT_KILL_BEFORE_COMMIT, "0") or 0)

    def stop(self) -> None:
        """Ask the loop to finish the current batch, deliver, commit and close (signal-safe)."""
        self._stop.set()

    def describe(self) -> str:
        """The loop's state in one line (`kill -USR1`, next to the thread stacks): what it holds,
        what it waits for, and where each partition stands, so that a service that runs but makes
        no progress says why."""
        now = time.monotonic()
        source, pending, offsets, owner = self._source, self._pending, self.offsets, self.partitions

        def ago(t: float) -> str:
            return f"{now - t:.1f} s ago" if t else "never"

        committed_at = offsets.committed_at if offsets is not None else 0.0
        parts = [
            f"consumed={self.stats.consumed} (last {ago(self._consumed_at)}) scored={self.stats.scored} "
            f"commits={self.stats.commits} (last {ago(committed_at)}) batches={self.stats.batches}",
            f"forming={len(self._forming)} ready={len(self._ready)} held={self._held()}",
        ]
        if pending is not None:
            running = pending.future is not None and not pending.future.done()
            parts.append(
                f"in-flight batch {pending.seq}: {pending.n_messages} msgs, {now - pending.started:.1f} s, "
                f"{'running' if running else 'finished'}"
            )
        if offsets is not None:
            parts += offsets.describe(now)
        if owner is not None:
            parts += owner.describe()
        if source is not None:
            try:
                lag = fmt_tps(source.lag())
            except Exception as e:  # noqa: BLE001 - a diagnostic line must not fail the service
                lag = f"unavailable ({e})"
            parts.append(f"assigned={fmt_tps(source.assignment)} lag={lag}")
        if self._alertmanager is not None:
            parts.append(
                f"alertmanager pending={self._alertmanager.pending} ({self._alertmanager.last_error or 'no error'})"
            )
        if self._control is not None:
            parts.append(f"control: {len(self.control.silences)} silence(s), {self.control.waiting} verdict(s) waiting")
        parts.append(f"loop last ticked {self.health.since_tick():.1f} s ago")
        return "; ".join(parts)

    # ------------------------------------------------------------------ the loop
    def run(self, max_messages: int | None = None, timeout: float | None = None) -> RunStats:
        """Consume until stop(), until `max_messages` were consumed and handled, or until `timeout`
        seconds passed; then deliver, commit and close. Raises KafkaIOError/DeliveryError (one
        sentence) if the broker fails; offsets of undelivered batches are then not stored."""
        rt, proc = self.settings.runtime, self.settings.processing
        t0 = time.monotonic()
        deadline = None if timeout is None else t0 + timeout
        next_commit = t0 + rt.commit_interval_s
        with ExitStack() as stack:
            txn_id = proc.transactional_id_for(self.settings.kafka.group_id) if self.exactly_once else None
            self._sink = sink = KafkaSink(self.settings, transactional_id=txn_id, watch=self.broker)
            stack.callback(sink.close, rt.shutdown_grace_s)
            if self.settings.alertmanager.urls:
                self._alertmanager = AlertmanagerSink(self.settings.alertmanager)
                stack.callback(self._alertmanager.close, rt.shutdown_grace_s)
            if self.control_topic is not None:
                # every silence and verdict so far is known before the first event is scored
                self._control = ControlReader(self.settings, self.control_topic)
                stack.callback(self._control.close)
                self._apply_control(*self._control.catch_up(self.settings.kafka.timeout_s))
            restorer = None
            if self.changelog_topic is not None:
                restorer = Restorer(self.settings, self.changelog_topic, self.bundle.window)
                stack.callback(restorer.close)
            # the rebalance callbacks run inside consume(), so only once the parts below exist
            self._source = source = KafkaSource(
                self.settings, self._on_assign, self._on_revoke, self._on_lost, watch=self.broker
            )
            stack.callback(source.close)
            self.partitions = owner = PartitionOwner(
                source,
                self.core,
                tracker=self.tracker,
                restorer=restorer,
                stats=self.stats,
                restore_chunk=proc.restore_chunk,
                fence_rows=self._fence_rows,
            )
            self.offsets = offsets = Checkpointer(
                source,
                sink,
                exactly_once=self.exactly_once,
                tracker=self.tracker,
                core=self.core,
                active=owner.active,
                stats=self.stats,
                metrics=self.metrics,
                commit_interval_s=rt.commit_interval_s,
                kill_at=self._kill_at,
            )
            # every holder of per-partition state forgets a partition when it is dropped
            owner.on_drop(offsets.forget)
            owner.on_drop(lambda gone, _: self.health.revoked(gone))
            owner.on_drop(lambda gone, _: self.metrics.drop_partitions(gone))
            if self._alertmanager is not None:
                owner.on_drop(self._forget_in_alertmanager)
            if self.shadow is not None:
                owner.on_drop(lambda _, numbers: self.shadow.drop_partitions(numbers) if self.shadow else None)
                stack.callback(self.shadow.close, rt.shutdown_grace_s)
            self._executor = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="sd-inference"))
            if rt.metrics_port is not None:
                stack.enter_context(MetricsServer(self.metrics, self.health, port=rt.metrics_port))
            loop_done = threading.Event()  # ends the stall guard with this run (tests run the loop in-process)
            stack.callback(loop_done.set)
            if rt.stall_exit_s > 0:
                threading.Thread(
                    target=self._stall_guard, args=(rt.stall_exit_s, loop_done), name="sd-stall-guard", daemon=True
                ).start()
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
                    self.ops.tick(now - t0, self._status)
                    try:
                        self._iteration(max_messages, t0)
                        if time.monotonic() >= next_commit:
                            self._periodic_checkpoint()
                            next_commit = time.monotonic() + rt.commit_interval_s
                    except TransactionAborted as e:
                        self._rewind(str(e))
                self.health.stopping()
                self.ops.stopping(
                    f"draining: finishing the batch, delivering, committing (grace {rt.shutdown_grace_s:g} s)"
                )
                try:
                    self._process_rest()
                    self._wait_for_alertmanager(rt.shutdown_grace_s)
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
        am = self._alertmanager
        if am is not None and am.pending >= self.settings.alertmanager.max_pending:
            # Backpressure: Alertmanager is not taking alerts; scoring goes on only once it does.
            t = time.monotonic()
            self._stop.wait(0.05)
            self.stats.backpressure_s += time.monotonic() - t
            return
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
        restoring = self.partitions is not None and self.partitions.busy
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
        sink, offsets = self._sink, self.offsets
        assert offsets is not None
        forming_due = self._forming and (
            len(self._forming) >= rt.max_batch or time.monotonic() >= self._forming_since + rt.max_wait_ms / 1000
        )
        if self._alertmanager is not None:
            self._alertmanager.poll()  # delivered incidents count down their batches' tickets
            self.metrics.alertmanager_pending.set(self._alertmanager.pending)
        done = self._pending
        if done is not None and done.future is not None and not done.future.done():
            if forming_due and not self._ready and rt.max_inflight > 1:
                self._ready.append(self._decode(self._take_forming()))  # decode now; submitted when inference is free
            if sink is not None:
                sink.poll(0)
            offsets.advance()
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
        offsets.advance()
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

    def _owned(self, msgs: list[Any]) -> list[Any]:
        """Drop messages of partitions we no longer own, or whose state is still being restored
        (the owner remembers where to seek back to for the latter). After a rebalance, the batches
        held but not yet submitted lose the messages of partitions that went away too."""
        source, owner = self._source, self.partitions
        assert source is not None and owner is not None
        if source.rebalanced:
            source.rebalanced = False
            msgs = [m for m in msgs if (m.topic(), m.partition()) in source.assignment]
            self._forming = [m for m in self._forming if (m.topic(), m.partition()) in source.assignment]
            allowed = owner.active()
            self._ready = deque(restrict(w, allowed) for w in self._ready)
        return owner.admit(msgs)

    def _decode(self, msgs: list[Any]) -> Work:
        work = decode_work(self.decoder, msgs)
        self.stats.decoded += work.batch.n if work.batch is not None else 0
        self.stats.dead_letters += len(work.dead)
        return work

    def _submit(self, work: Work) -> None:
        assert self.offsets is not None
        batch, work.batch = work.batch, None
        work.started = time.monotonic()
        work.seq = self.offsets.submitted(work.positions)
        if batch is not None and self.tracker is not None:
            batch = self.tracker.fence(batch)  # at-least-once replay: skip what restored state already holds
            self.tracker.note_batch(batch)
        if batch is not None and batch.n and self._executor is not None:
            work.future = self._executor.submit(self.core.process, batch)
            if self.shadow is not None:
                self.shadow.submit(batch)  # after the live submit, on its own thread (shadow.py)
        self._pending = work

    def _drain(self) -> None:
        """Finish and deliver the in-flight batch (if any)."""
        work, self._pending = self._pending, None
        if work is not None:
            result = work.future.result() if work.future else None
            self._deliver(work, result)

    def _discard_pending(self) -> None:
        """Wait for the in-flight batch's inference (the core must be idle), deliver nothing of it."""
        work, self._pending = self._pending, None
        if work is not None and work.future is not None:
            work.future.result()

    def _deliver(self, work: Work, result: BatchResult | None) -> None:
        """Produce a processed batch's dead letters and alerts; its offsets go to the checkpointer
        (stored once acknowledged, or into the open transaction)."""
        sink, offsets = self._sink, self.offsets
        assert sink is not None and offsets is not None
        inference_s = time.monotonic() - work.started
        ticket = offsets.ticket()
        if result is not None and result.alerts:
            self.metrics.alerts_silenced.inc(self.control.mark_silenced(result.alerts))
        alerts = publish(sink, work, result, ticket)
        if self._alertmanager is not None:
            for a in alerts:
                self._to_alertmanager(a, ticket)
        offsets.delivered(work.seq, work.positions, ticket, len(alerts))
        count_batch(
            self.stats,
            self.metrics,
            work,
            result,
            alerts,
            inference_s,
            self.settings.runtime.max_batch,
            int(time.time() * 1000),
        )

    def _to_alertmanager(self, alert: dict[str, Any], ticket: Any) -> None:
        """At-least-once: the batch's offsets are stored only once every Alertmanager accepted its
        alerts too (its ticket counts them). Exactly-once: Alertmanager is outside the transaction;
        the sink retries while the process lives (docs/operations.md)."""
        assert self._alertmanager is not None
        if ticket is None:
            self._alertmanager.submit(alert, _nothing)
            return
        self._alertmanager.submit(alert, ticket.hold())

    def _forget_in_alertmanager(self, gone: set[tuple[str, int]], _: Any) -> None:
        if self._alertmanager is not None:
            self._alertmanager.forget(gone)

    def _wait_for_alertmanager(self, grace: float) -> None:
        """At shutdown: give Alertmanager `grace` seconds for what it has not accepted; if it still
        has not, the run ends with an error and those batches' offsets are not committed, so a
        restart sends their alerts again."""
        am = self._alertmanager
        if am is None:
            return
        deadline = time.monotonic() + grace
        while am.pending and time.monotonic() < deadline:
            am.poll()
            time.sleep(0.05)
        am.poll()
        if am.pending:
            raise DeliveryError(
                f"{am.pending} alert event(s) did not reach Alertmanager within {grace:g} s "
                f"({am.last_error or 'no answer'}); their input is processed again on restart."
            )

    def _apply_control(self, records: list[Any], dead: list[Any]) -> None:
        """Silences and verdicts read from the control topic; malformed records to the dead-letter topic."""
        self.control.apply(records, self.core)
        if dead and self._sink is not None:
            for d in dead:
                m = d.message
                log.warning("bad control record %s[%d]@%d: %s", m.topic(), m.partition(), m.offset(), d.detail)
                self._sink.dead_letter(d)
            self.metrics.events_dead_lettered.labels(reason=dead[0].reason).inc(len(dead))

    # ------------------------------------------------------------------ checkpoints (checkpoint.py)
    def _checkpoint(self) -> None:
        """The whole checkpoint: finish and deliver the in-flight batch, then write state and commit."""
        if self.offsets is None:
            return
        self._drain()
        self.offsets.checkpoint(self.settings.runtime.shutdown_grace_s if self._stop.is_set() else None)

    def _periodic_checkpoint(self) -> None:
        """At-least-once with a changelog: begin a sliced checkpoint (none is begun while the
        previous one is still in progress). Otherwise: the whole checkpoint now."""
        if self.offsets is not None and self.offsets.slices:
            self.offsets.begin_sliced()
        else:
            self._checkpoint()

    def _rewind(self, why: str) -> None:
        """Exactly-once, after an aborted transaction (or lost partitions): nothing of it is
        visible, so go back to the committed state: discard the in-flight batch, seek every
        partition to its committed offset and restore its entities from the changelog."""
        self._rewind_needed = False
        assert self.offsets is not None and self.partitions is not None
        log.warning("rewinding to the last committed transaction: %s", why)
        self._discard_pending()  # the core must be idle before its state is replaced
        self.offsets.abort()
        self._forming, self._ready = [], deque()  # read again after the seek
        self.partitions.rewind()

    # ------------------------------------------------------------------ rebalance (inside consume; partitions.py)
    def _on_assign(self, partitions: list[Any]) -> None:
        new = {(tp.topic, tp.partition) for tp in partitions}
        self.health.assigned(new)
        if self.partitions is not None:
            self.partitions.assigned(new)
        self._notify_ready()

    def _on_revoke(self, partitions: list[Any]) -> None:
        assert self.partitions is not None
        # finish, write state, commit (exactly-once: the transaction), then drop, whatever happened
        self.partitions.revoked({(tp.topic, tp.partition) for tp in partitions}, self._checkpoint)

    def _on_lost(self, partitions: list[Any]) -> None:
        assert self.partitions is not None
        self.partitions.lost({(tp.topic, tp.partition) for tp in partitions}, self._finish_lost)

    def _finish_lost(self) -> None:
        if self.exactly_once:
            # The open transaction holds offsets we may no longer commit: it is aborted and the
            # remaining partitions go back to their committed state (`_rewind`, from the loop).
            self._discard_pending()
            self._rewind_needed = True
        else:
            # Alerts still go out (deterministic ids); the lost partitions' offsets are forgotten
            # when they are dropped (Checkpointer.forget), so they are never stored.
            self._drain()

    # ------------------------------------------------------------------ operations hooks (ops.py)
    def _build_scorer(self, bundle: Bundle) -> Scorer:
        return Scorer.from_settings(bundle, self.settings)

    def _status(self) -> str:
        n = len(self._source.assignment) if self._source is not None else 0
        return f"model {self.bundle.model_version} on {self.scorer.provider}, {n} partition(s) assigned"

    def _notify_ready(self) -> None:
        """READY=1 after the first assignment (systemd Type=notify), then STATUS on every change."""
        self.ops.announce(self._status())

    def _stall_guard(self, limit_s: float, loop_done: threading.Event) -> None:
        stall_guard(self.health, self._stop, limit_s, loop_done)

    def _between_batches(self) -> None:
        """Restore changelog state, write a checkpoint slice, swap in a reloaded model, refresh
        state metrics; only here is the core not in use."""
        restored = False
        if self.partitions is not None:
            was_restoring = self.partitions.busy
            self.partitions.restore_step()
            restored = was_restoring and not self.partitions.busy
        if self.offsets is not None:
            self.offsets.write_slice()
        if self._control is not None:
            records, dead = self._control.poll()
            if records or dead:
                self._apply_control(records, dead)
            self.control.retry(self.core, now=restored)  # entities just restored may be what verdicts wait for
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
        self.metrics.set_model(
            loaded.bundle.model_version, loaded.scorer.provider, loaded.bundle.window, loaded.bundle.n_features
        )
        log.info(
            "model %s replaced by %s; alerts from the next batch on carry the new version",
            old,
            loaded.bundle.model_version,
        )
        self._notify_ready()


def _nothing() -> None:
    pass
