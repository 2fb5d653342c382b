"""Helpers for the fault-injection suite (tests/test_reliability_faults.py, tests/test_recovery.py):
`stream-detector run` as a subprocess, per-scenario topics (`Env`) and the simulated stream's bundle,
topic reading and committed-progress probes against a real broker, a second broker that may be
stopped, and the results table (`SD_RELIABILITY_REPORT=path` appends one JSON line per scenario;
bench/reliability.py turns them into the table of docs/reliability.md)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

REPO = Path(__file__).resolve().parent.parent
BROKER_SH = REPO / "deploy" / "kafka" / "broker.sh"


def wait_until(cond: Callable[[], bool], timeout: float, what: str, every: float = 0.1, alive: Iterable["Service"] = ()) -> float:
    """Poll `cond` until true; returns the seconds it took. AssertionError naming `what` on timeout,
    or at once (with its log) if one of the `alive` services exited meanwhile."""
    t0 = time.monotonic()
    alive = list(alive)
    while not cond():
        for s in alive:
            if not s.alive():
                raise AssertionError(f"the service exited ({s.proc.returncode}) while waiting for {what}: {s.log()[-2500:]}")
        if time.monotonic() - t0 > timeout:
            stacks = ""
            for s in alive:  # a service that is alive but stuck: its threads' stacks (SIGUSR1, cli.py) and log
                s.proc.send_signal(signal.SIGUSR1)
                time.sleep(1.0)
                stacks += f"\n--- {s.log_path.name}:\n{s.log()[-6000:]}"
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{stacks}")
        time.sleep(every)
    return time.monotonic() - t0


def produce(bootstrap: str, topic: str, items: Iterable[tuple[bytes | None, bytes]], rate: float | None = None) -> int:
    """Produce (key, value) items (idempotent producer, large messages allowed); `rate` events/s
    paces them (a live stream). Returns the number produced, all acknowledged."""
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5, "message.max.bytes": 10_000_000,
                  "message.timeout.ms": 300_000, "log_level": 2})
    errors: list[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(err.str())

    t0 = time.monotonic()
    n = 0
    for k, v in items:
        while True:
            try:
                p.produce(topic, key=k, value=v, on_delivery=on_delivery)
                break
            except BufferError:
                p.poll(0.05)
        n += 1
        if n % 2000 == 0:
            p.poll(0)
        if rate is not None and n % 100 == 0:
            ahead = n / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    assert p.flush(300) == 0, "the test producer could not deliver everything"
    assert not errors, errors[:3]
    return n


def read_topic(bootstrap: str, topic: str, read_committed: bool = True, settle_s: float = 1.0) -> list[Any]:
    """Every message of the topic as a read_committed (or read_uncommitted) consumer sees it, read
    until the end offsets (control records of transactions included in those) and quiet."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest",
                  "enable.auto.commit": False, "enable.partition.eof": True,
                  "isolation.level": "read_committed" if read_committed else "read_uncommitted"})
    ends_reader = Consumer({"bootstrap.servers": bootstrap, "group.id": f"ends-{uuid.uuid4().hex[:8]}", "isolation.level": "read_uncommitted"})
    try:
        meta = c.list_topics(topic, timeout=10).topics[topic]
        c.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
        out: list[Any] = []
        eof: set[int] = set()
        quiet_since = time.monotonic()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            msgs = c.consume(2000, timeout=0.2)
            for m in msgs:
                if m.error() is None:
                    out.append(m)
                    eof.discard(m.partition())
                    quiet_since = time.monotonic()
                else:
                    eof.add(m.partition())
            if len(eof) == len(meta.partitions) and time.monotonic() - quiet_since >= settle_s:
                # read_committed stops at the last stable offset: while a killed producer's
                # transaction is open (until the broker aborts it) there is more to wait for. The
                # end is the high watermark, asked of a read_uncommitted client: librdkafka
                # answers a read_committed one with the last stable offset, where it already is.
                pos = {tp.partition: tp.offset for tp in c.position([TopicPartition(topic, p) for p in meta.partitions])}
                ends = {p: ends_reader.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in meta.partitions}
                if all(pos[p] >= ends[p] or ends[p] == 0 for p in meta.partitions):
                    return out
                quiet_since = time.monotonic()  # look again after another quiet spell
        raise AssertionError(f"reading {topic} did not reach its end within 120 s (an open transaction?)")
    finally:
        c.close()
        ends_reader.close()


