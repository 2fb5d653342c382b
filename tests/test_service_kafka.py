"""The service end to end against the real broker: simulated fleet with injected anomalies →
`Detector.run` → alerts and dead letters on their topics, offsets committed, restart on the same
group resumes without re-alerting, and a fresh group reproduces the same alert ids.

Model: the test bundle factory's "mean" model (reconstructs each window as its mean) over 8
sensors, window 8, with the normaliser fitted on clean simulated data and the calibrated
threshold at 2x the 0.999 quantile of clean scores. Stated bounds: every spike and level shift
gets exactly one `open` alert within 3 events of its start; at most 2 false `open`s in 25,000
events (0 was measured for seeds 3-10).
"""

from __future__ import annotations

import uuid
from datetime import datetime

import numpy as np
import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from bundle_factory import make_bundle
from conftest import read_to_end
from stream_detector.config import load_settings
from stream_detector.core.events import EventBatch
from stream_detector.core.pipeline import DetectionSettings, DetectorCore
from stream_detector.core.scorer import Scorer
from stream_detector.service.loop import Detector
from stream_detector.offline.simulate import STRONG_KINDS, SimConfig, Simulator

pytestmark = pytest.mark.kafka

F, W, E, T = 8, 8, 50, 500  # sensors, window, entities, ticks (events per entity)
SPLIT = 250  # the first service instance handles ticks [0, SPLIT), the restarted one the rest
PARTITIONS = 4
MAX_DELAY = 3  # events from an anomaly's start to its open alert
MAX_FALSE = 2
DETECTION = {"warmup": 200, "history": 1000, "quantile": 0.995, "multiplier": 3.0, "resolve_after": 10, "cooldown": 100}


def _bundle(tmp_path, features):
    clean = Simulator(SimConfig(entities=E, features=F, seed=99), 400).frame()[2]
    center, scale = clean.mean(0), clean.std(0)
    probe = make_bundle(tmp_path, features, W, "mean", 1.0, name="probe", center=center, scale=scale)
    keys, times, rows = Simulator(SimConfig(entities=E, features=F, seed=98), 300).frame()
    normal = DetectorCore(probe, Scorer(probe, provider="cpu"), DetectionSettings()).process(EventBatch.build(keys, rows, times)).score
    threshold = 2.0 * float(np.quantile(normal, 0.999))
    return make_bundle(tmp_path, features, W, "mean", threshold, center=center, scale=scale)


def _settings(bootstrap, topic, group, alerts, dlq, bundle):
    return load_settings(
        None,
        {
            "kafka": {"bootstrap_servers": bootstrap, "group_id": group, "topics": [topic], "alerts_topic": alerts, "dlq_topic": dlq},
            "input": {"timestamp_field": "ts", "max_message_bytes": 4096},
            "model": {"bundle": str(bundle.path), "provider": "cpu"},
            "detection": DETECTION,
            "runtime": {"max_batch": 2000, "max_wait_ms": 50, "commit_interval_s": 0.5},
        },
    )


def _produce(bootstrap, topic, items):
    """items: (key bytes|None, value bytes); returns [(partition, offset)] in order."""
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    where: list = [None] * len(items)

    def cb(i):
        def on_delivery(err, msg):
            assert err is None, err
            where[i] = (msg.partition(), msg.offset())
        return on_delivery

    for i, (k, v) in enumerate(items):
        p.produce(topic, key=k, value=v, on_delivery=cb(i))
        if i % 5000 == 0:
            p.poll(0)
    assert p.flush(30) == 0
    return where


def _opens(msgs):
    alerts = [orjson.loads(m.value()) for m in msgs]
    return [a for a in alerts if a["state"] == "open"]


def _tick(alert):
    ms = datetime.fromisoformat(alert["event_time"].replace("Z", "+00:00")).timestamp() * 1000
    return round((ms - SimConfig().start_ms) / SimConfig().interval_ms)


def _match(opens, truth):
    """{anomaly index: [delays]} and the number of false opens (overlapping no anomaly of any kind)."""
    matched: dict[int, list[int]] = {}
    false = 0
    for a in opens:
        t = _tick(a)
        hits = [i for i, x in enumerate(truth) if x.entity == a["key"] and x.start <= t < x.end + W + 10]
        if hits:
            matched.setdefault(hits[0], []).append(t - truth[hits[0]].start)
        else:
            false += 1
    return matched, false


BAD = {
    "undecodable-json": b"{not json",
    "not-an-object": b"[1, 2, 3]",
    "missing-feature": orjson.dumps({"ts": 1}),
    "non-numeric": None,  # filled in with a string feature below
    "non-finite": None,
    "oversize": b"{" + b" " * 5000 + b"}",
}


