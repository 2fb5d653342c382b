"""Issue 23, done when: a BlueGene/L-style RAS log (tests/bglsynth.py: seeded, anomalous nodes with
single FATAL lines) trains with a line regex, epoch-second timestamps and the node as the entity,
once with flags only and once with the TOML file only; both bundles replay (judged per line by
`evaluate` with per-line labels) and run through Kafka (the real broker).

Model: the count model per time bucket (`--bucket 600`). Stated bounds, for these seeds: every
anomalous node is alerted at its first FATAL line (event recall 1.0, delay 0 lines), and no normal
node is alerted (no false episode), in replay and through Kafka alike.
"""

from __future__ import annotations

import uuid

import orjson
import pytest

from bglsynth import LINE_REGEX, T0, make_bgl
from stream_detector.core.bundle import load_bundle
from stream_detector.logs.spec import BUCKET_COUNTS_LAYOUT, LOGS_SECTION, load_log_spec

FLAGS = ["--log-format", "regex", "--line-regex", LINE_REGEX, "--timestamp-format", "epoch_s",
         "--entity", "field", "--entity-field", "node", "--bucket", "600", "--threads", "1"]


@pytest.fixture(scope="module")
def bgl(tmp_path_factory):
    """Training log (normal, 6 h of 30 nodes), test log (the 3 h after, 3 anomalous nodes) with per-line
    labels, and the two bundles: trained from flags only, and from the TOML file only."""
    from training.cli import main

    d = tmp_path_factory.mktemp("bgl")
    train, _, _ = make_bgl(0, 30, 6.0)
    (d / "train.log").write_text("\n".join(train) + "\n")
    test, labels, bad = make_bgl(1, 30, 3.0, anomalous=3, start=T0 + 6 * 3600)
    (d / "test.log").write_text("\n".join(test) + "\n")
    (d / "labels.txt").write_text("".join(f"{y}\n" for y in labels))
    assert main(["fit", "--format", "log", "--data", str(d / "train.log"), "--out", str(d / "flags"), *FLAGS]) == 0
    (d / "fit.toml").write_text(
        f"format = 'log'\ndata = '{d / 'train.log'}'\nout = '{d / 'toml'}'\nthreads = 1\n"
        f"log_format = 'regex'\nline_regex = '{LINE_REGEX}'\ntimestamp_format = 'epoch_s'\n"
        "entity = 'field'\nentity_field = 'node'\nbucket_s = 600\n"
    )
    assert main(["fit", "--config", str(d / "fit.toml")]) == 0
    return {"dir": d, "test": test, "labels": labels, "bad": bad, "bundles": {"flags": d / "flags", "toml": d / "toml"}}


def test_flags_and_toml_give_the_same_bundle(bgl):
    a, b = (load_bundle(p) for p in bgl["bundles"].values())
    assert a.extra[LOGS_SECTION] == b.extra[LOGS_SECTION] and a.model_version == b.model_version
    spec = load_log_spec(a)
    p = spec.parser
    assert (p.format, p.line_regex, p.timestamp_format, p.entity, p.entity_field) == ("regex", LINE_REGEX, "epoch_s", "field", "node")
    assert spec.layout == BUCKET_COUNTS_LAYOUT and spec.features.bucket_s == 600.0 and spec.features.idle_check_s is None
    assert a.model["score_floor"] == a.training["settings"]["count_threshold_floor"]
    assert spec.templates.vocab_size - 1 == 5  # the five normal kinds of message; FATAL lines are unknown


@pytest.mark.parametrize("how", ["flags", "toml"])
def test_replay_and_per_line_evaluation(bgl, how, tmp_path):
    from stream_detector.cli import main

    out = tmp_path / "replay"
    assert main(["replay", "--format", "log", "--model", str(bgl["bundles"][how]), "--input", str(bgl["dir"] / "test.log"),
                 "--out", str(out), "--model.provider", "cpu"]) == 0
    assert (out / "dead_letters.jsonl").read_bytes() == b""
    assert main(["evaluate", "--scores", str(out / "scores.csv"), "--labels", str(bgl["dir"] / "labels.txt"), "--no-plots"]) == 0
    m = orjson.loads((out / "metrics.json").read_bytes())
    assert m["series"] == 30 and m["anomalous_rows"] == sum(bgl["labels"]) and m["rows"] == len(bgl["test"])
    ev = m["overall"]["event"]
    assert ev["incidents"] == 3 and ev["incidents_alerted"] == 3 and ev["false_episodes"] == 0
    assert m["overall"]["delays"] == [0, 0, 0]
    opens = [a for a in map(orjson.loads, (out / "alerts.jsonl").read_bytes().splitlines()) if a["state"] == "open"]
    assert {a["key"] for a in opens} == bgl["bad"]
    fatal = {i for i, y in enumerate(bgl["labels"]) if y}
    for a in opens:
        assert "FATAL" in a["log"]["line"] and a["log"]["template"] == "<unknown template>"
        assert a["log"]["line"] in {bgl["test"][i] for i in fatal}


@pytest.mark.kafka
@pytest.mark.parametrize("how", ["flags", "toml"])
def test_runs_through_kafka(bgl, how, kafka_bootstrap, make_topic):
    from confluent_kafka import Consumer, Producer, TopicPartition

    from conftest import read_to_end
    from stream_detector.config import load_settings
    from stream_detector.service.loop import Detector

    values = [x.encode() for x in bgl["test"]]
    topic, alerts, dlq = make_topic(1), make_topic(1), make_topic(1)
    p = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for v in values:
        p.produce(topic, value=v)  # as a log shipper would: the line, no key
    assert p.flush(30) == 0
    group = f"g-{uuid.uuid4().hex[:8]}"
    settings = load_settings(None, {
        "kafka": {"bootstrap_servers": kafka_bootstrap, "group_id": group, "topics": [topic], "alerts_topic": alerts, "dlq_topic": dlq},
        "model": {"bundle": str(bgl["bundles"][how]), "provider": "cpu"},
        "runtime": {"max_batch": 500, "max_wait_ms": 50, "commit_interval_s": 0.5},
    })
    stats = Detector(settings).run(max_messages=len(values), timeout=60)
    assert stats.consumed == len(values) and stats.dead_letters == 0
    opens = [a for a in (orjson.loads(m.value()) for m in read_to_end(kafka_bootstrap, alerts)) if a["state"] == "open"]
    assert {a["key"] for a in opens} == bgl["bad"], [(a["key"], a["log"]["line"]) for a in opens]
    for a in opens:
        assert a["log"]["template"] == "<unknown template>" and "FATAL" in a["log"]["line"] and a["key"] in a["log"]["line"]
        assert a["top_features"][0]["name"] == "count:unknown" and a["source"]["topic"] == topic
    c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
    committed = c.committed([TopicPartition(topic, 0)], timeout=10)
    c.close()
    assert committed[0].offset == len(values)
