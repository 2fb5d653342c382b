"""A compacted topic, made if missing, else found and described: the one way the service gets the
topics it keeps state in (the state changelog, service/changelog.py; the control topic,
service/control.py).

Each caller words its own errors and checks what it needs (partition count, cleanup policy): this
module raises `TopicNotCreated` when the broker refuses to make a missing topic, and lets
confluent-kafka's KafkaException (and a future's TimeoutError) through from listing and describing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CompactedTopic:
    created: bool  # made now (with the partitions asked for, compacted)
    partitions: int
    cleanup_policy: str


class TopicNotCreated(Exception):
    """The topic was missing and the broker did not make it; the message is the broker's reason."""


def ensure_compacted(admin: Any, topic: str, partitions: int, timeout: float, meta: Any = None) -> CompactedTopic:
    """`topic` made compacted with `partitions` partitions if missing, else its partitions and cleanup
    policy. `meta`: the cluster metadata the caller already listed (None: listed here)."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import ConfigResource, NewTopic

    meta = admin.list_topics(timeout=timeout) if meta is None else meta
    if topic not in meta.topics or meta.topics[topic].error is not None:
        new = NewTopic(topic, num_partitions=partitions, replication_factor=-1, config={"cleanup.policy": "compact"})
        fut = admin.create_topics([new], operation_timeout=timeout)
        try:
            fut[topic].result(timeout=timeout)
            return CompactedTopic(True, partitions, "compact")
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise TopicNotCreated(e.args[0].str()) from None
        # Already exists: another process was quicker, or the metadata read was stale (a topic
        # created a moment ago); describe the one that exists like any other.
        meta = admin.list_topics(topic=topic, timeout=timeout)
    have = len(meta.topics[topic].partitions)
    deadline = time.monotonic() + timeout
    while have == 0 and time.monotonic() < deadline:  # a topic created a moment ago: no partitions in metadata yet
        time.sleep(0.2)
        have = len(admin.list_topics(topic=topic, timeout=timeout).topics[topic].partitions)
    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    policy = admin.describe_configs([res])[res].result(timeout=timeout)["cleanup.policy"].value
    return CompactedTopic(False, have, policy)
