"""`Detector`: the one loop of `stream-detector run` (STYLE.md "one owner, one loop").

    consume(max_batch, max_wait) -> decode (valid events + dead letters)
      -> wait for batch i-1's inference -> submit batch i to the inference thread
      -> deliver batch i-1: produce its alerts and dead letters, flush (all acknowledged),
         then store its offsets -> commit stored offsets every commit_interval_s

One worker thread runs `DetectorCore.process` (ONNX Runtime releases the GIL), so inference of
batch i overlaps consuming and decoding batch i+1 and delivering batch i-1; the core is only ever
touched by one thread at a time. `runtime.max_inflight = 1` turns the overlap off.

Offsets of a batch (every message in it, dead letters included) are stored only after all its
alerts and dead letters were acknowledged, so a crash re-processes and never skips; a delivery
failure stops the loop without storing. On revoke: finish the in-flight batch, deliver, store,
commit, then drop those partitions' state; on lost: finish and deliver, store nothing, drop.
`stop()` (signals) ends the loop after the current batch: deliver, commit, close.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from stream_detector.bundle import Bundle, BundleError
from stream_detector.config import ConfigError, Settings, add_settings_arguments, settings_from_args
from stream_detector.decode import DeadLetter, Decoder
from stream_detector.events import NO_TIME, EventBatch
from stream_detector.health import Health
from stream_detector.kafka_io import KafkaIOError, KafkaSink, KafkaSource, check_broker
from stream_detector.metrics import Metrics, MetricsServer
from stream_detector.notify import SystemdNotifier
from stream_detector.reload import LoadedModel, ModelReloader
from stream_detector.pipeline import BatchResult, DetectorCore
from stream_detector.scorer import Scorer, ScorerError

log = logging.getLogger(__name__)


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


@dataclass
class _Work:
    """One consumed batch on its way through the loop."""

    positions: dict[tuple[str, int], int]  # next offset per (topic, partition), stored after delivery
    dead: list[DeadLetter]
    n_messages: int
    by_topic: dict[str, int]
    batch: EventBatch | None  # the decoded events, until submitted
    future: Future | None = None  # DetectorCore.process(batch) on the inference thread
    started: float = 0.0
    oldest_event_ms: int | None = None  # for the event-lag gauge


class Detector:
    """Builds everything from `Settings` and fails at construction, with one sentence, on a bad
    bundle, an unusable provider or a broker/topic problem: nothing is consumed before that."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, health: Health | None = None) -> None:
        from stream_detector.check import load_model

        self.settings = settings
        self.bundle: Bundle = load_model(settings)
        rt = settings.runtime
        self.scorer = Scorer(self.bundle, provider=settings.model.provider, require_cuda=settings.model.require_cuda, max_batch=rt.max_batch)
        self.core = DetectorCore(self.bundle, self.scorer, settings.detection.to_core())
        self.decoder = Decoder(self.bundle.features, settings.input)
        self.metrics = metrics if metrics is not None else Metrics()  # process_* (RSS, CPU, fds) included
        self.health = health if health is not None else Health(stall_after_s=max(30.0, 10 * rt.max_wait_ms / 1000))
        check_broker(settings, [*settings.kafka.topics, settings.kafka.alerts_topic, settings.kafka.dlq_topic])
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
        self._executor: ThreadPoolExecutor | None = None

    def stop(self) -> None:
        """Ask the loop to finish the current batch, deliver, commit and close (signal-safe)."""
        self._stop.set()

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
            self._sink = sink = KafkaSink(self.settings)
            stack.callback(sink.close, rt.shutdown_grace_s)
            self._source = source = KafkaSource(self.settings, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)
            stack.callback(source.close)
            self._executor = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="sd-inference"))
            if rt.metrics_port is not None:
                stack.enter_context(MetricsServer(self.metrics, self.health, port=rt.metrics_port))
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
                    n = rt.max_batch if max_messages is None else min(rt.max_batch, max_messages - self.stats.consumed)
                    msgs = source.consume(n, rt.max_wait_ms / 1000)
                    if msgs and self.stats.first_message_s is None:
                        self.stats.first_message_s = time.monotonic() - t0
                    if source.rebalanced:  # drop anything fetched for partitions we no longer own
                        source.rebalanced = False
                        msgs = [m for m in msgs if (m.topic(), m.partition()) in source.assignment]
                    work = self._decode(msgs) if msgs else None
                    previous, self._pending = self._pending, None
                    result = previous.future.result() if previous and previous.future else None
                    self._between_batches()  # the inference thread is idle here
                    if work is not None:
                        self._submit(work)
                    if previous is not None:
                        self._deliver(previous, result)
                    if rt.max_inflight == 1 and self._pending is not None:
                        self._drain()
                    if time.monotonic() >= next_commit:
                        self._commit()
                        next_commit = time.monotonic() + rt.commit_interval_s
                self.health.stopping()
                self.notifier.stopping(f"draining: finishing the batch, delivering, committing (grace {rt.shutdown_grace_s:g} s)")
                self._drain()
                self._commit()
            finally:
                self.stats.elapsed_s = time.monotonic() - t0
                if self._pending is not None and self._pending.future is not None:
                    self._pending.future.cancel()  # an error path: this batch is neither delivered nor stored
                self._pending = None
        return self.stats

    def _decode(self, msgs: list[Any]) -> _Work:
        positions: dict[tuple[str, int], int] = {}
        by_topic: Counter = Counter()
        for m in msgs:  # messages of a partition arrive in offset order; the last one wins
            positions[(m.topic(), m.partition())] = m.offset() + 1
            by_topic[m.topic()] += 1
        batch, dead = self.decoder.decode(msgs)
        self.stats.consumed += len(msgs)
        self.stats.decoded += batch.n
        self.stats.dead_letters += len(dead)
        times = batch.event_time_ms[batch.event_time_ms != NO_TIME]
        return _Work(positions, dead, len(msgs), dict(by_topic), batch, oldest_event_ms=int(times.min()) if times.size else None)

    def _submit(self, work: _Work) -> None:
        batch, work.batch = work.batch, None
        work.started = time.monotonic()
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
        for d in work.dead:
            log.warning("dead letter %s[%d]@%d: %s (%s)", d.message.topic(), d.message.partition(), d.message.offset(), d.reason, d.detail)
            sink.dead_letter(d)
        alerts = result.alerts if result is not None else []
        for a in alerts:
            sink.alert(a["key"], orjson.dumps(a, option=orjson.OPT_SERIALIZE_NUMPY))
        try:
            sink.flush(self.settings.runtime.shutdown_grace_s if self._stop.is_set() else 60.0)
        except KafkaIOError:
            self.metrics.delivery_failed()
            raise
        positions = work.positions if not exclude else {tp: o for tp, o in work.positions.items() if tp not in exclude}
        source.store(positions)
        # bookkeeping after the guarantees are met
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

    def _commit(self) -> None:
        if self._source is not None:
            self._source.commit()
            self.stats.commits += 1
            self.metrics.committed()

    # ------------------------------------------------------------------ rebalance (inside consume)
    def _on_assign(self, partitions: list[Any]) -> None:
        self.health.assigned((tp.topic, tp.partition) for tp in partitions)
        self._notify_ready()

    # ------------------------------------------------------------------ operations hooks
    def _build_scorer(self, bundle: Bundle) -> Scorer:
        model, rt = self.settings.model, self.settings.runtime
        return Scorer(bundle, provider=model.provider, require_cuda=model.require_cuda, max_batch=rt.max_batch)

    def _notify_ready(self) -> None:
        """READY=1 after the first assignment (systemd Type=notify), then STATUS on every change."""
        n = len(self._source.assignment) if self._source is not None else 0
        status = f"model {self.bundle.model_version} on {self.scorer.provider}, {n} partition(s) assigned"
        if not self._ready_sent:
            self._ready_sent = True
            self.notifier.ready(status)
        else:
            self.notifier.status(status)

    def _ops_tick(self, running_s: float) -> None:
        self.notifier.watchdog()
        if not self._ready_sent and running_s > 60.0:  # joined, but the group gave us nothing to do
            self._notify_ready()

    def _between_batches(self) -> None:
        """Swap in a reloaded model and refresh state metrics; only here is the core not in use."""
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
        self.bundle, self.scorer = loaded.bundle, loaded.scorer
        self.health.model_loaded(loaded.bundle.model_version)
        self.metrics.set_model(loaded.bundle.model_version, loaded.scorer.provider, loaded.bundle.window, loaded.bundle.n_features)
        log.info("model %s replaced by %s; alerts from the next batch on carry the new version", old, loaded.bundle.model_version)
        self._notify_ready()

    def _on_revoke(self, partitions: list[Any]) -> None:
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        try:
            self._drain()
            self._commit()
        finally:
            self._drop(revoked)

    def _on_lost(self, partitions: list[Any]) -> None:
        lost = {(tp.topic, tp.partition) for tp in partitions}
        try:
            self._drain(exclude=lost)  # alerts still go out (deterministic ids); offsets of lost partitions do not
        finally:
            self._drop(lost)

    def _drop(self, gone: set[tuple[str, int]]) -> None:
        # The core keys state by partition number: drop a number only when no input topic keeps it.
        keep = {p for (t, p) in (self._source.assignment if self._source else set()) if (t, p) not in gone}
        dropped = self.core.drop_partitions(sorted({p for _, p in gone} - keep))
        self.health.revoked(gone)
        self.metrics.drop_partitions(gone)
        log.info("dropped state of %d entities on %d partition(s)", dropped, len(gone))


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
    except (ConfigError, BundleError, ScorerError) as e:
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
