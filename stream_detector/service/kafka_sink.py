"""The service's producer: one idempotent (in exactly-once mode transactional) producer for alerts,
dead letters and state changelog records, with delivery tracking (`DeliveryTicket`).

librdkafka callbacks never raise (an exception there is lost or corrupts the client): the delivery
callback records the first error and the loop raises it at the next `flush()`/`raise_if_failed()`.
A fatal error (confluent-kafka raises it out of produce, poll or flush) becomes one sentence; fenced
by a newer process with the same transactional id it is `MemberFenced`, which `run` ends with exit 2.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from stream_detector.config import Settings
from stream_detector.ingest.decode import DeadLetter, dead_letter_headers
from stream_detector.ingest.kafka_config import producer_config
from stream_detector.service.brokerwatch import BrokerWatch
from stream_detector.service.kafka_errors import (
    DeliveryError,
    KafkaIOError,
    MemberFenced,
    TransactionAborted,
    fenced,
    is_fenced,
)

log = logging.getLogger(__name__)
client_log = logging.getLogger("stream_detector.librdkafka")  # both clients log librdkafka here


class DeliveryTicket:
    """Counts one batch's alerts and dead letters until the broker acknowledged them all, so the
    loop stores the batch's offsets as soon as that happened, without a flush (at-least-once)."""

    __slots__ = ("pending", "failed", "_sink")

    def __init__(self, sink: KafkaSink) -> None:
        self.pending = 0
        self.failed = False
        self._sink = sink

    @property
    def done(self) -> bool:
        return self.pending == 0

    def hold(self) -> Callable[[], None]:
        """One more delivery this batch waits for outside Kafka (an Alertmanager post): the
        returned callback, called on the loop's thread once it is done, releases it."""
        self.pending += 1

        def release() -> None:
            self.pending -= 1

        return release

    def __call__(self, err: KafkaError | None, msg: Any) -> None:  # the delivery callback; never raises
        self.pending -= 1
        if err is not None:
            self.failed = True
        self._sink._on_delivery(err, msg)