def test_service_end_to_end(kafka_bootstrap, make_topic, tmp_path, rng):
    seed = int(rng.integers(1_000_000))
    print(f"[simulation seed] {seed}")
    sim = Simulator(SimConfig(entities=E, features=F, anomaly_rate=2.5, warmup=100, seed=seed), T)
    events = list(sim.events())  # tick-major: event i is tick i // E
    truth = sim.truth
    strong = [i for i, x in enumerate(truth) if x.kind in STRONG_KINDS]
    assert len(strong) >= 5, "the simulation should inject several strong anomalies"
    bundle = _bundle(tmp_path, sim.features)

    topic = make_topic(partitions=PARTITIONS, prefix="obs")
    alerts_a, alerts_c, dlq = make_topic(prefix="alerts"), make_topic(prefix="alerts"), make_topic(prefix="dlq")
    group = f"sd-{uuid.uuid4().hex[:8]}"
    first = [(k.encode(), v) for k, _, v in events[: SPLIT * E]]
    rest = [(k.encode(), v) for k, _, v in events[SPLIT * E :]]

    # Phase 1: the first instance handles ticks [0, SPLIT) and commits.
    _produce(kafka_bootstrap, topic, first)
    stats_a = Detector(_settings(kafka_bootstrap, topic, group, alerts_a, dlq, bundle)).run(max_messages=len(first), timeout=60)
    assert stats_a.consumed == len(first) and stats_a.dead_letters == 0
    probe = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    committed = {tp.partition: tp.offset for tp in probe.committed(tps, timeout=10)}
    ends = {p: probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(PARTITIONS)}
    probe.close()
    assert committed == ends, "every consumed offset is committed after delivery"
    opens_a = _opens(read_to_end(kafka_bootstrap, alerts_a))

    # Phase 2: the rest plus bad messages; a restarted instance on the same group picks up after the commit.
    good_row = dict(zip(sim.features, [1.0] * F), ts=1)
    bad = dict(BAD)
    bad["non-numeric"] = orjson.dumps({**good_row, sim.features[3]: "1.5"})
    bad["non-finite"] = orjson.dumps({**good_row, sim.features[5]: 1e39})
    bad_items = [(f"bad-{reason}".encode(), value) for reason, value in bad.items()]
    bad_items.append((None, orjson.dumps(good_row)))  # missing key
    where = _produce(kafka_bootstrap, topic, rest + bad_items)
    bad_where = where[len(rest) :]
    stats_b = Detector(_settings(kafka_bootstrap, topic, group, alerts_a, dlq, bundle)).run(max_messages=len(rest) + len(bad_items), timeout=60)
    assert stats_b.consumed == len(rest) + len(bad_items), "the restart resumes exactly after the committed offsets"
    assert stats_b.dead_letters == len(bad_items)
    opens_ab = _opens(read_to_end(kafka_bootstrap, alerts_a))
    ids_a = {a["alert_id"] for a in opens_a}
    opens_b = [a for a in opens_ab if a["alert_id"] not in ids_a]
    assert len(opens_ab) == len(opens_a) + len(opens_b), "the restarted service re-alerted something already alerted"
    assert all(_tick(a) >= SPLIT for a in opens_b)

    # Dead letters: original bytes, reason and source position in headers.
    dead = read_to_end(kafka_bootstrap, dlq)
    assert len(dead) == len(bad_items)
    by_offset = {(int(dict(m.headers())["dlq.partition"]), int(dict(m.headers())["dlq.offset"])): m for m in dead}
    expected_reasons = [*bad.keys(), "missing-key"]
    for (key, value), (p, o), reason in zip(bad_items, bad_where, expected_reasons):
        m = by_offset[(p, o)]
        h = dict(m.headers())
        assert h["dlq.reason"].decode() == reason and h["dlq.topic"].decode() == topic
        assert m.value() == value and m.key() == key

    # A fresh group over the whole topic (no restart) reproduces phase 1's alert ids exactly.
    stats_c = Detector(_settings(kafka_bootstrap, topic, f"{group}-c", alerts_c, dlq, bundle)).run(max_messages=len(events) + len(bad_items), timeout=60)
    assert stats_c.consumed == len(events) + len(bad_items)
    opens_c = _opens(read_to_end(kafka_bootstrap, alerts_c))
    assert ids_a <= {a["alert_id"] for a in opens_c}, "alert ids are deterministic: same input, same ids"

    # Detection quality of the uninterrupted run: every strong anomaly exactly one open, quickly.
    matched, false = _match(opens_c, truth)
    for i in strong:
        x = truth[i]
        delays = matched.get(i, [])
        assert len(delays) == 1, f"{x.kind} on {x.entity} at tick {x.start}: {len(delays)} open alerts (seed {seed})"
        assert delays[0] <= MAX_DELAY, f"{x.kind} on {x.entity}: alerted {delays[0]} events after its start (seed {seed})"
    print(f"[detection] {len(strong)} strong anomalies, {len(opens_c)} opens, {false} false; run A {stats_a}")
    assert false <= MAX_FALSE, f"{false} false open alerts (seed {seed})"
    # And across the restart: the same, except anomalies next to the restart (state restarts cold).
    matched_ab, false_ab = _match(opens_ab, truth)
    for i in strong:
        x = truth[i]
        if x.end > SPLIT - 20 and x.start < SPLIT + W + 5:
            continue
        assert len(matched_ab.get(i, [])) == 1, f"{x.kind} on {x.entity} at tick {x.start} across the restart (seed {seed})"
    assert false_ab <= MAX_FALSE + 2


