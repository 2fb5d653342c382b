"""`check_broker`: the broker reachable and the topics there, within a bounded time (`check` and the
start of `run`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from stream_detector.config import Settings
from stream_detector.ingest.kafka_config import admin_config, unreachable
from stream_detector.service.kafka_errors import KafkaIOError

client_log = logging.getLogger("stream_detector.librdkafka")


NEW_TOPIC_GRACE_S = 5.0  # how long check_broker waits for a topic to appear in the metadata


def check_broker(settings: Settings, topics: Sequence[str], timeout: float | None = None) -> dict[str, int]:
    """Connect, list topics within a bounded time, and check `topics` exist (a topic created a
    moment ago gets up to NEW_TOPIC_GRACE_S to appear in the broker's metadata). Returns
    {topic: partitions}; KafkaIOError with one sentence otherwise (unreachable broker included)."""
    from confluent_kafka.admin import AdminClient

    timeout = settings.kafka.timeout_s if timeout is None else timeout
    last_error: list[str] = []
    auth_error: list[str] = []

    def on_error(err: KafkaError) -> None:  # librdkafka retries forever; keep the reason for the sentence
        last_error.append(err.str())
        if err.code() == KafkaError._AUTHENTICATION:
            auth_error.append(err.str())

    conf = admin_config(settings)
    conf.update({"error_cb": on_error, "log_level": 0, "logger": client_log})
    admin = AdminClient(conf)
    try:
        meta = admin.list_topics(timeout=timeout)
    except KafkaException as e:
        admin.poll(0)  # error_cb runs only from poll(): collect why the metadata request failed
        if auth_error:  # wrong SASL user/password: say so instead of "brokers are down"
            raise KafkaIOError(
                f"the Kafka broker at {settings.kafka.bootstrap_servers} rejected the SASL credentials"
                f" of user '{conf.get('sasl.username', '')}' ({auth_error[0]})."
            ) from None
        why = last_error[-1] if last_error else e.args[0].str()
        raise KafkaIOError(unreachable(settings, why, timeout)) from None

    def missing_from(meta: Any) -> list[str]:
        return [t for t in topics if t not in meta.topics or meta.topics[t].error is not None]

    missing = missing_from(meta)
    # A topic created a moment ago (a deployment script, a broker just started) can be missing
    # from this broker's metadata for a while yet: ask again for a few seconds before refusing.
    deadline = time.monotonic() + min(timeout, NEW_TOPIC_GRACE_S)
    while missing and time.monotonic() < deadline:
        time.sleep(0.25)
        try:
            meta = admin.list_topics(timeout=max(0.1, deadline - time.monotonic()))
        except KafkaException:
            break
        missing = missing_from(meta)
    if missing:
        raise KafkaIOError(f"topic(s) {', '.join(missing)} do not exist on {settings.kafka.bootstrap_servers}.")
    return {t: len(meta.topics[t].partitions) for t in topics}
