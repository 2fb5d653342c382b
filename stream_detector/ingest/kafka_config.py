"""Kafka client configuration, assembled in one place for every client the service makes.

    client_config(settings, role) -> dict      role: consumer | producer | admin | restorer | reader

Every role starts from `kafka.bootstrap_servers` + `kafka.client` + the values of
`kafka.secret_files` (`KafkaSettings.client_settings()`), so a security setting given once reaches
every client. Then, per role:

- consumer (the service's group consumer): `CONSUMER_DEFAULTS`, `group.id`, `auto.offset.reset`,
  the user's `kafka.consumer` (which override the defaults), then the settings the delivery
  guarantees depend on (`_CONSUMER_FIXED`; `isolation.level=read_committed` in exactly-once mode),
  and with static membership `group.instance.id` from `processing.instance_id` (one id names the
  member and its transactions, so `kafka.consumer` may not set its own: ConfigError).
- restorer (the changelog reader, `changelog.Restorer`: assign only, never joins a group, never
  commits): the same user `kafka.consumer` settings under the same merge guard as the consumer (a
  consumer-only security setting reaches it too, and a setting refused for one is refused for both),
  then what the restorer works by (`_RESTORER_OWN`: its own `group.id`, `read_committed`, partition
  EOF on). The reader (topic_range.py: fit, baseline and replay from a topic) is made the same way. Those
  are not the user's to choose (e.g. an `isolation.level=read_uncommitted` input in
  at-least-once mode is fine, but state is only ever restored from committed records).
- producer: `_PRODUCER_DEFAULTS`, the user's `kafka.producer`, then `enable.idempotence=true`.
- admin (broker check, changelog topic): the common part only.

Merge guard: a user value that contradicts a fixed setting is a `ConfigError` with one sentence.
Callbacks (`error_cb`, `logger`) are the clients' business and added where a client is made.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from stream_detector.config import ConfigError, Settings

Role = Literal["consumer", "producer", "admin", "restorer", "reader"]

# Settings the service's guarantees depend on; a user value that contradicts them is refused.
_CONSUMER_FIXED = {
    "enable.auto.offset.store": False,
    "enable.auto.commit": False,
    "partition.assignment.strategy": "cooperative-sticky",
    "enable.partition.eof": False,
}
_PRODUCER_FIXED = {"enable.idempotence": True}
# Bounds (docs/reliability.md): the producer queue holds at most this much before produce() waits
# (BufferError -> serve delivery reports), and a dead letter may be as large as the broker allows
# (deploy/kafka/broker.sh: message.max.bytes = 10 MiB), so a 5 MB poison message reaches the DLQ.
_PRODUCER_DEFAULTS = {
    "linger.ms": 5,
    "compression.type": "lz4",
    "queue.buffering.max.messages": 100_000,
    "queue.buffering.max.kbytes": 65_536,
    "message.max.bytes": 10_485_760,
}
# The consumer's prefetch queue is bounded too; a single message larger than the fetch sizes is
# still returned (KIP-74), up to receive.message.max.bytes. librdkafka (2.x) waits
# fetch.queue.backoff.ms (default 1,000) before fetching again for a partition whose prefetch queue
# was full: with a bounded queue and a fast reader that wait, not the broker or decoding, set the
# ingest rate (bench/e2e.py's consume + decode alone: 31k events/s at 1,000 ms, 147k at 5 ms;
# docs/performance.md "Phase 3"). The user's kafka.consumer settings override these.
CONSUMER_DEFAULTS = {
    "queued.max.messages.kbytes": 32_768,
    "fetch.max.bytes": 20_971_520,
    "receive.message.max.bytes": 31_457_280,
    "fetch.queue.backoff.ms": 5,
    # librdkafka's statistics, once a second: which broker connections are up, the one signal that a broker is back
    # when no message is flowing (brokerwatch.py, /readyz). A few hundred µs of parsing per second.
    "statistics.interval.ms": 1000,
}
# The restorer reads whole changelog partitions: a smaller prefetch, the same short fetch backoff.
RESTORER_DEFAULTS = {
    "queued.max.messages.kbytes": 16_384,
    "fetch.queue.backoff.ms": CONSUMER_DEFAULTS["fetch.queue.backoff.ms"],
}


CLIENT_LOG = "stream_detector.librdkafka"  # where every client's librdkafka lines are logged


def _merge(user: dict[str, Any], fixed: dict[str, Any], section: str) -> dict[str, Any]:
    conf = dict(user)
    for k, v in fixed.items():
        if k in conf and str(conf[k]).lower() != str(v).lower():
            raise ConfigError(
                f"kafka.{section} sets '{k}={conf[k]}', but the service needs '{k}={v}' for its delivery guarantees."
            )
        conf[k] = v
    return conf


def client_config(settings: Settings, role: Role) -> dict[str, Any]:
    """The librdkafka settings of one client of the service (see the module docstring)."""
    kafka = settings.kafka
    common = {"bootstrap.servers": kafka.bootstrap_servers, **kafka.client_settings()}
    if role == "admin":
        return common
    if role == "producer":
        return _merge({**_PRODUCER_DEFAULTS, **common, **kafka.producer}, _PRODUCER_FIXED, "producer")
    fixed = dict(_CONSUMER_FIXED)
    if settings.processing.guarantee == "exactly_once":  # never read another producer's aborted records
        fixed["isolation.level"] = "read_committed"
    if role == "consumer":
        if "group.instance.id" in kafka.consumer:
            raise ConfigError(
                "kafka.consumer sets 'group.instance.id', but the service derives it from processing.instance_id "
                "(static membership: processing.static_membership); set the instance id there instead."
            )
        base = {"group.id": kafka.group_id, "auto.offset.reset": kafka.auto_offset_reset, **CONSUMER_DEFAULTS}
        conf = _merge({**base, **common, **kafka.consumer}, fixed, "consumer")
        instance = settings.processing.group_instance_id()
        if instance is not None:
            conf["group.instance.id"] = instance
        return conf
    if role in ("restorer", "reader"):
        user = {k: v for k, v in kafka.consumer.items() if k != "statistics.interval.ms"}  # no one reads its statistics
        conf = _merge({**RESTORER_DEFAULTS, **common, **user}, fixed, "consumer")
        conf.update(
            {
                "group.id": f"{kafka.group_id}-{'restore' if role == 'restorer' else 'range-reader'}",  # never joined
                "enable.partition.eof": True,  # a partition is restored once its end is reached
                "isolation.level": "read_committed",  # records of open or aborted transactions are never restored
            }
        )
        return conf
    raise ValueError(f"unknown Kafka client role {role!r}")


def consumer_config(settings: Settings) -> dict[str, Any]:
    return client_config(settings, "consumer")


def producer_config(settings: Settings) -> dict[str, Any]:
    return client_config(settings, "producer")


def admin_config(settings: Settings) -> dict[str, Any]:
    return client_config(settings, "admin")


def restorer_config(settings: Settings) -> dict[str, Any]:
    return client_config(settings, "restorer")


def quiet(conf: dict[str, Any]) -> dict[str, Any]:
    """`conf` with librdkafka's own lines (a refused connection, every retry) kept quiet: for the short-lived
    clients of commands and start-up checks, whose failure reaches the user as one sentence from the call
    that failed (`unreachable`)."""
    return {**conf, "error_cb": lambda err: None, "log_level": 0, "logger": logging.getLogger(CLIENT_LOG)}


def unreachable(settings: Settings, why: str, timeout: float | None = None) -> str:
    """The one sentence for a broker that did not answer a metadata request in time."""
    timeout = settings.kafka.timeout_s if timeout is None else timeout
    return f"cannot reach the Kafka broker at {settings.kafka.bootstrap_servers} within {timeout:g} s ({why})."


def check_client_configs(settings: Settings) -> None:
    """Build every client's settings once, so that a `kafka.consumer`/`kafka.producer` value the
    service cannot work with fails at start-up, before anything is consumed (ConfigError)."""
    for role in ("consumer", "producer", "admin", "restorer"):
        client_config(settings, role)