class KafkaSink:
    """One idempotent producer for alerts (keyed by entity), dead letters (original bytes) and state
    changelog records. With a `transactional_id` (exactly-once mode) everything produced between
    two `commit_transaction` calls, plus the consumer offsets handed to it, commits atomically."""

    def __init__(
        self, settings: Settings, transactional_id: str | None = None, watch: BrokerWatch | None = None
    ) -> None:
        self._settings = settings
        self._watch = watch
        self._fenced: MemberFenced | None = None
        self._alerts_topic = settings.kafka.alerts_topic
        self._dlq_topic = settings.kafka.dlq_topic
        self._changelog_topic = settings.processing.changelog_topic_for(settings.kafka.group_id)
        self._timeout = settings.kafka.timeout_s
        conf = producer_config(settings)
        conf.update({"error_cb": self._on_error, "logger": client_log})
        self.transactional = transactional_id is not None
        if self.transactional:
            conf["transactional.id"] = transactional_id
            conf["transaction.timeout.ms"] = int(settings.processing.transaction_timeout_s * 1000)
        self._producer = Producer(conf)
        self._first_error: str | None = None
        self._in_txn = False
        self.delivered = 0
        if self.transactional:
            # Fences an earlier incarnation with the same id and aborts its open transaction.
            self._txn_call(
                lambda: self._producer.init_transactions(max(self._timeout, 30.0)), "initialising transactions"
            )

    def _on_error(self, err: KafkaError) -> None:
        if self._watch is not None:
            self._watch.on_error(err)
        if err.fatal():
            self._remember_if_fenced(err)
        if err.fatal() and self._first_error is None:
            self._first_error = f"the Kafka producer hit a fatal error: {err.str()}"
        log.warning("Kafka producer: %s", err)

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        # Never raise here: remember the first failure, the loop raises it.
        if err is None:
            self.delivered += 1
        elif self._first_error is None and not self.transactional:
            self._first_error = f"delivery to {msg.topic()} failed: {err.str()}"
        elif self.transactional:  # the transaction turns abortable; commit_transaction reports it
            log.warning("delivery to %s failed inside a transaction: %s", msg.topic(), err.str())

    def _produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, str | bytes | None]] | None,
        partition: int | None = None,
        ticket: DeliveryTicket | None = None,
        poll: bool = True,
    ) -> None:
        """Produce one record, waiting for room in the bounded local queue; `poll`: serve delivery
        reports right after (a caller producing many records at once polls once at the end)."""
        if self.transactional and not self._in_txn:
            self._txn_call(self._producer.begin_transaction, "beginning a transaction")
            self._in_txn = True
        kwargs: dict[str, Any] = {} if partition is None else {"partition": partition}
        callback: Callable[[Any, Any], None] = self._on_delivery if ticket is None else ticket
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=callback, **kwargs)
                if ticket is not None:
                    ticket.pending += 1
                break
            except BufferError:  # local queue full (bounded): serve delivery reports and retry
                self._serve(0.05)
            except KafkaException as e:  # the producer hit a fatal error (e.g. fenced): say why, in one sentence
                raise self._fatal_produce_error(topic, e) from None
        if poll:
            self._serve(0)

    def _fatal_produce_error(self, topic: str, e: KafkaException) -> KafkaIOError:
        # After a fatal error `produce` only says "Local: Fatal error"; librdkafka queues the cause
        # (e.g. fenced by a newer transactional producer) for the next poll, which raises it.
        if self._fenced is None:
            try:
                self._serve(0)
            except KafkaIOError as cause:
                return cause
        return self._client_error(e, f"producing to {topic}")

    def _serve(self, timeout: float) -> None:
        """Serve delivery reports; a fatal error confluent-kafka raises here becomes one sentence."""
        try:
            self._producer.poll(timeout)
        except (KafkaException, SystemError) as e:
            raise self._client_error(e, "serving delivery reports") from None

    def _client_error(self, e: Exception, what: str) -> KafkaIOError:
        """The sentence for a fatal error that confluent-kafka raised out of produce/poll/flush.
        A delivery callback that touches its message while that error is pending turns it into a
        SystemError caused by the KafkaException; a bare SystemError, or produce's bare "Fatal
        error", means the cause itself was lost (`_producer_fatal_error` recovers it)."""
        cause = e if isinstance(e, KafkaException) else e.__cause__
        err: KafkaError | None
        if isinstance(cause, KafkaException):
            err = cause.args[0]
        elif isinstance(e, SystemError) and cause is None:
            err = None
        else:
            raise e
        if err is None or err.code() == KafkaError._FATAL:
            err = self._producer_fatal_error() or err
        if err is None:
            return KafkaIOError(
                f"{what}: the Kafka producer hit a fatal error that confluent-kafka did not keep ({e}); "
                "the librdkafka log line before this one names it."
            )
        kept = self._remember_if_fenced(err)
        if kept is not None:
            return kept
        return KafkaIOError(f"{what}: the Kafka producer hit a fatal error: {err.str().rstrip('.')}.")

    def _producer_fatal_error(self) -> KafkaError | None:
        """The producer's fatal error, asked again. confluent-kafka raises a fatal error from inside
        its error callback without keeping it, so a later callback of the same poll/flush (a
        librdkafka log line) can clear it: the call then fails with a bare SystemError ("returned
        NULL without setting an exception") and later produce calls only say "Fatal error". A
        transactional producer still holds the cause: `begin_transaction` returns it once the
        producer is in its fatal state (otherwise it is a state error inside a transaction, or it
        begins the next one: harmless). None for an idempotent producer, which has no such call."""
        if not self.transactional:
            return None
        try:
            self._producer.begin_transaction()
            self._in_txn = True
        except KafkaException as e:
            if e.args[0].fatal():
                return e.args[0]
        return None

    def _remember_if_fenced(self, err: KafkaError) -> MemberFenced | None:
        """Keep the first fenced error (raised from then on by `raise_if_failed`); the one kept."""
        if self._fenced is None and is_fenced(err):
            self._fenced = fenced(self._settings, "the transactional producer", err)
        return self._fenced

    def ticket(self) -> DeliveryTicket:
        return DeliveryTicket(self)

    def alert(self, key: str, payload: bytes, ticket: DeliveryTicket | None = None) -> None:
        self._produce(self._alerts_topic, key.encode("utf-8"), payload, None, ticket=ticket)

    def dead_letter(self, d: DeadLetter, ticket: DeliveryTicket | None = None) -> None:
        m = d.message
        self._produce(self._dlq_topic, m.key(), m.value(), dead_letter_headers(d), ticket=ticket)

    def poll(self, timeout: float = 0.0) -> None:
        """Serve delivery reports (tickets count down); DeliveryError if a record failed."""
        self._serve(timeout)
        self.raise_if_failed()

    def changelog(self, partition: int, key: str, value: bytes | None, ticket: DeliveryTicket | None = None) -> None:
        self._produce(self._changelog_topic, key.encode("utf-8"), value, None, partition=partition, ticket=ticket)

    def changelog_records(self, records: Sequence[Any], ticket: DeliveryTicket) -> int:
        """Produce state records (`changelog.ChangelogRecord`: partition, key, value) counted by
        `ticket`, serving delivery reports once at the end rather than after each record (a sliced
        checkpoint makes thousands per second); returns the bytes produced."""
        size = 0
        for r in records:
            self._produce(
                self._changelog_topic,
                r.key.encode("utf-8"),
                r.value,
                None,
                partition=r.partition,
                ticket=ticket,
                poll=False,
            )
            size += len(r.value) if r.value is not None else 0
        self._serve(0)
        return size

    def raise_if_failed(self) -> None:
        if self._fenced is not None:
            raise self._fenced
        if self._first_error is not None:
            raise DeliveryError(self._first_error + ".")

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything produced so far is acknowledged; DeliveryError if a record failed
        (librdkafka retries until `message.timeout.ms`, so a broker outage shorter than that is
        ridden out) or, with a `timeout` (shutdown), if records are still unacknowledged then."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self._producer) > 0:
            try:
                self._producer.flush(1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic())))
            except (KafkaException, SystemError) as e:
                raise self._client_error(e, "waiting for acknowledgements") from None
            self.raise_if_failed()
            if deadline is not None and time.monotonic() >= deadline and len(self._producer) > 0:
                raise DeliveryError(
                    f"{len(self._producer)} alert/dead-letter record(s) were not acknowledged within {timeout:g} s."
                )
        self.raise_if_failed()

    # -- exactly-once ----------------------------------------------------------------------------
    def commit_transaction(
        self, offsets: dict[tuple[str, int], int], group_metadata: Any, timeout: float | None = None
    ) -> None:
        """Add the consumer offsets to the open transaction and commit it. Retriable errors (broker
        away, timeout) are retried until `timeout` (None: until it works or turns abortable/fatal).
        Raises TransactionAborted after aborting on an abortable error, KafkaIOError when fatal
        (e.g. fenced by a newer incarnation: the supervisor restarts the process)."""
        if not self._in_txn:
            if not offsets:
                return
            self._txn_call(self._producer.begin_transaction, "beginning a transaction")
            self._in_txn = True
        tps = [TopicPartition(t, p, o) for (t, p), o in sorted(offsets.items())]
        deadline = None if timeout is None else time.monotonic() + timeout
        if tps:
            # Not retried: librdkafka 2.16 can block forever in a repeated send_offsets_to_transaction
            # once the group coordinator went away (librdkafka issue #5456, timeout ignored). A failure
            # aborts instead; the caller rewinds and redoes the batch, so nothing is lost.
            self._retrying(
                lambda: self._producer.send_offsets_to_transaction(tps, group_metadata, self._timeout),
                "adding offsets to the transaction",
                deadline,
                retry=False,
            )
        self._retrying(lambda: self._producer.commit_transaction(self._timeout), "committing the transaction", deadline)
        self._in_txn = False

    def abort_transaction(self) -> None:
        if self._in_txn:
            self._retrying(lambda: self._producer.abort_transaction(self._timeout), "aborting the transaction", None)
            self._in_txn = False
        self._first_error = None

    def _retrying(self, call: Callable[[], Any], what: str, deadline: float | None, retry: bool = True) -> None:
        while True:
            try:
                call()
                return
            except KafkaException as e:
                err = e.args[0]
                if is_fenced(err):
                    raise fenced(self._settings, what, err) from None
                if err.fatal():
                    raise KafkaIOError(
                        f"{what} failed fatally: {err.str()} (another instance with this transactional.id may have "
                        "taken over)."
                    ) from None
                if err.txn_requires_abort():
                    log.warning("%s failed (%s): aborting the transaction", what, err.str())
                    self.abort_transaction()
                    raise TransactionAborted(f"{what} failed: {err.str()}.") from None
                if err.retriable() and not retry:
                    log.warning("%s failed (%s): aborting the transaction to redo it", what, err.str())
                    self.abort_transaction()
                    raise TransactionAborted(f"{what} failed: {err.str()}.") from None
                if not err.retriable() or (deadline is not None and time.monotonic() >= deadline):
                    raise KafkaIOError(f"{what} failed: {err.str()}.") from None
                log.warning("%s: %s; retrying", what, err.str())
                if self._watch is not None:
                    self._watch.failed(f"{what} failed: {err.str()}")
                time.sleep(0.5)

    def _txn_call(self, call: Callable[[], Any], what: str) -> None:
        try:
            call()
        except KafkaException as e:
            err = e.args[0]
            if is_fenced(err):
                raise fenced(self._settings, what, err) from None
            raise KafkaIOError(f"{what} failed: {err.str()}.") from None

    def close(self, timeout: float) -> None:
        try:
            if self._in_txn:  # an unfinished transaction (error path): abort it rather than leave it open
                self._producer.abort_transaction(timeout)
            self._producer.flush(timeout)
        except KafkaException as e:  # closing after a fatal error: the error was already reported
            log.warning("closing the producer: %s", e.args[0].str())
