"""The control topic on the broker: made compacted, read whole by every instance, written by the CLI.

    control_topic(settings) -> str                 `[kafka] control_topic`, or ConfigError
    ensure_control_topic(settings) -> str          created compacted if missing, else checked
    ControlReader(settings)                        poll() -> (records, dead letters), caught_up, close()
    write_control(settings, records) -> str        produce + wait for the acknowledgements (the CLI)

The records (silences, feedback) and their format are ingest/control.py; the subcommands that
write them are control_cli.py.

- **Topic**: compacted (`cleanup.policy=compact`), 1 partition, the broker's default replication.
  An existing topic without compaction is refused (ConfigError, one sentence): silences would be
  deleted by retention while still in force. `compact,delete` is accepted with a warning.
- **Reader**: its own consumer (kafka_config `reader`: the service's security and `kafka.consumer`
  settings, `read_committed`, partition EOF on) that `assign`s every partition from the beginning,
  never joins the service's consumer group and never commits: every instance reads every silence
  and every verdict. `poll()` never blocks by default and returns at most 500 records; a record
  that does not parse is a `DeadLetter` with reason `bad-control-record` and the parser's one-line
  reason as detail, never an exception. `caught_up` turns True once every partition reached the end
  offset it had when the reader started (the silences written before start-up are known), and stays
  True; records written later keep arriving through `poll()`.
- **Errors**: `ConfigError` (no control topic configured, a topic without compaction) and
  `KafkaIOError` (broker unreachable, the topic cannot be created or read), one sentence each.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Sequence
from typing import Any

from stream_detector.config import ConfigError, Settings
from stream_detector.ingest.control import ControlRecord, ControlRecordError, parse_control
from stream_detector.ingest.decode import BAD_CONTROL_RECORD, DeadLetter
from stream_detector.ingest.kafka_config import admin_config, client_config, producer_config, quiet, unreachable
from stream_detector.service.compacted_topic import TopicNotCreated, ensure_compacted
from stream_detector.service.kafka_errors import KafkaIOError

log = logging.getLogger(__name__)
client_log = logging.getLogger("stream_detector.librdkafka")

POLL_RECORDS = 500  # most records one poll() returns


def control_topic(settings: Settings) -> str:
    topic = settings.kafka.control_topic
    if not topic:
        raise ConfigError(
            "no control topic is configured: set [kafka] control_topic (SD_KAFKA__CONTROL_TOPIC or "
            "--kafka.control-topic)."
        )
    return topic


def _unreachable(settings: Settings, e: Exception) -> KafkaIOError:
    why = e.args[0].str() if e.args and hasattr(e.args[0], "str") else str(e) or type(e).__name__
    return KafkaIOError(unreachable(settings, why))


def ensure_control_topic(settings: Settings) -> str:
    """The control topic, created (compacted, 1 partition) if missing; ConfigError with one sentence if it exists
    without compaction, KafkaIOError if the broker cannot be reached or the topic cannot be made."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    topic = control_topic(settings)
    timeout = settings.kafka.timeout_s
    admin = AdminClient(quiet(admin_config(settings)))
    try:
        meta = admin.list_topics(timeout=timeout)
    except KafkaException as e:
        raise _unreachable(settings, e) from None
    try:
        found = ensure_compacted(admin, topic, 1, timeout, meta)
    except TopicNotCreated as e:
        raise KafkaIOError(
            f"the control topic {topic} does not exist and could not be created ({e}); "
            "create it with cleanup.policy=compact and 1 partition."
        ) from None
    except KafkaException as e:
        raise KafkaIOError(f"checking the control topic {topic} failed ({e.args[0].str()}).") from None
    except concurrent.futures.TimeoutError:
        raise KafkaIOError(f"checking the control topic {topic} got no answer within {timeout:g} s.") from None
    if found.created:
        log.info("created the control topic %s (1 partition, compacted)", topic)
        return topic
    policy = found.cleanup_policy
    if "compact" not in policy:
        raise ConfigError(
            f"the control topic {topic} has cleanup.policy={policy}, but silences and feedback need a compacted topic "
            "(cleanup.policy=compact): change its policy or name another topic."
        )
    if "delete" in policy:
        log.warning(
            "the control topic %s has cleanup.policy=%s: records older than its retention.ms are deleted, so a "
            "silence that lasts longer than that ends early",
            topic,
            policy,
        )
    return topic


