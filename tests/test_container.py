"""The `cpu` image for real: built here from the repository (deploy/docker/build-local.sh, podman or
docker through deploy/docker/engine.sh), then run against the real test broker the way
deploy/docker/compose.yaml runs it: non-root, read-only root filesystem, the bundle and the config
mounted read-only, host networking (the broker listens on 127.0.0.1).

`check` in the container passes; `run` in the container scores a simulated fleet with injected
spikes and level shifts and every one of them opens an alert on the alerts topic (the same bounds as
tests/test_service_kafka.py, which runs the same stream in-process); the image's own HEALTHCHECK
answers healthy; SIGTERM (`stop`) ends it with exit 0 inside the grace period with every offset
committed.

Skipped, with the reason, where no container engine can run containers (CI's machines by default;
docs/operations.md, "The container", says how to get one). The first build takes a minute or two
(Debian base with mmdebstrap, pip downloads); later runs reuse the engine's layer cache.
Run it alone with `pytest -m container -s` (-s prints the image size and start-up times)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from conftest import read_to_end
from stream_detector.offline.simulate import STRONG_KINDS, SimConfig, Simulator
from test_service_kafka import DETECTION, MAX_DELAY, MAX_FALSE, F, _bundle, _match, _opens, _produce

pytestmark = [pytest.mark.container, pytest.mark.kafka, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
ENGINE = REPO / "deploy" / "docker" / "engine.sh"
BUILD = REPO / "deploy" / "docker" / "build-local.sh"
E, T, PARTITIONS = 50, 400, 4
GRACE_S = 5  # runtime.shutdown_grace_s in the container
STOP_TIMEOUT_S = GRACE_S + 10  # the engine's SIGKILL deadline after SIGTERM (compose: stop_grace_period)


def engine(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["bash", str(ENGINE), *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        pytest.fail(f"`engine.sh {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()[-2000:]}", pytrace=False)
    return done


def engine_problem() -> str | None:
    """Why no container can run here, or None when an engine answers."""
    if not any(shutil.which(e) for e in ("podman", "docker")):
        return "no container engine (podman or docker) on this machine; Debian: apt-get install podman runc mmdebstrap"
    info = engine("info", timeout=60, check=False)
    if info.returncode != 0:
        lines = (info.stderr.strip() or info.stdout.strip() or "no output").splitlines()
        return f"the container engine does not answer (`engine.sh info`): {lines[-1][:300]}"
    return None


@pytest.fixture(scope="module")
def image() -> str:
    problem = engine_problem()
    if problem:
        pytest.skip(problem)
    t0 = time.monotonic()
    built = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, timeout=900)
    if built.returncode != 0:
        pytest.fail(f"build-local.sh failed ({built.returncode}): {built.stderr.strip()[-3000:]}", pytrace=False)
    name = built.stdout.strip().splitlines()[-1].removeprefix("image=")
    size = engine("image", "inspect", name, "--format", "{{.Size}}").stdout.strip()
    print(f"[container] {name}: built or reused in {time.monotonic() - t0:.1f} s, {int(size) / 1e6:.0f} MB")
    return name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def readable_by_anyone(path: Path) -> None:
    """The container runs as uid 10001; pytest's tmp dirs are the test user's only."""
    for p in [path, *path.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)


def test_the_image_runs_the_service_against_the_broker(image, kafka_bootstrap, make_topic, tmp_path):
    sim = Simulator(SimConfig(entities=E, features=F, anomaly_rate=2.5, warmup=100, kinds=STRONG_KINDS, seed=7), T)
    strong = list(range(len(sim.truth)))
    assert len(strong) >= 5, "the simulation should inject several strong anomalies"
    bundle = _bundle(tmp_path, sim.features)
    readable_by_anyone(bundle.path)
    topic, alerts, dlq = make_topic(partitions=PARTITIONS, prefix="obs"), make_topic(prefix="alerts"), make_topic(prefix="dlq")
    group = f"sd-container-{uuid.uuid4().hex[:8]}"
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        "\n".join(
            [
                "[kafka]",
                f'bootstrap_servers = "{kafka_bootstrap}"',
                f'group_id = "{group}"',
                f'topics = ["{topic}"]',
                f'alerts_topic = "{alerts}"',
                f'dlq_topic = "{dlq}"',
                "[input]",
                'timestamp_field = "ts"',
                "[detection]",
                *(f"{k} = {v}" for k, v in DETECTION.items()),
                "[runtime]",
                "commit_interval_s = 0.5",
                f"shutdown_grace_s = {GRACE_S}",
                "",
            ]
        )
    )
    config.chmod(0o644)
    mounts = ["-v", f"{bundle.path}:/models/current:ro", "-v", f"{config}:/etc/stream-detector/config.toml:ro"]
    # The image sets SD_RUNTIME__METRICS_PORT=9464, and environment variables override the config file.
    common = ["--network", "host", "-e", f"SD_RUNTIME__METRICS_PORT={port}", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", *mounts]
    cfg = ["--config", "/etc/stream-detector/config.toml"]

    checked = engine("run", "--rm", *common, image, "check", *cfg, timeout=120, check=False)
    assert checked.returncode == 0, checked.stderr[-2000:]

    name = f"sd-test-{uuid.uuid4().hex[:8]}"
    # The engine's periodic health check needs systemd timers (absent here); the test runs it by hand below.
    t0 = time.monotonic()
    engine("run", "-d", "--name", name, "--health-interval", "disable", *common, image, "run", *cfg)
    try:
        ready_s = None
        while time.monotonic() - t0 < 90:
            if http_status(f"http://127.0.0.1:{port}/readyz") == 200:
                ready_s = time.monotonic() - t0
                break
            if engine("inspect", name, "--format", "{{.State.Running}}").stdout.strip() != "true":
                break
            time.sleep(0.2)
        assert ready_s is not None, "not ready within 90 s: " + engine("logs", name, check=False).stderr[-3000:]

        uid = engine("exec", name, "id", "-u").stdout.strip()
        assert uid == "10001", f"the service runs as uid {uid}, not the image's non-root user"
        write = engine("exec", name, "touch", "/opt/stream-detector/x", check=False)
        assert write.returncode != 0 and "Read-only file system" in write.stderr, write.stderr
        health = engine("healthcheck", "run", name, check=False) if "podman" in engine("--version").stdout else None
        if health is not None:
            assert health.returncode == 0, f"the image's HEALTHCHECK says unhealthy: {health.stdout} {health.stderr}"

        events = [(k.encode(), v) for k, _, v in sim.events()]
        _produce(kafka_bootstrap, topic, events)
        probe = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if sum(max(tp.offset, 0) for tp in probe.committed(tps, timeout=5)) == len(events):
                break
            time.sleep(0.5)

        t_stop = time.monotonic()
        engine("stop", "-t", str(STOP_TIMEOUT_S), name, timeout=STOP_TIMEOUT_S + 30)
        stop_s = time.monotonic() - t_stop
        exit_code = engine("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip()
        logs = engine("logs", name).stderr
    finally:
        engine("rm", "-f", name, check=False)

    assert exit_code == "0", f"exit {exit_code} after SIGTERM: {logs[-3000:]}"
    assert stop_s < GRACE_S + 3, f"SIGTERM to exit took {stop_s:.1f} s (grace {GRACE_S} s)"
    assert "SIGTERM" in logs and f"stopped: {len(events)} consumed" in logs and "Traceback" not in logs, logs[-3000:]
    committed = sum(tp.offset for tp in probe.committed(tps, timeout=10))
    probe.close()
    assert committed == len(events), f"{committed} of {len(events)} offsets committed"

    matched, false = _match(_opens(read_to_end(kafka_bootstrap, alerts)), sim.truth)
    missed = [sim.truth[i] for i in strong if i not in matched]
    assert not missed, f"no alert from the container for {missed}"
    assert all(min(d) <= MAX_DELAY for d in matched.values()), matched
    assert false <= MAX_FALSE, f"{false} false alerts"
    print(f"[container] start to ready {ready_s:.1f} s, SIGTERM to exit {stop_s:.1f} s, "
          f"{len(events)} events, {len(matched)}/{len(strong)} anomalies alerted, {false} false")


# ---- the compose stack ----------------------------------------------------------------------------
COMPOSE = REPO / "deploy" / "docker" / "compose-local.sh"
STACK_BOOTSTRAP = "127.0.0.1:29092"  # compose.local.yaml's host listener of the stack's broker


def prometheus_query(expr: str) -> list:
    url = "http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        return orjson.loads(r.read())["data"]["result"]


def test_the_compose_stack_turns_an_anomaly_into_an_alert_and_prometheus_scrapes_it(image, tmp_path):
    """deploy/docker/compose.yaml as it is (compose.local.yaml only swaps in local images and adds a host
    listener): broker, topic job, detector and Prometheus come up with podman-compose; events with spikes
    and level shifts produced from the host become alerts on the stack's alerts topic, and Prometheus
    scrapes the detector (the `up` series and one of the service's own)."""
    if not shutil.which("podman-compose"):
        pytest.skip("no podman-compose on this machine; Debian: apt-get install podman-compose maven")
    sim = Simulator(SimConfig(entities=20, features=F, anomaly_rate=4.0, warmup=150, kinds=STRONG_KINDS, seed=11), 400)
    anomalous = {a.entity for a in sim.truth}
    assert anomalous, "the simulation should inject anomalies"
    bundle = _bundle(tmp_path, sim.features)
    readable_by_anyone(bundle.path)
    env = {**os.environ, "SD_MODEL_DIR": str(bundle.path)}

    def stack(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(COMPOSE), *args], capture_output=True, text=True, timeout=timeout, env=env)

    stack("down")  # a stack left over by an interrupted run
    t0 = time.monotonic()
    up = stack("up")
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        # podman-compose 1.0 starts services in order without waiting for depends_on conditions; the
        # detector may exit 2 once before the broker answers, and its restart policy starts it again.
        ready_s = None
        while time.monotonic() - t0 < 240:
            if http_status("http://127.0.0.1:9464/readyz") == 200:
                ready_s = time.monotonic() - t0
                break
            time.sleep(0.5)
        assert ready_s is not None, "the stack's detector was not ready in 240 s: " + engine("logs", "stream-detector_detector_1", check=False).stderr[-3000:]

        events = [(k.encode(), v) for k, _, v in sim.events()]
        _produce(STACK_BOOTSTRAP, "observations", events)
        opens: list = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not {a["key"] for a in opens} & anomalous:
            time.sleep(2)
            opens = _opens(read_to_end(STACK_BOOTSTRAP, "alerts"))
        alerted = {a["key"] for a in opens}
        assert alerted & anomalous, f"no alert for any of {sorted(anomalous)}; alerts: {opens}"
        false = [a for a in opens if a["key"] not in anomalous]
        assert len(false) <= MAX_FALSE, f"{len(false)} alerts on entities without an anomaly"

        up_series: list = []
        deadline = time.monotonic() + 60  # scrape_interval 15 s
        while time.monotonic() < deadline:
            up_series = prometheus_query('up{job="stream-detector"}')
            if up_series and up_series[0]["value"][1] == "1" and prometheus_query("stream_detector_events_consumed_total"):
                break
            time.sleep(3)
        assert up_series and up_series[0]["value"][1] == "1", f"Prometheus does not scrape the detector: {up_series}"
        consumed = sum(float(s["value"][1]) for s in prometheus_query("stream_detector_events_consumed_total"))
        assert consumed > 0, "the detector's own series are not in Prometheus"
    finally:
        down = stack("down", timeout=300)
    assert down.returncode == 0, down.stderr[-2000:]
    print(f"[compose] up to detector ready {ready_s:.1f} s; {len(alerted & anomalous)}/{len(anomalous)} anomalous "
          f"entities alerted, {len(false)} false; Prometheus up=1")
