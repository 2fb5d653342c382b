"""The service's Kafka consumer: a consumer-group source with manual offset storing. The producer
(alerts, dead letters, changelog) is kafka_sink.py's `KafkaSink`.

Offset rule (DESIGN.md "no silent loss"): the source never stores an offset by itself
(`enable.auto.offset.store=false`, `enable.auto.commit=false`); the service calls `store()` only
after every alert and dead letter of the batch was acknowledged (`KafkaSink.flush()`), and
`commit()` on an interval, on revoke and at shutdown. Stored offsets only move forward. When to
store and commit is checkpoint.py's; the clients' settings come from kafka_config.py.

librdkafka callbacks never raise (an exception there is lost or corrupts the client): the delivery
callback records the first error and the loop raises it at the next `flush()`/`raise_if_failed()`.
Both clients report to a `BrokerWatch` (brokerwatch.py: error callback, consumer statistics, failed
and successful commits) for `/readyz`. Fenced by another process with the same instance id (static
membership's `group.instance.id`, or the transactional id): `MemberFenced`, which `run` ends with
exit 2 so that a supervisor does not restart it into fencing the other one in turn.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from stream_detector.config import Settings
from stream_detector.ingest.kafka_config import consumer_config, producer_config
from stream_detector.service.broker_check import NEW_TOPIC_GRACE_S, check_broker
from stream_detector.service.brokerwatch import BrokerWatch
from stream_detector.service.kafka_errors import (
    DeliveryError,
    KafkaIOError,
    MemberFenced,
    TransactionAborted,
    fenced,
    is_fenced,
)
from stream_detector.service.kafka_sink import DeliveryTicket, KafkaSink, client_log

log = logging.getLogger(__name__)

PartitionsCallback = Callable[[list[TopicPartition]], None]

__all__ = [  # the producer, the errors and the broker check live in modules of their own; importers find them here too
    "NEW_TOPIC_GRACE_S",
    "DeliveryError",
    "DeliveryTicket",
    "KafkaIOError",
    "KafkaSink",
    "KafkaSource",
    "MemberFenced",
    "TransactionAborted",
    "check_broker",
    "consumer_config",
    "producer_config",
]


class KafkaSource:
    """Consumer in a group: `consume(n, timeout)` batches, manual offset store, interval commits."""

    def __init__(
        self,
        settings: Settings,
        on_assign: PartitionsCallback | None = None,
        on_revoke: PartitionsCallback | None = None,
        on_lost: PartitionsCallback | None = None,
        watch: BrokerWatch | None = None,
    ) -> None:
        self._settings = settings
        self._on_assign_cb, self._on_revoke_cb, self._on_lost_cb = on_assign, on_revoke, on_lost
        self._watch = watch
        conf = consumer_config(settings)
        conf.update({"error_cb": self._on_error, "logger": client_log})
        if watch is not None:
            conf["stats_cb"] = watch.on_stats
        self._consumer = Consumer(conf)
        self._stored: dict[tuple[str, int], int] = {}  # next offset to read, per partition, as stored
        self.assignment: set[tuple[str, int]] = set()
        self.rebalanced = False  # set by the callbacks; the loop clears it after a consume
        self._fatal: KafkaError | None = None
        self._consumer.subscribe(
            list(settings.kafka.topics), on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    # -- callbacks (run inside consume(); they must not raise into librdkafka) -----------------
    def _on_error(self, err: KafkaError) -> None:
        if self._watch is not None:
            self._watch.on_error(err)
        if err.fatal():
            self._fatal = err
            log.error("fatal Kafka consumer error: %s", err)
        else:
            log.warning("Kafka consumer: %s", err)

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.rebalanced = True
        # Assign now (cooperative: incremental) so the callback may pause the partitions before the
        # first fetch (state restore); confluent-kafka skips its own assign when we did it.
        self._consumer.incremental_assign(partitions)
        self.assignment |= {(tp.topic, tp.partition) for tp in partitions}
        log.info("assigned %s", _fmt(partitions))
        if self._on_assign_cb:
            self._guard(self._on_assign_cb, partitions, "assign")

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.rebalanced = True
        log.info("revoked %s", _fmt(partitions))
        try:
            if self._on_revoke_cb:
                self._guard(self._on_revoke_cb, partitions, "revoke")
        finally:
            self._forget(partitions)

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.rebalanced = True
        log.warning("lost %s (their offsets are not committed)", _fmt(partitions))
        try:
            if self._on_lost_cb:
                self._guard(self._on_lost_cb, partitions, "lost")
        finally:
            self._forget(partitions)

    def _guard(self, cb: PartitionsCallback, partitions: list[TopicPartition], what: str) -> None:
        try:
            cb(partitions)
        except BaseException as e:  # remembered and re-raised by consume(), outside librdkafka
            log.error("the %s handler failed: %s", what, e)
            self._callback_error = e

    def _forget(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self.assignment.discard((tp.topic, tp.partition))
            self._stored.pop((tp.topic, tp.partition), None)

    # -- the hot path --------------------------------------------------------------------------
    _callback_error: BaseException | None = None

    def consume(self, n: int, timeout: float) -> list[Any]:
        """Up to n messages within timeout seconds; partition EOF skipped, errors logged or raised."""
        batch = self._consumer.consume(num_messages=n, timeout=timeout)
        if self._callback_error is not None:
            failure, self._callback_error = self._callback_error, None
            raise failure
        if self._fatal is not None:
            if is_fenced(self._fatal):
                raise fenced(self._settings, "the group membership", self._fatal)
            raise KafkaIOError(f"the Kafka consumer hit a fatal error: {self._fatal.str()}.")
        if not batch or all(m.error() is None for m in batch):
            return batch
        good: list[Any] = []
        for m in batch:
            err = m.error()
            if err is None:
                good.append(m)
            elif err.code() == KafkaError._PARTITION_EOF:
                continue
            elif is_fenced(err):  # a static member replaced by a newer one: librdkafka's `_FATAL` message error
                raise fenced(self._settings, "the group membership", err)
            elif err.fatal() or err.code() == KafkaError._FATAL:
                raise KafkaIOError(
                    f"the Kafka consumer hit a fatal error on {m.topic()}[{m.partition()}]: {err.str()}."
                )
            else:
                log.warning("consume error on %s[%s]: %s", m.topic(), m.partition(), err.str())
        return good

    def store(self, positions: dict[tuple[str, int], int]) -> None:
        """Store next-offset-to-read per (topic, partition) after the batch was fully delivered.
        Positions of partitions no longer assigned are ignored (they were revoked or lost)."""
        tps = []
        for (topic, partition), offset in positions.items():
            if (topic, partition) not in self.assignment:
                continue
            prev = self._stored.get((topic, partition), -1)
            if offset <= prev:
                raise AssertionError(f"stored offsets must only move forward: {topic}[{partition}] {prev} -> {offset}")
            self._stored[(topic, partition)] = offset
            tps.append(TopicPartition(topic, partition, offset))
        if tps:
            self._consumer.store_offsets(offsets=tps)

    def commit(self, positions: dict[tuple[str, int], int] | None = None) -> bool:
        """Commit the stored offsets (or these next-offsets per partition) synchronously; a no-op
        when there is nothing new. A broker that is away (coordinator unavailable, timeout) is not
        fatal: the offsets stay stored and the next commit carries them; returns False then.
        KafkaIOError on anything else."""
        if positions is not None and not positions:
            return True
        try:
            if positions is None:
                self._consumer.commit(asynchronous=False)
            else:
                self._consumer.commit(
                    offsets=[TopicPartition(t, p, o) for (t, p), o in positions.items()], asynchronous=False
                )
        except KafkaException as e:
            err = e.args[0]
            if err.code() == KafkaError._NO_OFFSET:
                return True
            if is_fenced(err):
                raise fenced(self._settings, "committing offsets", err) from None
            if err.fatal():
                raise KafkaIOError(f"committing offsets failed: {err.str()}.") from None
            log.warning("committing offsets failed (%s); they stay stored and go with the next commit", err.str())
            if self._watch is not None:
                self._watch.failed(f"committing offsets failed: {err.str()}")
            return False
        if self._watch is not None:
            self._watch.reachable()
        return True

    # -- flow control, rewind, transactions --------------------------------------------------
    def pause(self, tps: Iterable[tuple[str, int]]) -> None:
        owned = [TopicPartition(t, p) for t, p in tps if (t, p) in self.assignment]
        if owned:
            self._consumer.pause(owned)

    def resume(self, tps: Iterable[tuple[str, int]]) -> None:
        owned = [TopicPartition(t, p) for t, p in tps if (t, p) in self.assignment]
        if owned:
            self._consumer.resume(owned)

    def committed_offsets(self, tps: Iterable[tuple[str, int]], timeout: float = 30.0) -> dict[tuple[str, int], int]:
        """Committed next-offset per partition (negative = none committed). In exactly-once mode
        (read_committed) the broker answers only once no transaction holds pending offsets."""
        want = [TopicPartition(t, p) for t, p in tps]
        if not want:
            return {}
        try:
            got = self._consumer.committed(want, timeout=timeout)
        except KafkaException as e:
            raise KafkaIOError(f"reading the committed offsets failed: {e.args[0].str()}.") from None
        return {(tp.topic, tp.partition): tp.offset for tp in got}

    def rewind(self, tps: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Seek partitions back to their committed offsets (after an aborted transaction) and forget
        what was stored for them; returns the offsets sought to (negative = reset policy)."""
        from confluent_kafka import OFFSET_BEGINNING, OFFSET_END

        tps = [tp for tp in tps if tp in self.assignment]
        committed = self.committed_offsets(tps)
        reset = OFFSET_BEGINNING if self._settings.kafka.auto_offset_reset == "earliest" else OFFSET_END
        for (t, p), off in committed.items():
            self._consumer.seek(TopicPartition(t, p, off if off >= 0 else reset))
            self._stored.pop((t, p), None)
        return committed

    def seek(self, tp: tuple[str, int], offset: int) -> None:
        try:
            self._consumer.seek(TopicPartition(tp[0], tp[1], offset))
        except KafkaException as e:  # never continue past messages we dropped
            raise KafkaIOError(f"seeking {tp[0]}[{tp[1]}] back to offset {offset} failed: {e.args[0].str()}.") from None

    def group_metadata(self) -> Any:
        return self._consumer.consumer_group_metadata()

    def committed(self, timeout: float = 10.0) -> dict[tuple[str, int], int]:
        tps = [TopicPartition(t, p) for t, p in sorted(self.assignment)]
        return (
            {(tp.topic, tp.partition): tp.offset for tp in self._consumer.committed(tps, timeout=timeout)}
            if tps
            else {}
        )

    def lag(self) -> dict[tuple[str, int], int]:
        """Messages behind per assigned partition: high watermark (as of the last fetch, no broker
        round trip) minus the consumer's position; partitions without a known position are left out."""
        tps = [TopicPartition(t, p) for t, p in sorted(self.assignment)]
        out: dict[tuple[str, int], int] = {}
        for tp in self._consumer.position(tps) if tps else []:
            if tp.offset < 0:
                continue
            _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0:
                out[(tp.topic, tp.partition)] = max(0, high - tp.offset)
        return out

    def close(self) -> None:
        self._consumer.close()


def _fmt(partitions: Iterable[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"
