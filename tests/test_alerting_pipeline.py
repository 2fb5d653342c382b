"""The alerting pipeline end to end (issue 20) against the real broker and the real Alertmanager:
a fleet-wide fault across 20 simulated entities pages once (one incident, one Alertmanager alert
with its members); a silenced entity's alerts are on the topic marked `silenced` and never reach
Alertmanager; a malformed control record goes to the dead-letter topic with its reason; an
Alertmanager that is down loses nothing (the batch's offsets wait for it, the alerts arrive once
it is back); after a false-positive verdict on the control topic the same pattern does not open
again on that entity, while a larger one does.

Model: the test bundle factory's "mean" model over 8 simulated sensors (as in test_service_kafka.py).
"""

from __future__ import annotations

import threading
import time
import uuid
from contextlib import contextmanager

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
from stream_detector.ingest.control import Feedback, Silence, encode_feedback, encode_silence
from stream_detector.offline.simulate import SimConfig, Simulator, encode_event, feature_names
from stream_detector.service.control import write_control
from stream_detector.service.loop import Detector

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
pytest_plugins = ["alertmanager_proc"]

F, W, E = 8, 8, 20
DETECTION = {"warmup": 100, "history": 500, "resolve_after": 1000, "cooldown": 0, "incident_window_s": 60}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bundle")
    clean = Simulator(SimConfig(entities=E, features=F, seed=99), 400).frame()[2]
    center, scale = clean.mean(0), clean.std(0)
    names = feature_names(F)
    probe = make_bundle(tmp, names, W, "mean", 1.0, name="probe", center=center, scale=scale)
    keys, times, rows = Simulator(SimConfig(entities=E, features=F, seed=98), 300).frame()
    normal = DetectorCore(probe, Scorer(probe, provider="cpu"), DetectionSettings()).process(EventBatch.build(keys, rows, times)).score
    return make_bundle(tmp, names, W, "mean", 2.0 * float(np.quantile(normal, 0.999)), center=center, scale=scale)


def topics(make_topic):
    return {"topics": [make_topic(partitions=2)], "alerts_topic": make_topic(), "dlq_topic": make_topic(), "control_topic": make_topic(config={"cleanup.policy": "compact"})}


def settings_for(bootstrap, kafka, bundle, am_urls, detection=None, alertmanager=None):
    return load_settings(
        None,
        {
            "kafka": {"bootstrap_servers": bootstrap, "group_id": f"g-{uuid.uuid4().hex[:8]}", **kafka},
            "input": {"timestamp_field": "ts"},
            "model": {"bundle": str(bundle.path), "provider": "cpu"},
            "detection": {**DETECTION, **(detection or {})},
            "runtime": {"max_batch": 2000, "max_wait_ms": 50, "commit_interval_s": 0.5},
            "alertmanager": {"urls": am_urls, "resend_interval_s": 5, **(alertmanager or {})},
        },
    )


def produce(bootstrap, topic, events):
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for key, _, value in events:
        p.produce(topic, key=key.encode(), value=value)
    assert p.flush(30) == 0


def fleet_events(sim):
    return list(sim.events())


def alerts_on(bootstrap, topic):
    return [orjson.loads(m.value()) for m in read_to_end(bootstrap, topic)]


@contextmanager
def running(detector):
    """`detector.run` on a thread for the block; stopped, and checked to have ended, after it."""
    thread = threading.Thread(target=detector.run, kwargs={"timeout": 90}, daemon=True)
    thread.start()
    try:
        yield
    finally:
        detector.stop()
        thread.join(60)
    assert not thread.is_alive()


def wait_for(what, predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}")


