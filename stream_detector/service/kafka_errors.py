"""The errors of the service's Kafka clients (kafka_io.py, kafka_sink.py), each one sentence for the operator, and
how a fenced member is recognised.

`MemberFenced`: another live process runs with this member's instance id. With static membership
(`group.instance.id`, kafka_config.py) the broker hands the newer process the member's partitions
and librdkafka ends the older consumer with a fatal error (a `_FATAL` message error whose text names
FENCED_INSTANCE_ID); in exactly-once mode the newer process's `init_transactions` with the same
`transactional.id` also fences the older producer (`_FENCED`). Either way the older process must
stop and stay stopped: `run` exits 2, which systemd's `RestartPreventExitStatus=2` does not restart.
"""

from __future__ import annotations

from confluent_kafka import KafkaError

from stream_detector.config import Settings


class KafkaIOError(Exception):
    """A broker-side failure the service cannot handle by itself; one sentence for the operator."""


class DeliveryError(KafkaIOError):
    """An alert or dead letter was not acknowledged: the batch's offsets must not be stored."""


class MemberFenced(KafkaIOError):
    """Another live process uses this member's instance id and took over: stop, and stay stopped."""


_FENCED_INSTANCE = KafkaError(KafkaError.FENCED_INSTANCE_ID).str()  # librdkafka's text, inside its `_FATAL` error


def is_fenced(err: KafkaError) -> bool:
    """Fenced by a process with the same group.instance.id (the consumer's fatal error) or transactional.id."""
    if err.code() in (KafkaError._FENCED, KafkaError.FENCED_INSTANCE_ID, KafkaError.PRODUCER_FENCED):
        return True
    return err.code() == KafkaError._FATAL and _FENCED_INSTANCE in err.str()


def fenced(settings: Settings, what: str, err: KafkaError) -> MemberFenced:
    p = settings.processing
    return MemberFenced(
        f"{what} was fenced by another process running with this member's instance id '{p.member_id()}' in group "
        f"'{settings.kafka.group_id}' ({err.str()}); it keeps the partitions and this one stops: give every running "
        "process its own processing.instance_id."
    )


class TransactionAborted(KafkaIOError):
    """The transaction had to be aborted (an abortable error); rewind to the committed offsets and retry."""
