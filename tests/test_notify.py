"""The systemd notify protocol against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from stream_detector.notify import SystemdNotifier


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

    def messages(self, max_n: int = 100, timeout: float = 0.2) -> list[dict[str, str]]:
        out = []
        self.sock.settimeout(timeout)
        try:
            while len(out) < max_n:
                data = self.sock.recv(4096).decode()
                out.append(dict(line.split("=", 1) for line in data.split("\n")))
        except socket.timeout:
            pass
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
    with caplog.at_level("WARNING", logger="stream_detector.notify"):
        assert not n.ready()
        assert not n.stopping()
    warnings = [r for r in caplog.records if "notify socket" in r.getMessage()]
    assert len(warnings) == 1


def test_relative_socket_name_is_refused_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger="stream_detector.notify"):
        n = SystemdNotifier({"NOTIFY_SOCKET": "relative.sock"})
    assert not n.enabled
    assert "neither an absolute path" in caplog.text
