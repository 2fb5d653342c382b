"""Kafka messages of raw log lines → the `EventBatch` rows of a log model bundle, or dead letters: the
`Decoder` interface of decode.py for a log bundle (the log stage does the parsing, in logs/stage.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stream_detector.core.events import NO_TIME
from stream_detector.logs.spec import LogModelSpec
from stream_detector.logs.stage import LogEventBatch, LogStage
from stream_detector.service.decode import DeadLetter


class LogDecoder:
    """Kafka messages of raw log lines → (LogEventBatch, dead letters): the `Decoder` interface of
    decode.py for a log model bundle. The line is the message value; the key is passed to the
    parser (entity rule `kafka-key`); the Kafka timestamp stands in when a line has no time."""

    def __init__(self, spec: LogModelSpec, max_message_bytes: int) -> None:
        self.stage = LogStage(spec)
        self.max_message_bytes = int(max_message_bytes)

    def decode(self, messages: Sequence[Any]) -> tuple[LogEventBatch, list[Any]]:
        from confluent_kafka import TIMESTAMP_NOT_AVAILABLE

        dead: list[Any] = []
        kept: list[Any] = []
        for m in messages:
            value = m.value()
            if value is None or len(value) == 0:
                dead.append(DeadLetter(m, "empty-value", "the message has no value"))
            elif len(value) > self.max_message_bytes:
                dead.append(
                    DeadLetter(m, "oversize", f"{len(value)} bytes exceed max_message_bytes {self.max_message_bytes}")
                )
            else:
                kept.append(m)
        times = []
        for m in kept:
            kind, ts = m.timestamp()
            times.append(NO_TIME if kind == TIMESTAMP_NOT_AVAILABLE else int(ts))
        batch, bad = self.stage.feed(
            [m.value() for m in kept],
            keys=[m.key() for m in kept],
            transport_time_ms=times,
            topic=[m.topic() for m in kept],
            partition=[m.partition() for m in kept],
            offset=[m.offset() for m in kept],
        )
        for i, reason in bad:
            dead.append(DeadLetter(kept[i], "unparseable-log-line", reason))
        return batch, dead