def test_fleet_fault_pages_once_a_silenced_entity_not_at_all_and_bad_control_records_are_dead_letters(kafka_bootstrap, make_topic, bundle, alertmanager):
    kafka = topics(make_topic)
    s = settings_for(kafka_bootstrap, kafka, bundle, [alertmanager.url])
    sim = Simulator(SimConfig(entities=E, features=F, seed=5, fleet_fault_tick=250, fleet_fault_ticks=30), 320)
    silenced = sim.keys[7]
    now = int(time.time() * 1000)
    write_control(s, [encode_silence(Silence("maint-7", silenced, now - 60_000, now + 3_600_000, "disk swap", "test"))])
    bad = Producer({"bootstrap.servers": kafka_bootstrap})
    bad.produce(kafka["control_topic"], key=b"silence:x", value=b"{not json")
    assert bad.flush(10) == 0
    events = fleet_events(sim)
    produce(kafka_bootstrap, kafka["topics"][0], events)
    detector = Detector(s)
    stats = detector.run(max_messages=len(events), timeout=120)
    assert stats.consumed == len(events)

    alerts = alerts_on(kafka_bootstrap, kafka["alerts_topic"])
    opened = [a for a in alerts if a["state"] == "open"]
    assert len({a["key"] for a in opened}) == E, "every entity's alert is on the topic"
    assert sum(a["page"] for a in opened if a["silenced"] is None) == 1, "one page for the fleet-wide fault"
    assert len({a["incident_id"] for a in opened}) == 1
    mine = [a for a in alerts if a["key"] == silenced]
    assert mine and all(a["silenced"] == {"id": "maint-7", "reason": "disk swap"} for a in mine)
    assert all(a["silenced"] is None for a in alerts if a["key"] != silenced)

    am = wait_for("the incident in Alertmanager", lambda: alertmanager.alerts())
    assert len(am) == 1, "the storm is one Alertmanager alert"
    members = {m.strip() for m in am[0]["annotations"]["members"].split(",")}
    assert members == set(sim.keys) - {silenced}, "every member but the silenced one"
    assert am[0]["labels"]["incident_id"] == opened[0]["incident_id"]

    dead = read_to_end(kafka_bootstrap, kafka["dlq_topic"])
    assert len(dead) == 1 and dict(dead[0].headers())["dlq.reason"] == b"bad-control-record"
    assert b"JSON" in dict(dead[0].headers())["dlq.detail"] or b"json" in dict(dead[0].headers())["dlq.detail"]


def committed(bootstrap, group, topic):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = [TopicPartition(topic, p) for p in c.list_topics(topic, timeout=10).topics[topic].partitions]
        return sum(max(tp.offset, 0) for tp in c.committed(tps, timeout=10))
    finally:
        c.close()


def test_alertmanager_down_loses_nothing_and_holds_the_offsets_until_it_is_back(kafka_bootstrap, make_topic, bundle, make_alertmanager):
    am = make_alertmanager(start=False)
    kafka = topics(make_topic)
    s = settings_for(kafka_bootstrap, kafka, bundle, [am.url])
    sim = Simulator(SimConfig(entities=E, features=F, seed=6, fleet_fault_tick=200, fleet_fault_ticks=20), 260)
    events = fleet_events(sim)
    produce(kafka_bootstrap, kafka["topics"][0], events)
    detector = Detector(s)
    with running(detector):
        wait_for("every event scored", lambda: detector.stats.consumed == len(events) and detector.stats.alerts["open"] >= 1)
        time.sleep(2.0)  # several commit intervals
        assert detector._alertmanager is not None and detector._alertmanager.pending > 0
        assert f"alertmanager pending={detector._alertmanager.pending}" in detector.describe()  # the kill -USR1 line
        held = committed(kafka_bootstrap, s.kafka.group_id, kafka["topics"][0])
        assert held < len(events), "the offsets of batches whose alerts Alertmanager has not taken are not committed"
        am.start()
        wait_for("the alerts in Alertmanager", lambda: am.alerts())
        wait_for("everything committed", lambda: committed(kafka_bootstrap, s.kafka.group_id, kafka["topics"][0]) == len(events))
        assert detector._alertmanager.pending == 0


