"""Recovery through the real broker (issue 22): static group membership, fencing of a duplicate
instance id, the scale-in of a static member (`stream-detector leave-group`), and `/readyz` while
the broker is away.

Each scenario streams a simulated fleet (60 entities x 500 ticks = 30,000 events, 8 sensors,
spikes and level shifts) live into a fresh 6-partition topic and compares the alert events with a
fault-free golden run over the same topic (by `event_id`), like tests/test_reliability_faults.py.
`SD_TEST_STATIC_MEMBERSHIP=off` runs the members with static membership turned off, to see the
restart test fail (the killed member's session must expire first).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid


import pytest

from faults import (
    REPO, Env, Progress, Row, SecondBroker, Service, alerts_of, compare, create_topics, delete_topics, free_port, produce,
    read_topic, record, stream_bundle, wait_until,
)
from stream_detector.offline.simulate import SimConfig, Simulator

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

F, E, T, P = 8, 60, 500, 6
N = E * T
RATE = 1200.0  # events/s: the stream lasts 25 s, so a kill, a restart and a join all land inside it
SEED = int(os.environ.get("SD_TEST_SEED", "12345"))
STATIC = ["--processing.static-membership", os.environ.get("SD_TEST_STATIC_MEMBERSHIP", "auto")]
SESSION_S = 60  # a long session: without static membership a killed member's partitions wait for all of it


@pytest.fixture(scope="module")
def fleet(kafka_bootstrap, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recovery")
    sim = Simulator(SimConfig(entities=E, features=F, anomaly_rate=2.5, warmup=120, seed=SEED + 22), T)
    bundle = stream_bundle(tmp, sim.features)
    topics: list[str] = []
    yield {"bundle": bundle.path, "tmp": tmp, "items": [(k.encode(), v) for k, _, v in sim.events()], "topics": topics}
    delete_topics(kafka_bootstrap, topics)


def _live(bootstrap: str, fleet: dict, rate: float | None = RATE) -> tuple[str, threading.Thread]:
    topic = f"obs-{uuid.uuid4().hex[:10]}"
    create_topics(bootstrap, {topic: (P, {})})
    fleet["topics"].append(topic)
    feeder = threading.Thread(target=produce, args=(bootstrap, topic, fleet["items"], rate), daemon=True)
    feeder.start()
    return topic, feeder


def _golden(bootstrap: str, topic: str, fleet: dict, tag: str) -> list[dict]:
    env = Env(bootstrap)
    svc = Service(env.args(topic, fleet["bundle"], "exactly_once", "golden"), fleet["tmp"] / f"golden-{tag}.log")
    probe = Progress(bootstrap, env.group, topic, P)
    try:
        wait_until(lambda: probe() == N, 180, "the golden run to commit everything", every=0.2, alive=[svc])
        assert svc.sigterm() < 12 and svc.proc.returncode == 0, svc.log()[-3000:]
    finally:
        svc.ensure_dead()
        probe.close()
    golden = alerts_of(read_topic(bootstrap, env.alerts))
    env.drop()
    assert len({a["alert_id"] for a in golden}) >= 10, "the stream should raise a good number of alerts"
    return golden


def _assigned(svc: Service, topic: str) -> bool:
    """The member logged an assignment of partitions of `topic` (kafka_io.py: "assigned obs[0], ...")."""
    return re.search(rf"assigned {re.escape(topic)}\[", svc.log()) is not None


def _args(env: Env, topic: str, fleet: dict, guarantee: str, instance: str = "i0", extra: list[str] | None = None) -> list[str]:
    session = ["--kafka.consumer", f"session.timeout.ms={SESSION_S * 1000}", "--kafka.consumer", "heartbeat.interval.ms=1000"]
    return env.args(topic, fleet["bundle"], guarantee, instance, extra=[*session, *STATIC, *(extra or [])])


def test_a_static_member_killed_and_restarted_gets_its_partitions_back_at_once(kafka_bootstrap, fleet):
    """exactly_once, one member, session timeout 60 s: kill -9 mid-stream and restart with the same
    instance id; the restart is assigned its partitions within a third of the session timeout (a
    dynamic member waits for the killed one's session to expire), and the alerts are the golden ones."""
    topic, feeder = _live(kafka_bootstrap, fleet)
    env = Env(kafka_bootstrap)
    probe = Progress(kafka_bootstrap, env.group, topic, P)
    tmp = fleet["tmp"]
    procs: list[Service] = []
    try:
        first = Service(_args(env, topic, fleet, "exactly_once"), tmp / "static-first.log")
        procs.append(first)
        wait_until(lambda: probe() >= 0.3 * N, 120, "30% committed", every=0.05, alive=[first])
        first.kill9()
        assert probe() < N, "the stream ended before the kill"
        again = Service(_args(env, topic, fleet, "exactly_once"), tmp / "static-again.log")
        procs.append(again)
        took = wait_until(lambda: _assigned(again, topic), SESSION_S, "the restarted member's assignment", every=0.05, alive=[again])
        print(f"[recovery] restart -> assigned in {took:.2f} s (session timeout {SESSION_S} s)")
        assert took < SESSION_S / 3, f"the restarted member waited {took:.1f} s for its partitions"
        wait_until(lambda: probe() == N, 180, "everything committed after the restart", every=0.2, alive=[again])
        assert again.sigterm() < 12 and again.proc.returncode == 0, again.log()[-3000:]
    finally:
        for s in procs:
            s.ensure_dead()
        probe.close()
    feeder.join(60)
    got = alerts_of(read_topic(kafka_bootstrap, env.alerts, read_committed=True))
    cmp = compare(_golden(kafka_bootstrap, topic, fleet, "static"), got)
    record(Row("kill -9, restart, static member (session 60 s)", "exactly_once", N, cmp["alerts_out"], cmp["duplicates"], cmp["lost"],
               round(took, 2), "recovery = restart to partitions assigned", cmp))
    assert cmp["alert_ids_equal"] and cmp["lost"] == 0 and cmp["extra"] == 0 and cmp["duplicates"] == 0, cmp
    env.drop()


def _last_line(log: str) -> str:
    lines = [ln for ln in log.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_two_live_processes_with_one_instance_id(kafka_bootstrap, fleet, guarantee):
    """A second process starts with the instance id of a running one: the broker hands it the
    member's partitions and fences the first (group.instance.id; in exactly_once mode the
    transactional id too), which exits 2 with one sentence and is not restarted by systemd
    (RestartPreventExitStatus=2); the second carries on, nothing is lost, and exactly_once
    readers see no duplicate (at_least_once may repeat events of the overlap, with identical ids)."""
    topic, feeder = _live(kafka_bootstrap, fleet)
    env = Env(kafka_bootstrap)
    probe = Progress(kafka_bootstrap, env.group, topic, P)
    tmp = fleet["tmp"]
    procs: list[Service] = []
    try:
        a = Service(_args(env, topic, fleet, guarantee), tmp / f"twin-a-{guarantee}.log")
        procs.append(a)
        wait_until(lambda: probe() >= 0.2 * N, 120, "20% committed", every=0.05, alive=[a])
        b = Service(_args(env, topic, fleet, guarantee), tmp / f"twin-b-{guarantee}.log")
        procs.append(b)
        t0 = time.monotonic()
        wait_until(lambda: not a.alive(), 60, "the first process to be fenced and exit", every=0.1, alive=[b])
        fenced_s = time.monotonic() - t0
        log_a = a.log()
        last = _last_line(log_a)
        assert a.proc.returncode == 2, f"exit status {a.proc.returncode}: {log_a[-3000:]}"
        assert "Traceback" not in log_a, log_a[-3000:]
        assert last.startswith("run: ") and "fenced by another process running with this member's instance id 'i0'" in last, last
        assert last.count(". ") == 0 and last.endswith("."), f"not one sentence: {last}"
        wait_until(lambda: probe() == N, 180, "everything committed by the second process", every=0.2, alive=[b])
        assert b.sigterm() < 12 and b.proc.returncode == 0, b.log()[-3000:]
    finally:
        for s in procs:
            s.ensure_dead()
        probe.close()
    feeder.join(60)
    got = alerts_of(read_topic(kafka_bootstrap, env.alerts, read_committed=True))
    cmp = compare(_golden(kafka_bootstrap, topic, fleet, f"twin-{guarantee}"), got)
    record(Row("two live processes, one instance id", guarantee, N, cmp["alerts_out"], cmp["duplicates"], cmp["lost"], None,
               f"the first exits 2 after {fenced_s:.1f} s: {last.removeprefix('run: ')[:60]}...", cmp))
    assert cmp["alert_ids_equal"] and cmp["lost"] == 0 and cmp["extra"] == 0, cmp
    if guarantee == "exactly_once":
        assert cmp["duplicates"] == 0, cmp
    env.drop()


def _describe(bootstrap: str, group: str) -> dict[str, int]:
    """{group.instance.id: partitions assigned} as the broker has it."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})  # kept alive until the answer is in
    desc = admin.describe_consumer_groups([group])[group].result(30)
    return {m.group_instance_id: len(m.assignment.topic_partitions) for m in desc.members}


def test_leave_group_hands_a_stopped_static_members_partitions_over_at_once(kafka_bootstrap, fleet):
    """Scale-in of a static member: SIGTERM keeps its membership (its partitions wait for the 60 s
    session timeout); `stream-detector leave-group` with its settings removes it, and the other
    member takes its partitions at once and finishes the stream."""
    topic, feeder = _live(kafka_bootstrap, fleet)
    env = Env(kafka_bootstrap)
    probe = Progress(kafka_bootstrap, env.group, topic, P)
    tmp = fleet["tmp"]
    members = [Service(_args(env, topic, fleet, "at_least_once", f"m{i}"), tmp / f"scalein-m{i}.log") for i in range(2)]
    try:
        wait_until(lambda: all(_assigned(m, topic) for m in members) and probe() >= 0.2 * N, 120, "both members assigned",
                   every=0.1, alive=members)
        wait_until(lambda: _describe(kafka_bootstrap, env.group) == {"m0": 3, "m1": 3}, 30, "3 + 3 partitions", alive=members)
        assert members[0].sigterm() < 12 and members[0].proc.returncode == 0, members[0].log()[-3000:]
        time.sleep(3)
        assert _describe(kafka_bootstrap, env.group) == {"m0": 3, "m1": 3}, "a stopped static member keeps its partitions"
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "stream_detector.cli", "leave-group", *_args(env, topic, fleet, "at_least_once", "m0")],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "instance 'm0' left group" in r.stdout, r.stdout
        wait_until(lambda: _describe(kafka_bootstrap, env.group) == {"m1": 6}, 20, "m1 to hold all 6 partitions", alive=members[1:])
        handover = time.monotonic() - t0
        print(f"[recovery] leave-group -> the other member holds every partition in {handover:.2f} s")
        assert handover < SESSION_S / 3
        wait_until(lambda: probe() == N, 180, "everything committed by the remaining member", every=0.2, alive=members[1:])
        members[1].sigterm()
        again = subprocess.run([sys.executable, "-m", "stream_detector.cli", "leave-group", *_args(env, topic, fleet, "at_least_once", "m0")],
                               capture_output=True, text=True, timeout=120, cwd=REPO)
        assert again.returncode == 0 and "is not a member of group" in again.stdout, (again.stdout, again.stderr)
    finally:
        for s in members:
            s.ensure_dead()
        probe.close()
    feeder.join(60)
    got = alerts_of(read_topic(kafka_bootstrap, env.alerts))
    cmp = compare(_golden(kafka_bootstrap, topic, fleet, "scalein"), got)
    assert cmp["alert_ids_equal"] and cmp["lost"] == 0 and cmp["extra"] == 0, cmp
    env.drop()


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def _ready_gauge(port: int) -> float | None:
    code, text = _get(port, "/metrics")
    m = re.search(r"^stream_detector_ready (\S+)$", text, re.M) if code == 200 else None
    return float(m.group(1)) if m else None


def test_readyz_follows_the_broker(tmp_path):
    """A dedicated broker (the shared one is never stopped) goes away: /readyz answers 503 within
    runtime.broker_unready_after_s of the broker going down (plus the time the broker takes to stop),
    with the reason, and stream_detector_ready is 0; after the broker is back both say ready again,
    in the same process."""
    after_s = 3.0
    broker = SecondBroker(tmp_path / "kafka")
    broker.start()
    svc = None
    try:
        bs = broker.bootstrap
        sim = Simulator(SimConfig(entities=20, features=F, seed=SEED + 3), 100)
        bundle = stream_bundle(tmp_path, sim.features)
        create_topics(bs, {"obs": (P, {})})
        produce(bs, "obs", [(k.encode(), v) for k, _, v in sim.events()])
        env = Env(bs)
        port = free_port()
        extra = ["--runtime.metrics-port", str(port), "--runtime.broker-unready-after-s", str(after_s),
                 "--kafka.consumer", "session.timeout.ms=45000"]
        svc = Service(env.args("obs", bundle.path, "at_least_once", extra=extra), tmp_path / "readyz.log")
        wait_until(lambda: _get(port, "/readyz")[0] == 200, 120, "/readyz ok", every=0.2, alive=[svc])
        assert _ready_gauge(port) == 1.0
        t0 = time.monotonic()
        broker.stop()
        stopped_s = time.monotonic() - t0
        wait_until(lambda: _get(port, "/readyz")[0] == 503, 60, "/readyz 503 while the broker is away", every=0.1, alive=[svc])
        down_s = time.monotonic() - t0
        code, body = _get(port, "/readyz")
        print(f"[recovery] broker.sh stop took {stopped_s:.1f} s; /readyz 503 {down_s:.1f} s after the stop began: {body.strip()}")
        assert code == 503 and "the Kafka broker has been unreachable for" in body, body
        assert down_s < stopped_s + after_s + 3, f"not ready only {down_s:.1f} s after the broker began to stop"
        assert _ready_gauge(port) == 0.0
        assert _get(port, "/healthz")[0] == 200, "a broker outage is not a dead service"
        time.sleep(after_s)
        assert _get(port, "/readyz")[0] == 503, "still away, still not ready"
        t1 = time.monotonic()
        broker.start()
        back = wait_until(lambda: _get(port, "/readyz")[0] == 200, 60, "/readyz ok after the broker is back", every=0.1, alive=[svc])
        print(f"[recovery] broker.sh start took {time.monotonic() - t1 - back:.1f} s; /readyz ok {back:.1f} s after it returned")
        assert _ready_gauge(port) == 1.0
        svc.sigterm()
        assert svc.proc.returncode == 0, svc.log()[-3000:]
    finally:
        if svc is not None:
            svc.ensure_dead()
        broker.stop()
