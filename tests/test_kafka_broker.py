"""The broker is real and the client is set up the way the service uses it: keyed messages from an
idempotent producer, a consumer group with consume(n, timeout), manual offset storing, and a second
consumer of the same group resuming exactly after the committed offsets."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

pytestmark = pytest.mark.kafka

N_MESSAGES = 100_000
PARTITIONS = 6


def _consumer(bootstrap: str, group: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
        }
    )


def test_broker_resume_after_committed_offsets(kafka_bootstrap, make_topic):
    topic = make_topic(partitions=PARTITIONS)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "linger.ms": 5})
    delivery_errors = []

    def on_delivery(err, msg):
        if err is not None:
            delivery_errors.append(err)

    for i in range(N_MESSAGES):
        while True:
            try:
                producer.produce(topic, key=f"entity-{i % 997}", value=str(i).encode(), on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10_000 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0
    assert delivery_errors == []

    group = f"g-{uuid.uuid4().hex[:8]}"
    first = _consumer(kafka_bootstrap, group)
    first.subscribe([topic])
    seen_first: dict[tuple[int, int], int] = {}
    last_batch: list = []
    while len(seen_first) < N_MESSAGES // 2:
        batch = first.consume(num_messages=1000, timeout=5.0)
        msgs = [m for m in batch if m.error() is None]
        assert all(m.error() is None for m in batch), [m.error() for m in batch if m.error()]
        for m in msgs:
            key = (m.partition(), m.offset())
            assert key not in seen_first, "a message was delivered twice to one consumer"
            seen_first[key] = int(m.value())
        # Store offsets only once the batch is "handled"; the last batch stays uncommitted.
        if last_batch:
            for m in last_batch:
                first.store_offsets(message=m)
            first.commit(asynchronous=False)
        last_batch = msgs
    committed = {tp.partition: tp.offset for tp in first.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)}
    first.close()  # leaves the last batch unstored and uncommitted

    second = _consumer(kafka_bootstrap, group)
    high_watermarks = {p: second.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(PARTITIONS)}
    assert sum(high_watermarks.values()) == N_MESSAGES
    second.subscribe([topic])
    seen_second: dict[tuple[int, int], int] = {}
    idle = 0
    while len(seen_second) + sum(max(o, 0) for o in committed.values()) < N_MESSAGES and idle < 5:
        batch = second.consume(num_messages=5000, timeout=2.0)
        if not batch:
            idle += 1
            continue
        idle = 0
        for m in batch:
            assert m.error() is None, m.error()
            seen_second[(m.partition(), m.offset())] = int(m.value())
    second.close()

    # No gap: every partition resumes exactly at its committed offset and runs to its end.
    for p in range(PARTITIONS):
        offsets = sorted(o for (pp, o) in seen_second if pp == p)
        start = max(committed[p], 0)
        assert offsets == list(range(start, high_watermarks[p])), f"partition {p}: gap or wrong resume point (committed {start})"
    # Everything produced was seen; re-delivery is limited to the last uncommitted batch.
    all_values = set(seen_first.values()) | set(seen_second.values())
    assert all_values == set(range(N_MESSAGES))
    redelivered = set(seen_first) & set(seen_second)
    assert redelivered == {(m.partition(), m.offset()) for m in last_batch}


def test_check_broker_waits_briefly_for_a_new_topic_then_refuses_a_missing_one(kafka_bootstrap):
    """A topic created just after the service starts checking (as a deployment script might) is
    found; one that never appears is refused in one sentence after the grace period."""
    import threading
    import time

    from confluent_kafka.admin import AdminClient, NewTopic

    from stream_detector.config import load_settings
    from stream_detector.service.kafka_io import NEW_TOPIC_GRACE_S, KafkaIOError, check_broker

    settings = load_settings(overrides={"kafka": {"bootstrap_servers": kafka_bootstrap, "timeout_s": 10}})
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    late = f"late-{uuid.uuid4().hex[:12]}"
    creator = threading.Timer(1.0, lambda: admin.create_topics([NewTopic(late, num_partitions=3, replication_factor=1)]))
    creator.start()
    try:
        assert check_broker(settings, [late]) == {late: 3}
    finally:
        creator.join()
        admin.delete_topics([late], operation_timeout=30)[late].result(timeout=30)
    absent = f"absent-{uuid.uuid4().hex[:12]}"
    t0 = time.monotonic()
    with pytest.raises(KafkaIOError) as e:
        check_broker(settings, [absent])
    assert str(e.value) == f"topic(s) {absent} do not exist on {kafka_bootstrap}."
    assert time.monotonic() - t0 >= NEW_TOPIC_GRACE_S - 0.5, "refused without waiting for the topic to appear"


def _twin_sinks(kafka_bootstrap, make_topic):
    """(alerts topic, older sink, newer sink): two transactional sinks of instance 'twin' with one
    transactional id; the older one produced and flushed a record before the newer one's
    init_transactions fenced it."""
    from stream_detector.config import load_settings
    from stream_detector.service.kafka_io import KafkaSink

    alerts = make_topic(partitions=1)
    settings = load_settings(overrides={
        "kafka": {"bootstrap_servers": kafka_bootstrap, "alerts_topic": alerts, "group_id": f"g-{uuid.uuid4().hex[:6]}"},
        "processing": {"instance_id": "twin"},
    })
    txn_id = f"fence-{uuid.uuid4().hex[:8]}"
    older = KafkaSink(settings, transactional_id=txn_id)
    older.alert("e1", b"{}")
    older.flush(10)
    return alerts, older, KafkaSink(settings, transactional_id=txn_id)


def test_a_fenced_transactional_sink_says_so_in_one_sentence_on_its_next_record(kafka_bootstrap, make_topic):
    """A newer process with the same transactional id fences the older one's producer; the older
    one's next record raises `MemberFenced` (exit 2 in `run`), not librdkafka's bare "Fatal error"."""
    from stream_detector.service.kafka_io import KafkaIOError, MemberFenced

    _, older, newer = _twin_sinks(kafka_bootstrap, make_topic)
    try:
        with pytest.raises(KafkaIOError) as e:
            for _ in range(50):  # the fatal error reaches the older client with its next request
                older.alert("e1", b"{}")
                older.flush(10)
        assert isinstance(e.value, MemberFenced), repr(e.value)
        text = str(e.value)
        assert "fenced by another process running with this member's instance id 'twin'" in text, text
        assert text.endswith(".") and ". " not in text, text
    finally:
        newer.alert("e2", b"{}")
        newer.flush(10)


# confluent-kafka raises a fatal error from inside its error callback without keeping it; a later
# callback of the same flush (a librdkafka log line) can clear it, and flush then fails with this.
LOST_FATAL = SystemError("<method 'flush' of 'cimpl.Producer' objects> returned NULL without setting an exception")


@pytest.mark.parametrize("lost_in", ["flush", "produce"])
def test_a_fenced_sink_whose_fatal_error_confluent_kafka_lost_still_says_it_was_fenced(
    kafka_bootstrap, make_topic, lost_in
):
    """The fenced error is consumed outside the sink (as when confluent-kafka loses it); then either
    flush fails with the bare SystemError, or the next produce only says "Fatal error". Both end in
    `MemberFenced`, recovered from the transactional producer, not in a traceback or a vague line."""
    from confluent_kafka import KafkaException

    from stream_detector.service.kafka_io import MemberFenced

    alerts, older, newer = _twin_sinks(kafka_bootstrap, make_topic)
    try:
        for _ in range(50):  # drive the older client into its fatal state, dropping what it raises
            try:
                older._producer.produce(alerts, value=b"{}")
                older._producer.flush(10)
            except (KafkaException, SystemError):
                break
        else:
            pytest.fail("the older producer was never fenced")
        if lost_in == "flush":
            error = older._client_error(LOST_FATAL, "waiting for acknowledgements")
        else:
            with pytest.raises(MemberFenced) as raised:
                older.alert("e1", b"{}")
            error = raised.value
        assert isinstance(error, MemberFenced), repr(error)
        text = str(error)
        assert "fenced by another process running with this member's instance id 'twin'" in text, text
        assert "fenced by newer producer instance" in text, text  # the broker's own cause, recovered
    finally:
        newer.alert("e2", b"{}")
        newer.flush(10)


def test_an_idempotent_sink_whose_fatal_error_was_lost_says_so_in_one_sentence(kafka_bootstrap):
    from stream_detector.config import load_settings
    from stream_detector.service.kafka_io import KafkaIOError, KafkaSink, MemberFenced

    settings = load_settings(overrides={"kafka": {"bootstrap_servers": kafka_bootstrap}})
    sink = KafkaSink(settings)  # not transactional: nothing holds the lost cause
    error = sink._client_error(LOST_FATAL, "waiting for acknowledgements")
    assert isinstance(error, KafkaIOError) and not isinstance(error, MemberFenced), repr(error)
    text = str(error)
    assert text.startswith("waiting for acknowledgements: the Kafka producer hit a fatal error"), text
    assert "librdkafka log line before this one names it" in text, text
    assert text.endswith(".") and ". " not in text, text
    sink.close(5)
