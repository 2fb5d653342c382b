"""The typed (msgspec) decoding path gives exactly what the orjson path gives: the same batch for
good messages, and for a batch holding any message it cannot take, the orjson path's dead
letters and order (it hands the batch over)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, Message

from stream_detector.config import InputSettings
from stream_detector.ingest.decode import Decoder

pytest.importorskip("msgspec")

FEATURES = ["cpu", "mem", "disk", "temp sensor/1"]  # not all names are Python identifiers


def msg(value, key=b"host-1", offset=0):
    v = value if isinstance(value, bytes) else orjson.dumps(value)
    return Message(topic="obs", partition=offset % 3, offset=offset, key=key, value=v, timestamp=(TIMESTAMP_CREATE_TIME, 7 + offset))


def same(a, b):
    (ba, da), (bb, db) = a, b
    assert ba.keys == bb.keys and ba.topic == bb.topic
    for col in ("rows", "event_time_ms", "partition", "offset"):
        np.testing.assert_array_equal(getattr(ba, col), getattr(bb, col))
    assert [(d.reason, d.detail, d.message.offset()) for d in da] == [(d.reason, d.detail, d.message.offset()) for d in db]


@pytest.mark.parametrize("settings", [InputSettings(), InputSettings(key_field="host", timestamp_field="t", timestamp_unit="s")])
def test_typed_path_equals_orjson_path(rng, settings):
    good = []
    for i, r in enumerate(rng.normal(size=(40, 4)).tolist()):
        obj = dict(zip(FEATURES, r)) | {"host": f"h{i % 5}" if i % 4 else i, "t": 1_700_000_000 + i / 4, "extra": [1, 2]}
        obj["mem"] = int(obj["mem"] * 100)  # integers are numbers too
        good.append(msg(obj, key=f"k{i % 6}".encode(), offset=i))
    typed, plain = Decoder(FEATURES, settings), Decoder(FEATURES, settings, typed=False)
    assert typed._typed is not None
    same(typed.decode(good), plain.decode(good))
    assert typed.decode(good)[0].n == 40

    bad = [msg({"cpu": 1, "mem": True, "disk": 3, "temp sensor/1": 1, "host": "a", "t": 1}, offset=100),
           msg(b"{oops", offset=101), msg({"cpu": 1e39, "mem": 1, "disk": 1, "temp sensor/1": 1, "host": "a", "t": 1}, offset=102)]
    mixed = good[:10] + bad + good[10:]
    batch, dead = typed.decode(mixed)
    same((batch, dead), plain.decode(mixed))
    assert batch.n == 40 and [d.reason for d in dead] == ["non-numeric", "undecodable-json", "non-finite"]
