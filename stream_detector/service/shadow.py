"""A shadow candidate: a second bundle scored on the same events as the live one, beside it, with its
own windows, thresholds and alert lifecycle, whose alerts go to a shadow topic only.

    [model] shadow_bundle = "/var/lib/stream-detector/models/candidate"
    [kafka] shadow_alerts_topic = "alerts.shadow"        # default: ALERTS_TOPIC.shadow

- **Same events:** every decoded batch the live model scores is handed to the shadow after the
  live submit, and the shadow scores it on its own thread. Its features must be the live model's
  (the decoder is shared); its window may differ.
- **Never delays live alerts:** the shadow has its own thread and its own producer, and at most
  `MAX_BEHIND` batches wait for it. A batch that arrives when it is further behind is skipped and
  counted (`stream_detector_shadow_skipped_batches_total`); the live path never waits for it.
- **Its alerts** are the service's alert events with `"shadow": true` and the candidate's
  `model_version`. They go to the shadow topic through a separate idempotent producer, never to
  the live alerts topic. Delivery is at-least-once, not tied to the input offsets: a restart, a
  rebalance or an aborted transaction can make it score events again.
- **State is not kept:** the shadow's windows and thresholds start cold after a restart or when a
  partition moves (no changelog), and it alerts again only after its warm-up. This is documented in
  docs/operations.md.
- **Metrics**, labelled by its model version: alert events by state, open alerts, skipped batches
  and inference time. `stream-detector compare` reads both alert topics for agreement and, given
  labels, recall and precision (offline/compare.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import orjson

from stream_detector.config import ConfigError, Settings
from stream_detector.core.bundle import Bundle, load_bundle
from stream_detector.core.events import EventBatch
from stream_detector.core.pipeline import DetectorCore
from stream_detector.core.scorer import Scorer
from stream_detector.ingest.kafka_config import client_config

if TYPE_CHECKING:
    from stream_detector.service.metrics import Metrics

log = logging.getLogger(__name__)
client_log = logging.getLogger("stream_detector.librdkafka")

MAX_BEHIND = 4  # batches waiting for the shadow before the next one is skipped


def shadow_topic(settings: Settings) -> str:
    return settings.kafka.shadow_topic()


def load_shadow(settings: Settings, live: Bundle) -> Bundle | None:
    """The shadow bundle, verified against the live one; None when none is configured."""
    if settings.model.shadow_bundle is None:
        return None
    shadow = load_bundle(settings.model.shadow_bundle)
    if tuple(shadow.features) != tuple(live.features):
        raise ConfigError(
            f"the shadow bundle {shadow.model_version} reads other features than the live model "
            f"{live.model_version}; a shadow must score the same events (same features in the same order)."
        )
    return shadow


class ShadowModel:
    def __init__(self, settings: Settings, bundle: Bundle, metrics: Metrics) -> None:
        from confluent_kafka import Producer

        self.bundle = bundle
        self.version = bundle.model_version
        self.topic = shadow_topic(settings)
        self.metrics = metrics
        scorer = Scorer.from_settings(bundle, settings)
        scorer.warm_up()
        try:
            self.core = DetectorCore(bundle, scorer, settings.detection.to_core())
        except ValueError as e:
            raise ConfigError(f"[detection] for the shadow bundle: {e}") from None
        self._producer = Producer({**client_config(settings, "producer"), "logger": client_log})
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sd-shadow")
        self._behind = 0
        self._closed = False
        self._lock = threading.Lock()
        self.failed: str | None = None  # the first error: the shadow stops, the live model goes on
        log.info("shadow model %s scores beside the live one; its alerts go to %s", self.version, self.topic)

    def submit(self, batch: EventBatch) -> None:
        """Hand a decoded batch over (after the live model got it); never blocks."""
        if self.failed is not None or batch.n == 0:
            return
        with self._lock:
            if self._behind >= MAX_BEHIND:
                self.metrics.shadow_skipped.labels(self.version).inc()
                return
            self._behind += 1
        self._executor.submit(self._score, batch)

    def drop_partitions(self, numbers: Sequence[int]) -> None:
        """A partition moved away: forget its entities, in order with the batches before it."""
        if not self._closed:  # closed first at shutdown; the consumer's last revoke comes after it
            self._executor.submit(self.core.drop_partitions, numbers)

    def close(self, timeout_s: float) -> None:
        self._closed = True
        self._executor.shutdown(wait=True)  # at most MAX_BEHIND batches are left to score
        left = self._producer.flush(timeout_s)
        if left:
            log.warning(
                "shadow model %s: %d alert events not delivered to %s at shutdown", self.version, left, self.topic
            )

    def _score(self, batch: EventBatch) -> None:
        try:
            t0 = time.perf_counter()
            result = self.core.process(batch)
            self.metrics.shadow_inference.labels(self.version).observe(time.perf_counter() - t0)
            for a in result.alerts:
                a["shadow"] = True
                self._producer.produce(
                    self.topic, key=a["key"], value=orjson.dumps(a, option=orjson.OPT_SERIALIZE_NUMPY)
                )
                self.metrics.shadow_alerts.labels(self.version, a["state"]).inc()
            self._producer.poll(0)
            _, open_alerts, _ = self.core.summary(max_thresholds=0)
            self.metrics.shadow_open_alerts.labels(self.version).set(open_alerts)
        except Exception as e:  # a shadow's failure must never reach the live path
            if self.failed is None:
                self.failed = f"{type(e).__name__}: {e}"
                log.error("shadow model %s stopped scoring: %s (the live model goes on)", self.version, self.failed)
        finally:
            with self._lock:
                self._behind -= 1