def test_cli_run_sigterm_commits_and_exits(kafka_bootstrap, make_topic, tmp_path):
    """`stream-detector run` as operators start it: SIGTERM → finish, deliver, commit, exit 0."""
    import os
    import signal
    import subprocess
    import sys
    import time

    sim = Simulator(SimConfig(entities=10, features=F, seed=4), 100)
    bundle = make_bundle(tmp_path, sim.features, W, "mean", 50.0)
    topic, alerts, dlq = make_topic(partitions=2, prefix="obs"), make_topic(prefix="alerts"), make_topic(prefix="dlq")
    _produce(kafka_bootstrap, topic, [(k.encode(), v) for k, _, v in sim.events()])
    group = f"sd-{uuid.uuid4().hex[:8]}"
    bad_bundle = subprocess.run(
        [sys.executable, "-m", "stream_detector.cli", "run", "--model.bundle", str(tmp_path / "nope"), "--kafka.bootstrap-servers", kafka_bootstrap],
        capture_output=True, text=True, timeout=60,
    )
    assert bad_bundle.returncode == 2 and "nope" in bad_bundle.stderr and "Traceback" not in bad_bundle.stderr
    nan_bundle = make_bundle(tmp_path, sim.features, W, "nan", 50.0, name="nan")  # sound files, a model that scores NaN
    for command in ("check", "run"):
        nan_model = subprocess.run(
            [sys.executable, "-m", "stream_detector.cli", command, "--model.bundle", str(nan_bundle.path), "--model.provider", "cpu",
             "--kafka.bootstrap-servers", kafka_bootstrap, "--kafka.topics", topic, "--kafka.alerts-topic", alerts, "--kafka.dlq-topic", dlq],
            capture_output=True, text=True, timeout=60,
        )
        assert nan_model.returncode == 2 and "produced NaN or infinite scores" in nan_model.stderr, (command, nan_model.stderr)
        assert "Traceback" not in nan_model.stderr, nan_model.stderr
    cmd = [
        sys.executable, "-m", "stream_detector.cli", "run", "--kafka.bootstrap-servers", kafka_bootstrap, "--kafka.group-id", group,
        "--kafka.topics", topic, "--kafka.alerts-topic", alerts, "--kafka.dlq-topic", dlq, "--model.bundle", str(bundle.path),
        "--model.provider", "cpu", "--runtime.commit-interval-s", "0.3", "--runtime.shutdown-grace-s", "5",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "SD_INPUT__TIMESTAMP_FIELD": "ts"})
    probe = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
    tps = [TopicPartition(topic, p) for p in range(2)]
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if sum(max(tp.offset, 0) for tp in probe.committed(tps, timeout=5)) == 1000:
                break
            time.sleep(0.3)
        proc.send_signal(signal.SIGUSR1)  # a stuck service's diagnosis: thread stacks and the loop's state; it goes on
        time.sleep(1.5)
        assert proc.poll() is None, "SIGUSR1 must not stop the service"
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert time.monotonic() - t0 < 5 + 2, "shutdown took longer than the grace period"
    assert "SIGTERM" in err and "stopped: 1000 consumed" in err and "Traceback" not in err
    state = next(line for line in err.splitlines() if "state: consumed=" in line)
    assert "consumed=1000 (last " in state and f"assigned={topic}[0],{topic}[1] lag={topic}[0]=0,{topic}[1]=0" in state, state
    assert "(most recent call first)" in err.split("state: consumed=")[0], "the thread stacks come first"
    assert sum(tp.offset for tp in probe.committed(tps, timeout=5)) == 1000
    probe.close()
