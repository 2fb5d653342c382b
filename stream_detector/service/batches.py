"""One consumed batch on its way through the loop (loop.py `Detector`), step by step:

    decode_work(decoder, msgs) -> Work     next offset per partition, decoded events, dead letters
    restrict(work, allowed) -> Work        after a rebalance: only the partitions still owned
    publish(sink, work, result, ticket)    its dead letters and alerts to the sink
    count_batch(stats, metrics, ...)       RunStats, Prometheus metrics, one log line per alert

None of these keeps state between batches: the loop holds the batches (forming, decoded, in
inference), checkpoint.py decides when their offsets are stored.
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import orjson

from stream_detector.core.events import NO_TIME, EventBatch
from stream_detector.core.pipeline import BatchResult
from stream_detector.ingest.decode import DeadLetter
from stream_detector.service.metrics import Metrics
from stream_detector.service.stats import RunStats

log = logging.getLogger(__name__)


@dataclass
class Work:
    """One consumed batch on its way through the loop."""

    positions: dict[tuple[str, int], int]  # next offset per (topic, partition), stored after delivery
    dead: list[DeadLetter]
    n_messages: int
    by_topic: dict[str, int]
    batch: EventBatch | None  # the decoded events, until submitted
    future: Future | None = None  # DetectorCore.process(batch) on the inference thread
    started: float = 0.0
    oldest_event_ms: int | None = None  # for the event-lag gauge
    seq: int = 0  # submit order (1, 2, ...)


def decode_work(decoder: Any, msgs: list[Any]) -> Work:
    """Messages (in consume order) -> a `Work` with the decoder's events and dead letters."""
    positions: dict[tuple[str, int], int] = {}
    by_topic: Counter = Counter()
    for m in msgs:  # messages of a partition arrive in offset order; the last one wins
        positions[(m.topic(), m.partition())] = m.offset() + 1
        by_topic[m.topic()] += 1
    batch, dead = decoder.decode(msgs)
    times = batch.event_time_ms[batch.event_time_ms != NO_TIME]
    return Work(
        positions, dead, len(msgs), dict(by_topic), batch, oldest_event_ms=int(times.min()) if times.size else None
    )


def restrict(work: Work, allowed: set[tuple[str, int]]) -> Work:
    """The part of a decoded batch that belongs to `allowed` partitions (after a rebalance)."""
    positions = {tp: o for tp, o in work.positions.items() if tp in allowed}
    if len(positions) == len(work.positions):
        return work
    dead = [d for d in work.dead if (d.message.topic(), d.message.partition()) in allowed]
    batch = work.batch
    if batch is not None and batch.n:
        idx = np.flatnonzero([(t, p) in allowed for t, p in zip(batch.topic, batch.partition.tolist())])
        batch = batch.take(idx)
    return Work(positions, dead, work.n_messages, work.by_topic, batch, oldest_event_ms=work.oldest_event_ms)


def publish(sink: Any, work: Work, result: BatchResult | None, ticket: Any) -> list[dict]:
    """Produce a processed batch's dead letters and alerts (kafka_sink.KafkaSink, counted by
    `ticket`); returns the alerts."""
    for d in work.dead:
        log.warning(
            "dead letter %s[%d]@%d: %s (%s)",
            d.message.topic(),
            d.message.partition(),
            d.message.offset(),
            d.reason,
            d.detail,
        )
        sink.dead_letter(d, ticket)
    alerts = result.alerts if result is not None else []
    for a in alerts:
        sink.alert(a["key"], orjson.dumps(a, option=orjson.OPT_SERIALIZE_NUMPY), ticket)
    return alerts


def count_batch(
    stats: RunStats,
    metrics: Metrics,
    work: Work,
    result: BatchResult | None,
    alerts: list[dict],
    inference_s: float,
    max_batch: int,
    published_ms: int,
) -> None:
    """The bookkeeping of a delivered batch (in exactly-once mode its transaction may still abort;
    the counts are then redone)."""
    for a in alerts:
        stats.alerts[a["state"]] += 1
        metrics.observe_alert(a["state"], iso_to_ms(a.get("event_time")), published_ms)
        log.info(
            "alert %s %s key=%s score=%.4g threshold=%.4g",
            a["state"],
            a["alert_id"][:12],
            a["key"],
            a["score"],
            a["threshold"],
        )
    if result is not None:
        metrics.evicted(result.evicted)
        metrics.restarted_windows(result.gap_restarts)
    scored = result.n_scored if result is not None else 0
    stats.scored += scored
    stats.batches += 1
    metrics.observe_batch(
        consumed_by_topic=work.by_topic,
        decoded=(result.n_events if result is not None else 0),
        dead_lettered=Counter(d.reason for d in work.dead),
        scored=scored,
        max_batch=max_batch,
        inference_s=inference_s if result is not None else None,
        oldest_event_time_ms=work.oldest_event_ms,
        now_ms=published_ms,
    )


def iso_to_ms(value: Any) -> int | None:
    if not isinstance(value, str):
        return None
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None
