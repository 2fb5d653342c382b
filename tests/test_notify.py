"""The systemd notify protocol against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import re
import socket
import uuid

import pytest

from stream_detector.service.notify import SystemdNotifier


class FakeSystemd:
    """Binds the notify socket (a path, or an abstract name) and collects the datagrams."""

    def __init__(self, tmp_path, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"sd-test-{uuid.uuid4().hex}"
            self.sock.bind(b"\0" + name.encode())
            self.env_value = "@" + name
        else:
            path = str(tmp_path / "notify.sock")
            self.sock.bind(path)
            self.env_value = path
        self.sock.settimeout(2)

    def messages(self, timeout: float = 0.2) -> list[dict[str, str]]:
        """Datagrams that arrive within `timeout` seconds from now (parsed into dicts)."""
        import time

        out = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096).decode()
            except socket.timeout:
                break
            out.append(dict(line.split("=", 1) for line in data.split("\n")))
        return out

    def close(self) -> None:
        self.sock.close()


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_status_stopping_arrive(tmp_path, abstract):
    sd = FakeSystemd(tmp_path, abstract)
    try:
        n = SystemdNotifier({"NOTIFY_SOCKET": sd.env_value})
        assert n.enabled
        assert n.ready("consuming 3 partitions")
        assert n.status("model v2")
        assert n.stopping("draining")
        msgs = sd.messages()
        assert msgs == [
            {"READY": "1", "STATUS": "consuming 3 partitions"},
            {"STATUS": "model v2"},
            {"STOPPING": "1", "STATUS": "draining"},
        ]
        n.close()
    finally:
        sd.close()


def test_watchdog_pings_at_most_every_half_interval(tmp_path):
    sd = FakeSystemd(tmp_path)
    clock = Clock()
    try:
        n = SystemdNotifier({"NOTIFY_SOCKET": sd.env_value, "WATCHDOG_USEC": "10000000"}, clock=clock)
        assert n.watchdog_interval_s == 10.0
        sent = []
        for _ in range(40):  # 40 loop iterations, 0.5 s apart = 20 s
            sent.append(n.watchdog())
            clock.t += 0.5
        assert sum(sent) == 4  # t = 0, 5, 10, 15
        assert sd.messages() == [{"WATCHDOG": "1"}] * 4
    finally:
        sd.close()


def test_watchdog_for_another_pid_is_ignored(tmp_path):
    n = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "x"), "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert n.watchdog_interval_s is None and not n.watchdog()
    n = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "x"), "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval_s == 1.0


def test_without_systemd_everything_is_a_quiet_no_op():
    n = SystemdNotifier({})
    assert not n.enabled
    assert not n.ready() and not n.watchdog() and not n.stopping()


def test_vanished_socket_is_said_once_and_never_raises(tmp_path, caplog):
    n = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with caplog.at_level("WARNING", logger="stream_detector.service.notify"):
        assert not n.ready()
        assert not n.stopping()
    warnings = [r for r in caplog.records if "notify socket" in r.getMessage()]
    assert len(warnings) == 1


def test_relative_socket_name_is_refused_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger="stream_detector.service.notify"):
        n = SystemdNotifier({"NOTIFY_SOCKET": "relative.sock"})
    assert not n.enabled
    assert "neither an absolute path" in caplog.text


# ---- the real daemon under a fake systemd ----------------------------------------------------------
@pytest.mark.kafka
def test_daemon_sends_ready_watchdog_and_stopping(tmp_path, kafka_bootstrap, make_topic):
    """`stream-detector run` as systemd would start it (NOTIFY_SOCKET, WATCHDOG_USEC): READY=1 after
    the partition assignment, WATCHDOG=1 while it runs, STOPPING=1 on SIGTERM, then exit 0. On the
    way, /readyz says ok and /metrics counts the events it consumed."""
    import json
    import signal as sig
    import subprocess
    import sys
    import time
    import urllib.request

    from confluent_kafka import Producer

    from bundle_factory import make_bundle

    topic, alerts, dlq = make_topic(partitions=2), make_topic(), make_topic()
    bundle = make_bundle(tmp_path, ["a", "b"], window=4, model_version="notify-v1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sd = FakeSystemd(tmp_path)
    env = {
        **os.environ,
        "NOTIFY_SOCKET": sd.env_value,
        "WATCHDOG_USEC": "1000000",  # a ping at least every 0.5 s
        "SD_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "SD_KAFKA__TOPICS": json.dumps([topic]),
        "SD_KAFKA__ALERTS_TOPIC": alerts,
        "SD_KAFKA__DLQ_TOPIC": dlq,
        "SD_KAFKA__GROUP_ID": f"g-{uuid.uuid4().hex[:8]}",
        "SD_MODEL__BUNDLE": str(bundle.path),
        "SD_MODEL__PROVIDER": "cpu",
        "SD_RUNTIME__METRICS_PORT": str(port),
        "SD_RUNTIME__MAX_WAIT_MS": "50",
    }
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, "-m", "stream_detector.cli", "run"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        msgs: list[dict[str, str]] = []
        deadline = time.monotonic() + 60
        while not any("READY" in m for m in msgs) and time.monotonic() < deadline and proc.poll() is None:
            msgs += sd.messages(timeout=0.5)
        ready = [m for m in msgs if "READY" in m]
        assert ready, f"no READY=1 (process {'exited' if proc.poll() is not None else 'running'})"
        assert ", 2 partition(s) assigned" in ready[0]["STATUS"] and "notify-v1" in ready[0]["STATUS"]

        p = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
        for i in range(50):
            p.produce(topic, key=f"e{i % 5}", value=json.dumps({"a": float(i), "b": 1.0}).encode())
        p.produce(topic, key="bad", value=b"not json")
        assert p.flush(30) == 0
        body = ""
        for _ in range(100):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                body = r.read().decode()
            if 'stream_detector_events_consumed_total{topic="%s"} 51.0' % topic in body:
                break
            time.sleep(0.1)
        assert 'stream_detector_events_consumed_total{topic="%s"} 51.0' % topic in body
        assert 'stream_detector_model_info{features="2",model_version="notify-v1"' in body
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            assert r.status == 200
        for _ in range(40):  # state gauges are refreshed every 5 s
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                body = r.read().decode()
            if "stream_detector_tracked_entities 5.0" in body:
                break
            time.sleep(0.25)
        assert "stream_detector_ready 1.0" in body and "stream_detector_tracked_entities 5.0" in body
        assert re.search(r"^process_resident_memory_bytes [1-9]", body, flags=re.M)
        msgs += sd.messages(timeout=1.5)
        assert sum("WATCHDOG" in m for m in msgs) >= 2

        proc.send_signal(sig.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        msgs += sd.messages(timeout=0.5)
        assert any(m.get("STOPPING") == "1" for m in msgs)
        kinds = [next(iter(m)) for m in msgs if set(m) & {"READY", "STOPPING"}]
        assert kinds.index("READY") < kinds.index("STOPPING")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        sd.close()