def alerts_of(msgs: list[Any]) -> list[dict[str, Any]]:
    return [orjson.loads(m.value()) for m in msgs]


def committed_total(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    """Sum of the group's committed offsets (what a restart would skip). Waits for stable offsets."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "isolation.level": "read_committed", "log_level": 0})
    try:
        got = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=30)
        return sum(max(tp.offset, 0) for tp in got)
    except KafkaException:  # e.g. the coordinator is still loading after a broker restart: ask again
        return -1
    finally:
        c.close()


class Progress:
    """The group's committed total, from one long-lived probe consumer (never joins the group), so
    a test can react within milliseconds of a commit."""

    def __init__(self, bootstrap: str, group: str, topic: str, partitions: int) -> None:
        # read_uncommitted: the broker answers at once instead of waiting for an open transaction's offsets
        self._c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "isolation.level": "read_uncommitted"})
        self._tps = [TopicPartition(topic, p) for p in range(partitions)]
        self._last = 0

    def __call__(self) -> int:
        """The committed total; the last one seen when the broker did not answer in time (a loaded
        machine): the caller's `wait_until` deadline, not one slow query, bounds the wait."""
        try:
            got = self._c.committed(self._tps, timeout=30)
        except KafkaException as e:
            if e.args[0].code() != KafkaError._TIMED_OUT:
                raise
            return self._last
        self._last = sum(max(tp.offset, 0) for tp in got)
        return self._last

    def close(self) -> None:
        self._c.close()


def create_topics(bootstrap: str, specs: dict[str, tuple[int, dict[str, str]]]) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futs = admin.create_topics([NewTopic(n, num_partitions=p, replication_factor=1, config=c) for n, (p, c) in specs.items()])
    for f in futs.values():
        f.result(timeout=60)


def delete_topics(bootstrap: str, names: list[str]) -> None:
    from confluent_kafka.admin import AdminClient

    if names:
        for f in AdminClient({"bootstrap.servers": bootstrap}).delete_topics(names, operation_timeout=30).values():
            try:
                f.result(timeout=30)
            except Exception:
                pass


class Service:
    """One `stream-detector run` process; stderr goes to a log file read by `stats()`."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "stream_detector.cli", "run", *args], stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, cwd=REPO)
        self.started = time.monotonic()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()

    def sigterm(self, timeout: float = 30.0) -> float:
        """SIGTERM; returns the seconds until the process exited."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        self._log.close()
        return time.monotonic() - t0

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._log.close()
        return rc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ensure_dead(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        if not self._log.closed:
            self._log.close()


def run_args(bootstrap: str, group: str, topic: str, alerts: str, dlq: str, changelog: str, bundle: Path, guarantee: str,
             instance: str = "i0", commit_s: float = 0.5, extra: list[str] | None = None) -> list[str]:
    return [
        "--kafka.bootstrap-servers", bootstrap, "--kafka.group-id", group, "--kafka.topics", topic, "--kafka.alerts-topic", alerts,
        "--kafka.dlq-topic", dlq, "--model.bundle", str(bundle), "--model.provider", "cpu", "--model.watch", "false",
        "--runtime.commit-interval-s", str(commit_s), "--runtime.shutdown-grace-s", "10", "--runtime.max-batch", "2000",
        "--processing.guarantee", guarantee, "--processing.instance-id", instance, "--processing.changelog-topic", changelog,
        "--kafka.consumer", "session.timeout.ms=6000", "--kafka.consumer", "heartbeat.interval.ms=1000",
        *(extra or []),
    ]


def compare(golden: list[dict[str, Any]], got: list[dict[str, Any]]) -> dict[str, Any]:
    """Alert events compared by `event_id` (alert_id + state + triggering event) and by `alert_id`."""
    g_ids = {a["event_id"] for a in golden}
    ids = Counter(a["event_id"] for a in got)
    return {
        "alerts_out": len(got),
        "distinct": len(ids),
        "duplicates": sum(c - 1 for c in ids.values()),
        "lost": len(g_ids - set(ids)),
        "extra": len(set(ids) - g_ids),
        "alert_ids_equal": {a["alert_id"] for a in golden} == {a["alert_id"] for a in got},
    }


@dataclass
class Row:
    scenario: str
    guarantee: str
    events_in: int
    alerts_out: int  # alert events read (read_committed consumer)
    duplicates: int
    lost: int
    recovery_s: float | None  # worst: from the fault to committed progress again
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def record(row: Row) -> None:
    path = os.environ.get("SD_RELIABILITY_REPORT")
    print(f"[reliability] {orjson.dumps(asdict(row)).decode()}")
    if path:
        with open(path, "ab") as f:
            f.write(orjson.dumps(asdict(row)) + b"\n")


def free_port() -> int:
    """A port whose successor (the broker's controller port) is free too."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + 1))
                    return port
                except OSError:
                    continue
    raise AssertionError("no free port pair found")


class SecondBroker:
    """A dedicated broker (deploy/kafka/broker.sh --port --data-dir) that a test may stop and start;
    the shared development broker is never touched."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.bootstrap = f"127.0.0.1:{self.port}"

    def _run(self, cmd: str) -> None:
        r = subprocess.run(["bash", str(BROKER_SH), cmd, "--port", str(self.port), "--data-dir", str(self.data_dir)],
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, f"broker.sh {cmd} failed: {r.stderr.strip()[-500:]}"

    def start(self) -> None:
        self._run("start")

    def stop(self) -> None:
        self._run("stop")


# ---- the simulated stream's model and per-scenario topics ------------------------------------------

DETECTION = ["--detection.warmup", "100", "--detection.history", "500", "--detection.quantile", "0.995",
             "--detection.multiplier", "3.0", "--detection.resolve-after", "10", "--detection.cooldown", "50",
             "--input.timestamp-field", "ts"]
SEED = int(os.environ.get("SD_TEST_SEED", "12345"))


def stream_bundle(path: Path, features: list[str], window: int = 8):
    """The test bundle factory's "mean" model for the simulated fleet, its threshold at twice the 99.9th
    percentile of normal scores."""
    from bundle_factory import make_bundle
    from stream_detector.core.events import EventBatch
    from stream_detector.core.pipeline import DetectionSettings, DetectorCore
    from stream_detector.core.scorer import Scorer
    from stream_detector.offline.simulate import SimConfig, Simulator

    n_features = len(features)
    clean = Simulator(SimConfig(entities=50, features=n_features, seed=SEED + 99), 400).frame()[2]
    center, scale = clean.mean(0), clean.std(0)
    probe = make_bundle(path, features, window, "mean", 1.0, name="probe", center=center, scale=scale)
    keys, times, rows = Simulator(SimConfig(entities=50, features=n_features, seed=SEED + 98), 300).frame()
    normal = DetectorCore(probe, Scorer(probe, provider="cpu"), DetectionSettings()).process(EventBatch.build(keys, rows, times)).score
    return make_bundle(path, features, window, "mean", 2.0 * float(np.quantile(normal, 0.999)), center=center, scale=scale)


class Env:
    """Per-scenario topics (alerts, dead letters, compacted changelog) on a broker, removed afterwards."""

    def __init__(self, bootstrap: str, partitions: int = 6) -> None:
        u = uuid.uuid4().hex[:10]
        self.bootstrap = bootstrap
        self.group, self.alerts, self.dlq, self.changelog = f"g-{u}", f"alerts-{u}", f"dlq-{u}", f"state-{u}"
        create_topics(bootstrap, {self.alerts: (1, {}), self.dlq: (1, {}), self.changelog: (partitions, {"cleanup.policy": "compact"})})

    def args(self, topic: str, bundle: Path, guarantee: str, instance: str = "i0", extra: list[str] | None = None, commit_s: float = 0.5) -> list[str]:
        return run_args(self.bootstrap, self.group, topic, self.alerts, self.dlq, self.changelog, bundle, guarantee, instance,
                        commit_s=commit_s, extra=[*DETECTION, *(extra or [])])

    def drop(self) -> None:
        delete_topics(self.bootstrap, [self.alerts, self.dlq, self.changelog])
