"""`stream-detector leave-group`: remove a stopped static member from its consumer group at once.

A static member (`group.instance.id`, kafka_config.py) does not leave the group when it stops
(KIP-345): its partitions wait for it until `session.timeout.ms` has passed, which is what makes a
restart fast and what a scale-in does not want. Run this after the member has stopped for good,
with the member's settings (the same config, or at least `kafka.*` and `processing.instance_id`):

1. asks the broker whether the group still has a member with this instance id (none: nothing to do);
2. exactly-once: initialises a producer with the member's transactional id, which aborts a
   transaction the member left open (a member killed mid-transaction would otherwise hold its
   partitions and `read_committed` readers until `processing.transaction_timeout_s`);
3. joins the group with the member's `group.instance.id` (the broker hands it the member's
   partitions without a rebalance; nothing is fetched or committed), then unsubscribes, which
   sends the LeaveGroup request that librdkafka leaves out when a static member closes; the
   group rebalances and the other members take the partitions, with their state (changelog);
4. waits until the broker no longer lists the instance.

A member that is still running is fenced by step 2 or 3 (it exits 2), so stop it first. librdkafka
has no admin call for KIP-345's RemoveMembersFromConsumerGroup; this is the same effect through the
consumer protocol. Exit 0 (left, or nothing to do), 2 (bad settings), 1 (broker problem), with one
sentence.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer

from stream_detector.config import ConfigError, Settings, add_settings_arguments, settings_from_args
from stream_detector.ingest.kafka_config import admin_config, check_client_configs, client_config, producer_config
from stream_detector.service.kafka_errors import KafkaIOError

log = logging.getLogger(__name__)
client_log = logging.getLogger("stream_detector.librdkafka")


def _admin(settings: Settings) -> Any:
    from confluent_kafka.admin import AdminClient

    conf: dict[str, Any] = {**admin_config(settings), "logger": client_log}
    return AdminClient(conf)


def group_has_instance(settings: Settings, instance: str, timeout: float, admin: Any = None) -> bool:
    """Whether the broker lists a member of `kafka.group_id` with this `group.instance.id`."""
    admin = admin if admin is not None else _admin(settings)
    group = settings.kafka.group_id
    try:
        desc = admin.describe_consumer_groups([group], request_timeout=timeout)[group].result(timeout + 1.0)
    except (KafkaException, TimeoutError) as e:
        why = e.args[0].str() if isinstance(e, KafkaException) else f"no answer within {timeout:g} s"
        raise KafkaIOError(f"cannot describe group '{group}' on {settings.kafka.bootstrap_servers} ({why}).") from None
    return any(m.group_instance_id == instance for m in desc.members)


def _abort_open_transaction(settings: Settings, timeout: float) -> None:
    txn_id = settings.processing.transactional_id_for(settings.kafka.group_id)
    producer = Producer({**producer_config(settings), "transactional.id": txn_id, "logger": client_log})
    try:
        producer.init_transactions(timeout)  # fences the id's earlier incarnation, aborts its open transaction
    except KafkaException as e:
        raise KafkaIOError(f"initialising transactional id '{txn_id}' failed ({e.args[0].str()}).") from None
    finally:
        producer.flush(1.0)
    log.info("transactional id %s initialised: a transaction the member left open is aborted", txn_id)


def leave_group(settings: Settings, timeout: float | None = None) -> str:
    """Remove the static member named by `settings` from its group; returns what happened (one
    sentence). KafkaIOError when the broker cannot be reached or the member is still listed after
    `timeout` (default: 3 x kafka.timeout_s)."""
    group, instance = settings.kafka.group_id, settings.processing.group_instance_id()
    if instance is None:
        return (
            f"static membership is off for this member (processing.static_membership = "
            f"{settings.processing.static_membership}, processing.instance_id unset or ignored): a dynamic member "
            f"leaves group '{group}' by itself when it stops."
        )
    step = settings.kafka.timeout_s
    deadline = time.monotonic() + (3 * step if timeout is None else timeout)
    admin = _admin(settings)
    if not group_has_instance(settings, instance, step, admin):
        return f"instance '{instance}' is not a member of group '{group}' (it left, or its session expired)."
    if settings.processing.guarantee == "exactly_once":
        _abort_open_transaction(settings, step)
    conf: dict[str, Any] = {**client_config(settings, "consumer"), "logger": client_log}
    conf.pop("statistics.interval.ms", None)
    assigned: list[int] = []

    def on_assign(consumer: Any, partitions: list[Any]) -> None:
        consumer.incremental_assign(partitions)
        consumer.pause(partitions)  # nothing is fetched, nothing committed
        assigned.append(len(partitions))

    consumer = Consumer(conf)
    try:
        consumer.subscribe(list(settings.kafka.topics), on_assign=on_assign)
        while not assigned and time.monotonic() < deadline:
            consumer.poll(0.1)
        if not assigned:
            raise KafkaIOError(f"joining group '{group}' as instance '{instance}' did not complete in time.")
        consumer.unsubscribe()  # a static member that unsubscribes (rather than closes) sends LeaveGroup
        while time.monotonic() < deadline:
            consumer.poll(0.2)
            if not group_has_instance(settings, instance, step, admin):
                return (
                    f"instance '{instance}' left group '{group}': its {sum(assigned)} partition(s) go to the other "
                    "members now."
                )
        raise KafkaIOError(f"group '{group}' still lists instance '{instance}' after the leave request.")
    finally:
        consumer.close()


def handle(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        check_client_configs(settings)
    except ConfigError as e:
        print(f"leave-group: {e}", file=sys.stderr)
        return 2
    try:
        print(leave_group(settings))
    except KafkaIOError as e:
        print(f"leave-group: {e}", file=sys.stderr)
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "leave-group",
        help="remove a stopped static member from its consumer group now (scale-in)",
        description=(
            "Remove a stopped member with static membership (processing.instance_id) from its consumer group, so "
            "that its partitions move to the other members now instead of after session.timeout.ms. Stop the member "
            "first: a running one is fenced."
        ),
    )
    add_settings_arguments(p)
    p.set_defaults(func=handle)