class ControlReader:
    """Every partition of the control topic from the beginning, parsed (module docstring). Main thread only."""

    def __init__(self, settings: Settings, topic: str | None = None) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

        self.topic = topic if topic is not None else control_topic(settings)
        self.records_read = 0
        conf = {**client_config(settings, "reader"), "error_cb": _client_error, "logger": client_log}
        conf["group.id"] = f"{settings.kafka.group_id}-control-reader"  # never joined, never committed to
        self._consumer: Any = Consumer(conf)
        self._closed = False
        try:
            timeout = settings.kafka.timeout_s
            deadline = time.monotonic() + timeout
            while True:
                try:
                    info = self._consumer.list_topics(self.topic, timeout=timeout).topics.get(self.topic)
                except KafkaException as e:
                    raise _unreachable(settings, e) from None
                if info is not None and info.error is None and info.partitions:
                    break
                if time.monotonic() >= deadline:  # (a topic created a moment ago has no partitions in metadata yet)
                    raise KafkaIOError(
                        f"the control topic {self.topic} does not exist on {settings.kafka.bootstrap_servers}."
                    )
                time.sleep(0.2)
            self._ends: dict[int, int] = {}  # partition -> its end offset when the reader started
            self._behind: set[int] = set()  # partitions not read up to that end yet
            for p in sorted(info.partitions):
                try:
                    low, high = self._consumer.get_watermark_offsets(
                        TopicPartition(self.topic, p), timeout=timeout, cached=False
                    )
                except KafkaException as e:
                    raise _unreachable(settings, e) from None
                self._ends[p] = high
                if high > low:
                    self._behind.add(p)
            self._consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in self._ends])
        except BaseException:
            self.close()
            raise

    @property
    def caught_up(self) -> bool:
        """Every partition reached the end offset it had when the reader started."""
        return not self._behind

    def poll(
        self, timeout: float = 0.0, max_records: int = POLL_RECORDS
    ) -> tuple[list[ControlRecord], list[DeadLetter]]:
        """The records that arrived (at most `max_records`), parsed, and the malformed ones as dead letters.
        Waits up to `timeout` seconds for the first (0: never blocks)."""
        from confluent_kafka import KafkaError

        records: list[ControlRecord] = []
        dead: list[DeadLetter] = []
        if self._closed:
            return records, dead
        behind = self._behind
        for m in self._consumer.consume(max_records, timeout):
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    behind.discard(m.partition())
                elif err.fatal():
                    raise KafkaIOError(f"reading the control topic {self.topic} failed ({err.str()}).")
                else:
                    log.warning("reading the control topic %s: %s", self.topic, err.str())
                continue
            p = m.partition()
            if behind and p in behind and m.offset() >= self._ends[p] - 1:
                behind.discard(p)
            self.records_read += 1
            try:
                records.append(parse_control(m.key(), m.value()))
            except ControlRecordError as e:
                dead.append(DeadLetter(m, BAD_CONTROL_RECORD, str(e)))
        return records, dead

    def catch_up(self, idle_timeout_s: float) -> tuple[list[ControlRecord], list[DeadLetter]]:
        """poll() until `caught_up`: every record read on the way. KafkaIOError if no record arrived for
        `idle_timeout_s` seconds while the end is still ahead."""
        records: list[ControlRecord] = []
        dead: list[DeadLetter] = []
        last = time.monotonic()
        while not self.caught_up:
            got, bad = self.poll(timeout=0.2)
            if got or bad:
                records += got
                dead += bad
                last = time.monotonic()
            elif time.monotonic() - last > idle_timeout_s:
                raise KafkaIOError(
                    f"the control topic {self.topic} was not read to its end: no record arrived for "
                    f"{idle_timeout_s:g} s; is the broker still reachable?"
                )
        return records, dead

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._consumer.close()

    def __enter__(self) -> ControlReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _client_error(err: Any) -> None:
    log.debug("control topic reader: %s", err.str())


def write_control(settings: Settings, records: Sequence[tuple[bytes, bytes | None]]) -> str:
    """Produce records (key, value; value None: a tombstone) to the control topic, made or checked first
    (`ensure_control_topic`), and wait until the broker acknowledged every one (`kafka.timeout_s`); the topic.
    KafkaIOError with one sentence when one was not acknowledged."""
    from confluent_kafka import KafkaException, Producer

    topic = ensure_control_topic(settings)
    timeout = settings.kafka.timeout_s
    failed: list[Any] = []

    def on_delivery(err: Any, msg: Any) -> None:  # never raise inside a librdkafka callback
        if err is not None and not failed:
            failed.append(err)

    conf = quiet(producer_config(settings))
    conf["message.timeout.ms"] = max(1000, int(timeout * 1000))  # give up when this command does
    producer = Producer(conf)
    try:
        for key, value in records:
            producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
    except (KafkaException, BufferError) as e:
        raise KafkaIOError(f"writing to the control topic {topic} failed ({e}).") from None
    left = producer.flush(timeout + 1.0)
    if failed:
        raise KafkaIOError(f"writing to the control topic {topic} failed ({failed[0].str()}).")
    if left:
        raise KafkaIOError(
            f"{left} control record(s) were not acknowledged by {settings.kafka.bootstrap_servers} within "
            f"{timeout:g} s."
        )
    return topic
