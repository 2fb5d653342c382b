"""Decoding Kafka messages: valid events in order with the right keys/times/rows, every kind of
bad message becomes a dead letter with its reason, and the headers carry the source position."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, TIMESTAMP_NOT_AVAILABLE, Message

from stream_detector.config import InputSettings
from stream_detector.ingest.decode import Decoder, dead_letter_headers
from stream_detector.core.events import NO_TIME

FEATURES = ["cpu", "mem", "disk"]


def msg(value, key=b"host-1", offset=0, partition=0, ts=(TIMESTAMP_CREATE_TIME, 1_000), headers=None):
    v = value if isinstance(value, bytes) or value is None else orjson.dumps(value)
    return Message(topic="obs", partition=partition, offset=offset, key=key, value=v, timestamp=ts, headers=headers)


def test_valid_batch_matches_input(rng):
    rows = rng.normal(size=(50, 3)).tolist()
    msgs = [
        msg({"mem": r[1], "disk": r[2], "cpu": r[0], "extra": "ignored"}, key=f"h{i % 7}".encode(), offset=100 + i, partition=i % 2, ts=(TIMESTAMP_CREATE_TIME, 5_000 + i))
        for i, r in enumerate(rows)
    ]
    batch, dead = Decoder(FEATURES, InputSettings()).decode(msgs)
    assert dead == []
    assert batch.rows.dtype == np.float32 and batch.rows.shape == (50, 3)
    np.testing.assert_allclose(batch.rows, np.asarray(rows, dtype=np.float32))  # features by name, in bundle order
    assert batch.keys == [f"h{i % 7}" for i in range(50)]
    assert batch.offset.tolist() == list(range(100, 150)) and batch.partition.tolist() == [i % 2 for i in range(50)]
    assert batch.event_time_ms.tolist() == list(range(5_000, 5_050))
    assert batch.topic == ["obs"] * 50


def test_key_and_time_from_fields():
    settings = InputSettings(key_field="host", timestamp_field="t", timestamp_unit="s")
    good = msg({"host": "a", "t": 12.5, "cpu": 1, "mem": 2, "disk": 3}, key=None)
    no_key = msg({"t": 1, "cpu": 1, "mem": 2, "disk": 3}, key=b"ignored", offset=1)
    no_time = msg({"host": "a", "cpu": 1, "mem": 2, "disk": 3}, offset=2)
    batch, dead = Decoder(FEATURES, settings).decode([good, no_key, no_time])
    assert batch.keys == ["a"] and batch.event_time_ms.tolist() == [12_500]
    assert [d.reason for d in dead] == ["missing-key", "bad-timestamp"]
    batch, _ = Decoder(FEATURES, InputSettings()).decode([msg({"cpu": 1, "mem": 2, "disk": 3}, ts=(TIMESTAMP_NOT_AVAILABLE, 0))])
    assert batch.event_time_ms.tolist() == [NO_TIME]


@pytest.mark.parametrize(
    "value, key, reason",
    [
        (b"{oops", b"k", "undecodable-json"),
        (b"NaN", b"k", "undecodable-json"),
        (b"[1,2,3]", b"k", "not-an-object"),
        ({"cpu": 1, "mem": 2}, b"k", "missing-feature"),
        ({"cpu": 1, "mem": "2", "disk": 3}, b"k", "non-numeric"),
        ({"cpu": 1, "mem": True, "disk": 3}, b"k", "non-numeric"),
        ({"cpu": 1, "mem": None, "disk": 3}, b"k", "non-numeric"),
        ({"cpu": 1, "mem": 1e39, "disk": 3}, b"k", "non-finite"),  # finite in JSON, inf as float32
        ({"cpu": 1, "mem": 2, "disk": 3}, None, "missing-key"),
        ({"cpu": 1, "mem": 2, "disk": 3}, b"\xff\xfe", "missing-key"),
        (None, b"k", "empty-value"),
        (b'{"cpu": 1, "mem": 2, "disk": 3, "pad": "' + b"x" * 300 + b'"}', b"k", "oversize"),
    ],
)
def test_bad_messages_become_dead_letters(value, key, reason):
    good = [msg({"cpu": 1, "mem": 2, "disk": 3}, offset=0), msg({"cpu": 4, "mem": 5, "disk": 6}, offset=2)]
    bad = msg(value, key=key, offset=1, headers=[("trace", b"abc")])
    batch, dead = Decoder(FEATURES, InputSettings(max_message_bytes=256)).decode([good[0], bad, good[1]])
    assert batch.n == 2 and batch.offset.tolist() == [0, 2]  # the others go on, in order
    np.testing.assert_array_equal(batch.rows, [[1, 2, 3], [4, 5, 6]])
    assert len(dead) == 1 and dead[0].reason == reason and dead[0].message is bad
    h = dict(dead_letter_headers(dead[0]))
    assert h["dlq.reason"] == reason.encode() and h["dlq.topic"] == b"obs"
    assert h["dlq.partition"] == b"0" and h["dlq.offset"] == b"1" and h["trace"] == b"abc"
    assert "\n" not in h["dlq.detail"].decode()


def test_single_feature_and_empty_batch():
    batch, dead = Decoder(["cpu"], InputSettings()).decode([msg({"cpu": 2.5})])
    assert batch.rows.tolist() == [[2.5]] and not dead
    batch, dead = Decoder(FEATURES, InputSettings()).decode([])
    assert batch.n == 0 and batch.rows.shape == (0, 3) and dead == []
