"""Kafka messages of raw log lines → the `EventBatch` rows of a log model bundle, or dead letters: the
`Decoder` interface of decode.py for a log bundle (the log stage does the parsing, in logs/stage.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stream_detector.core.events import NO_TIME
from stream_detector.ingest.decode import DeadLetter
from stream_detector.logs.spec import LogModelSpec
from stream_detector.logs.stage import LogEventBatch, LogStage


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


def log_path_for(bundle: Any, core: Any, settings: Any) -> tuple[LogDecoder, Any] | None:
    """For a log model bundle (issue 8), the service's decoder and core: messages are raw log lines,
    turned into rows by the log stage (logs/stage.py), and alerts carry the offending template and a
    sample line; with a changelog, the entities' log sessions move with their partitions too. None
    for any other bundle. ConfigError (one sentence) for detection settings the log model cannot use."""
    from stream_detector.config import ConfigError
    from stream_detector.logs.core import LogDetectorCore
    from stream_detector.logs.spec import is_log_bundle, load_log_spec, log_detection_settings

    if not is_log_bundle(bundle):
        return None
    spec = load_log_spec(bundle)
    try:
        log_detection_settings(core.settings, spec)  # the same check as a log replay's
    except ValueError as e:
        raise ConfigError(f"[detection] {e}") from None
    decoder = LogDecoder(spec, settings.input.max_message_bytes)
    stage = decoder.stage if settings.processing.changelog else None
    return decoder, LogDetectorCore(core, spec, stage)
