"""Prometheus metrics of the online service, all defined here, and the HTTP server that exposes
them together with the health probes.

The loop never touches prometheus-client objects directly: it calls the few methods of `Metrics`
(one per thing it has just done), so metric names, labels and buckets live in one place and the
list in docs/operations.md can be checked against `Metrics.names()`.

Every metric goes into the `Metrics` object's own `CollectorRegistry` (not the process-global
default), so tests and several detectors in one process do not collide. Process metrics (resident
memory, CPU seconds, open fds) come from prometheus-client's `ProcessCollector`.

`MetricsServer` serves, on one port:
  /metrics   the registry in the text format (OpenMetrics when the scraper asks for it)
  /healthz   200 "ok" while the loop ticks, else 503 and the reason (health.Health.liveness)
  /readyz    200 "ok" when partitions are assigned, the model is loaded and the broker is reachable,
             else 503 and the reasons (health.Health.readiness)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder

from stream_detector.ingest.decode import BAD_CONTROL_RECORD, INPUT_REASONS

if TYPE_CHECKING:
    from stream_detector.service.health import Health

log = logging.getLogger(__name__)

PREFIX = "stream_detector"
THRESHOLD_QUANTILES = (0.5, 0.9, 0.99, 1.0)
# Inference of one micro-batch: ~0.1 ms (tiny batch on a GPU) to seconds (a 16k batch on 2 CPU cores).
INFERENCE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Event time to alert: dominated by the batch wait and by how late producers send.
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
BATCH_SIZE_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
FILL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


class Metrics:
    """All metrics of one detector process. Methods are cheap: a few counter increments per batch."""

    def __init__(self, registry: CollectorRegistry | None = None, process_metrics: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r, p = self.registry, PREFIX
        if process_metrics:
            ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
            PlatformCollector(registry=r)  # python_info

        self.events_consumed = Counter(f"{p}_events_consumed", "Kafka messages consumed", ["topic"], registry=r)
        self.events_decoded = Counter(f"{p}_events_decoded", "messages decoded into observations", registry=r)
        self.events_dead_lettered = Counter(
            f"{p}_events_dead_lettered", "messages sent to the dead-letter topic, by reason", ["reason"], registry=r
        )
        self.windows_scored = Counter(f"{p}_windows_scored", "windows scored by the model", registry=r)
        self.batches = Counter(f"{p}_batches", "consumed batches processed", registry=r)
        self.batch_size = Histogram(
            f"{p}_batch_size", "messages per consumed batch", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_fill_ratio = Histogram(
            f"{p}_batch_fill_ratio", "consumed batch size / configured max batch", buckets=FILL_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            f"{p}_inference_seconds", "model inference time per micro-batch", buckets=INFERENCE_BUCKETS, registry=r
        )
        self.end_to_end_lag = Histogram(
            f"{p}_end_to_end_lag_seconds",
            "event time of the triggering event to the alert being published",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.event_lag = Gauge(
            f"{p}_event_lag_seconds", "wall clock minus event time of the oldest event in the last batch", registry=r
        )
        self.consumer_lag = Gauge(
            f"{p}_consumer_lag_messages",
            "high watermark minus position, per assigned partition",
            ["topic", "partition"],
            registry=r,
        )
        self.alerts = Counter(f"{p}_alerts", "alert events published, by state", ["state"], registry=r)
        # the shadow candidate (service/shadow.py), labelled by its model version
        self.shadow_alerts = Counter(
            f"{p}_shadow_alerts", "the shadow model's alert events, by state", ["model_version", "state"], registry=r
        )
        self.shadow_open_alerts = Gauge(
            f"{p}_shadow_open_alerts", "entities in an open shadow alert", ["model_version"], registry=r
        )
        self.shadow_skipped = Counter(
            f"{p}_shadow_skipped_batches",
            "batches the shadow model did not score because it was behind (it never holds up live alerts)",
            ["model_version"],
            registry=r,
        )
        self.shadow_inference = Histogram(
            f"{p}_shadow_inference_seconds", "the shadow model's time per batch", ["model_version"], registry=r
        )
        self.alerts_silenced = Counter(
            f"{p}_alerts_silenced", "alert events published marked silenced (never sent to Alertmanager)", registry=r
        )
        self.alertmanager_pending = Gauge(
            f"{p}_alertmanager_pending", "alert events not yet accepted by every Alertmanager", registry=r
        )
        self.feedback_applied = Counter(
            f"{p}_feedback_false_positives", "false-positive verdicts applied to an entity's threshold", registry=r
        )
        self.open_alerts = Gauge(f"{p}_open_alerts", "entities currently in an open alert", registry=r)
        self.tracked_entities = Gauge(f"{p}_tracked_entities", "entities with window state in memory", registry=r)
        self.evictions = Counter(f"{p}_evictions", "entities evicted (entity cap or idle)", ["cause"], registry=r)
        self.window_restarts = Counter(
            f"{p}_window_restarts",
            "entity windows started again after a time gap (not scored for W - 1 events)",
            registry=r,
        )
        self.threshold = Gauge(
            f"{p}_threshold", "quantiles of the current per-entity thresholds", ["quantile"], registry=r
        )
        self.paused_partitions = Gauge(f"{p}_paused_partitions", "partitions paused for backpressure", registry=r)
        self.offsets_committed = Counter(f"{p}_offsets_committed", "offset commits that succeeded", registry=r)
        self.delivery_errors = Counter(
            f"{p}_delivery_errors", "alert or dead-letter records the broker rejected", registry=r
        )
        self.model = Info(f"{p}_model", "the active model and execution provider", registry=r)
        self.model_reloads = Counter(f"{p}_model_reloads", "model hot reloads, by result", ["result"], registry=r)
        self.loop_last_tick = Gauge(
            f"{p}_loop_last_tick_timestamp_seconds", "unix time of the main loop's last iteration", registry=r
        )
        self.ready = Gauge(f"{p}_ready", "1 when /readyz answers ok", registry=r)
        # so a fresh process exposes 0 rather than nothing, and rate() sees the first one
        for state in ("open", "update", "resolved"):
            self.alerts.labels(state)
        for reason in (*INPUT_REASONS, BAD_CONTROL_RECORD):
            self.events_dead_lettered.labels(reason)
        self.evictions.labels("idle")
        for result in ("ok", "failed"):
            self.model_reloads.labels(result)

    # ---- called by the loop ------------------------------------------------------------------
    def observe_batch(
        self,
        *,
        consumed_by_topic: Mapping[str, int],
        decoded: int,
        dead_lettered: Mapping[str, int] | None = None,
        scored: int,
        max_batch: int,
        inference_s: float | None = None,
        oldest_event_time_ms: int | None = None,
        now_ms: int | None = None,
    ) -> None:
        """One consumed batch: how many messages came from each topic, how many decoded, how many
        went to the DLQ by reason, how many windows were scored, and how long inference took."""
        total = 0
        for topic, n in consumed_by_topic.items():
            if n:
                self.events_consumed.labels(topic).inc(n)
                total += n
        if decoded:
            self.events_decoded.inc(decoded)
        for reason, n in (dead_lettered or {}).items():
            if n:
                self.events_dead_lettered.labels(reason).inc(n)
        if scored:
            self.windows_scored.inc(scored)
        self.batches.inc()
        self.batch_size.observe(total)
        if max_batch > 0:
            self.batch_fill_ratio.observe(min(1.0, total / max_batch))
        if inference_s is not None:
            self.inference_seconds.observe(inference_s)
        if oldest_event_time_ms is not None and now_ms is not None:
            self.event_lag.set(max(0.0, (now_ms - oldest_event_time_ms) / 1000.0))

    def observe_alert(self, state: str, event_time_ms: int | None, published_ms: int) -> None:
        self.alerts.labels(state).inc()
        if event_time_ms is not None:
            self.end_to_end_lag.observe(max(0.0, (published_ms - event_time_ms) / 1000.0))

    def set_consumer_lag(self, lags: Mapping[tuple[str, int], int]) -> None:
        for (topic, partition), lag in lags.items():
            self.consumer_lag.labels(topic, str(partition)).set(max(0, lag))

    def drop_partitions(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Partitions revoked or lost: their lag series disappear instead of freezing at a stale value."""
        for topic, partition in partitions:
            try:
                self.consumer_lag.remove(topic, str(partition))
            except KeyError:
                pass

    def set_state(self, *, tracked_entities: int, open_alerts: int, paused_partitions: int = 0) -> None:
        self.tracked_entities.set(tracked_entities)
        self.open_alerts.set(open_alerts)
        self.paused_partitions.set(paused_partitions)

    def evicted(self, n: int, cause: str = "idle") -> None:
        if n:
            self.evictions.labels(cause).inc(n)

    def restarted_windows(self, n: int) -> None:
        if n:
            self.window_restarts.inc(n)

    def set_thresholds(self, values: np.ndarray) -> None:
        """Current per-entity thresholds; exposed as a few quantiles, not one series per entity."""
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            return
        for q, v in zip(THRESHOLD_QUANTILES, np.quantile(values, THRESHOLD_QUANTILES)):
            self.threshold.labels(f"{q:g}").set(float(v))

    def set_model(self, model_version: str, provider: str, window: int, n_features: int) -> None:
        self.model.info(
            {"model_version": model_version, "provider": provider, "window": str(window), "features": str(n_features)}
        )

    def reload_result(self, ok: bool) -> None:
        self.model_reloads.labels("ok" if ok else "failed").inc()

    def committed(self) -> None:
        self.offsets_committed.inc()

    def delivery_failed(self, n: int = 1) -> None:
        self.delivery_errors.inc(n)

    def tick(self, now_s: float) -> None:
        self.loop_last_tick.set(now_s)

    def track_readiness(self, health: Health) -> None:
        """Make `stream_detector_ready` follow the health object at scrape time."""
        self.ready.set_function(lambda: 1.0 if health.readiness().ok else 0.0)

    def names(self) -> list[str]:
        """Metric family names as a scraper sees them (counters with their _total suffix)."""
        suffix = {"counter": "_total", "info": "_info"}
        return sorted(f"{family.name}{suffix.get(family.type, '')}" for family in self.registry.collect())

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class MetricsServer:
    """/metrics, /healthz and /readyz on one port, served from a daemon thread.

    `port=0` binds a free port (tests); `.port` tells which. `stop()` shuts the server down and
    closes the socket."""

    def __init__(self, metrics: Metrics, health: Health | None = None, host: str = "0.0.0.0", port: int = 9464) -> None:
        self.metrics = metrics
        self.health = health
        if health is not None:
            metrics.track_readiness(health)
        handler = _make_handler(metrics, health)
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {host}:{port} ({e.strerror}).") from None
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics, /healthz and /readyz on port %d", self.port)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _make_handler(metrics: Metrics, health: Health | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "stream-detector"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, ctype = metrics.exposition(self.headers.get("Accept", ""))
                self._send(200, body, ctype)
            elif path in ("/healthz", "/readyz"):
                if health is None:
                    self._send(200, b"ok\n")
                    return
                status = health.liveness() if path == "/healthz" else health.readiness()
                self._send(200 if status.ok else 503, (status.text() + "\n").encode())
            elif path == "/":
                self._send(200, b"stream-detector: /metrics /healthz /readyz\n")
            else:
                self._send(404, b"not found; try /metrics, /healthz or /readyz\n")

        def do_HEAD(self) -> None:  # noqa: N802
            self._head_only = True
            self.do_GET()

        def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not getattr(self, "_head_only", False):
                self.wfile.write(body)

        def log_message(
            self, format: str, *args: object
        ) -> None:  # scrapes every few seconds: keep them out of the log
            log.debug("http %s", format % args)

    return Handler
