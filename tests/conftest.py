"""Shared fixtures: the real Kafka broker (session), unique topics (per test), seeded randomness."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
BROKER_SH = REPO / "deploy" / "kafka" / "broker.sh"


def _broker(cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(BROKER_SH), cmd], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """KAFKA_BOOTSTRAP if set, else the local broker from deploy/kafka/broker.sh. A broker that this
    fixture started is stopped at the end of the session; one that was already running is left alone.
    Never skips: if no broker can be had, the tests that need it fail with the reason."""
    env = os.environ.get("KAFKA_BOOTSTRAP")
    if env:
        yield env
        return
    was_running = _broker("status").returncode == 0
    started = _broker("start")
    if started.returncode != 0:
        pytest.fail(f"could not start the local Kafka broker: {started.stderr.strip()}", pytrace=False)
    line = [ln for ln in started.stdout.splitlines() if ln.startswith("bootstrap=")][-1]
    yield line.split("=", 1)[1]
    if not was_running:
        _broker("stop")


@pytest.fixture
def make_topic(kafka_bootstrap: str):
    """Factory: make_topic(partitions=1, config={...}, prefix='t') -> a new unique topic name."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    created: list[str] = []

    def factory(partitions: int = 1, config: dict[str, str] | None = None, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        fut = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})])
        fut[name].result(timeout=30)
        created.append(name)
        # Creation returns before every partition has a leader in the metadata; a consumer that
        # subscribes then may see fewer partitions until its next metadata refresh (minutes), and
        # a test run once read one of two partitions only. Wait until all of them lead.
        deadline = time.monotonic() + 30
        while True:
            meta = admin.list_topics(name, timeout=10).topics.get(name)
            if meta is not None and meta.error is None and len(meta.partitions) == partitions and all(
                p.leader >= 0 for p in meta.partitions.values()
            ):
                return name
            if time.monotonic() > deadline:
                raise AssertionError(f"topic {name}: not all {partitions} partitions have a leader 30 s after creation")
            time.sleep(0.1)

    yield factory
    if created:
        for f in admin.delete_topics(created, operation_timeout=30).values():
            try:
                f.result(timeout=30)
            except Exception:
                pass


def read_to_end(bootstrap: str, topic: str) -> list:
    """Every message of `topic` up to its current end offsets (a fresh reader from offset 0);
    asserts that all of them arrived."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest", "enable.auto.commit": False})
    meta = c.list_topics(topic, timeout=10).topics[topic]
    tps = [TopicPartition(topic, p, 0) for p in meta.partitions]
    want = sum(c.get_watermark_offsets(tp, timeout=10)[1] for tp in tps)
    c.assign(tps)
    out: list = []
    for _ in range(60):
        if len(out) >= want:
            break
        out += [m for m in c.consume(1000, timeout=0.5) if m.error() is None]
    c.close()
    assert len(out) == want
    return out


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A seeded generator; the seed is printed so a failure can be replayed (SD_TEST_SEED=...)."""
    seed = int(os.environ.get("SD_TEST_SEED", "12345"))
    print(f"[seed] {request.node.nodeid}: SD_TEST_SEED={seed}")
    return np.random.default_rng(seed)


def pytest_collection_modifyitems(config, items):
    try:
        import onnxruntime as ort

        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_device_present()
    except Exception:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="no CUDA GPU on this machine (gpu marker)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def _cuda_device_present() -> bool:
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia").exists()
