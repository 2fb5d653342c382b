"""deploy/kafka/broker.sh's error paths: each ends in one sentence and a non-zero exit."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from conftest import BROKER_SH


def _run(args: list[str], tmp_path: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SD_KAFKA_DATA_DIR": str(tmp_path / "data"), **(extra_env or {})}
    return subprocess.run(["bash", str(BROKER_SH), *args], capture_output=True, text=True, env=env, timeout=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_port_in_use_by_another_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = _run(["start", "--port", str(port)], tmp_path)
    assert result.returncode == 1
    assert "already in use by another process" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_java_too_old(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "java").write_text('#!/bin/sh\necho \'openjdk version "11.0.2" 2019-01-15\' >&2\n')
    (fake / "java").chmod(0o755)
    result = _run(["start", "--port", str(_free_port())], tmp_path, {"PATH": f"{fake}:{os.environ['PATH']}"})
    assert result.returncode == 1
    assert "needs Java 17 or newer" in result.stderr


def test_status_of_a_broker_that_is_not_running(tmp_path):
    port = _free_port()
    result = _run(["status", "--port", str(port)], tmp_path)
    assert result.returncode == 3
    assert result.stdout.strip() == f"stopped bootstrap=127.0.0.1:{port}"


def test_unknown_option(tmp_path):
    result = _run(["start", "--bogus"], tmp_path)
    assert result.returncode != 0
    assert "unknown option '--bogus'" in result.stderr