def test_false_positive_verdict_stops_the_same_pattern_but_not_a_larger_one(kafka_bootstrap, make_topic, bundle):
    kafka = topics(make_topic)
    s = settings_for(kafka_bootstrap, kafka, bundle, [], {"resolve_after": 10, "cooldown": 10})
    sim = Simulator(SimConfig(entities=4, features=F, seed=7), 600)
    keys, times, rows = sim.frame()
    rows = rows.reshape(600, 4, F)
    scale = rows.std(axis=(0, 1))
    for start, size in ((250, 2.0), (400, 2.0), (520, 6.0)):  # the pattern, the same again, a larger one
        rows[start : start + 15, 2, :4] += size * scale[:4]
    rows = rows.reshape(-1, F)
    names = sim.features
    events = [(k, int(t), encode_event(k, int(t), names, r)) for k, t, r in zip(keys, times.tolist(), rows.tolist())]
    topic = kafka["topics"][0]
    produce(kafka_bootstrap, topic, events[: 330 * 4])
    detector = Detector(s)
    with running(detector):
        first = wait_for("the first alert", lambda: [a for a in alerts_on(kafka_bootstrap, kafka["alerts_topic"]) if a["state"] == "open"])
        assert [a["key"] for a in first] == [sim.keys[2]]
        write_control(s, [encode_feedback(Feedback(first[0]["alert_id"], "false_positive", None, "not an incident", int(time.time() * 1000)))])
        wait_for("the verdict applied", lambda: detector.control.applied == 1)
        produce(kafka_bootstrap, topic, events[330 * 4 :])
        wait_for("every event scored", lambda: detector.stats.consumed == len(events))
    opened = [a for a in alerts_on(kafka_bootstrap, kafka["alerts_topic"]) if a["state"] == "open"]
    ticks = [(a["source"]["offset"], a["event_time"]) for a in opened]
    assert len(opened) == 2, f"the pattern and the larger one, not the repeat: {ticks}"
    t2 = (int(np.datetime64(opened[1]["event_time"].rstrip("Z"), "ms").astype(np.int64)) - sim.config.start_ms) // 1000
    assert 520 <= t2 < 535, "the second alert is the larger pattern"


def test_check_names_an_unreachable_alertmanager_in_one_sentence(kafka_bootstrap, make_topic, bundle, make_alertmanager, capsys):
    from stream_detector.cli import main

    kafka = topics(make_topic)
    up, down = make_alertmanager(), make_alertmanager(start=False)
    args = ["check", "--kafka.bootstrap-servers", kafka_bootstrap, "--kafka.topics", kafka["topics"][0], "--kafka.alerts-topic", kafka["alerts_topic"], "--kafka.dlq-topic", kafka["dlq_topic"], "--model.bundle", str(bundle.path), "--model.provider", "cpu"]
    assert main([*args, "--alertmanager.urls", up.url]) == 0
    assert f"alertmanager ok: {up.url}" in capsys.readouterr().out
    assert main([*args, "--alertmanager.urls", f"{up.url},{down.url}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and down.url in err and "Traceback" not in err


def test_beyond_max_pending_the_loop_stops_consuming_until_alertmanager_answers(kafka_bootstrap, make_topic, bundle, make_alertmanager):
    am = make_alertmanager(start=False)
    kafka = topics(make_topic)
    s = settings_for(kafka_bootstrap, kafka, bundle, [am.url], {"incident_window_s": 0}, {"max_pending": 3})
    s = s.model_copy(update={"runtime": s.runtime.model_copy(update={"max_batch": 20})})  # small batches: it stops soon after
    sim = Simulator(SimConfig(entities=E, features=F, seed=8, fleet_fault_tick=200, fleet_fault_ticks=20), 400)
    events = fleet_events(sim)
    produce(kafka_bootstrap, kafka["topics"][0], events)
    detector = Detector(s)
    with running(detector):
        wait_for("the pending limit reached", lambda: detector._alertmanager is not None and detector._alertmanager.pending >= 3)
        held = detector.stats.consumed
        time.sleep(2.0)
        assert detector.stats.consumed == held < len(events), "no consuming while Alertmanager holds max_pending"
        assert detector.stats.backpressure_s > 1.0
        am.start()
        wait_for("every event consumed once Alertmanager answers", lambda: detector.stats.consumed == len(events))
        wait_for("every alert accepted", lambda: detector._alertmanager.pending == 0)
