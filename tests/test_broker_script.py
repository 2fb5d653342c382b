"""deploy/kafka/broker.sh: its error paths end in one sentence and a non-zero exit; its JVM settings."""

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


def _stand_in_java(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A `java` that says it is 17, records its arguments and fails the storage format (which
    ends a start in one sentence, after the broker's config was written), and a jar cache that
    counts as provisioned: (environment, file of its calls)."""
    fake, cache = tmp_path / "bin", tmp_path / "cache"
    fake.mkdir()
    (cache / "libs").mkdir(parents=True)
    (cache / ".complete").touch()
    calls = tmp_path / "java-calls"
    (fake / "java").write_text(
        '#!/bin/sh\n'
        'if [ "$1" = "-version" ]; then echo \'openjdk version "17.0.9" 2023-10-17\' >&2; exit 0; fi\n'
        f'echo "$*" >> {calls}\nexit 1\n'
    )
    (fake / "java").chmod(0o755)
    return {"PATH": f"{fake}:{os.environ['PATH']}", "SD_KAFKA_CACHE": str(cache)}, calls


def test_jvm_settings_default_to_a_fixed_heap_and_follow_kafkas_variables(tmp_path):
    """The broker's JVM gets a fixed 2 GB heap and a 20 ms pause goal unless KAFKA_HEAP_OPTS /
    KAFKA_JVM_PERFORMANCE_OPTS say otherwise (docs/performance.md, "Phase 6")."""
    env, calls = _stand_in_java(tmp_path)
    base = {k: v for k, v in os.environ.items() if k not in ("KAFKA_HEAP_OPTS", "KAFKA_JVM_PERFORMANCE_OPTS")}
    for extra, want, not_want in (
        ({}, ["-Xms2g -Xmx2g -XX:+UseG1GC -XX:MaxGCPauseMillis=20"], []),
        ({"KAFKA_HEAP_OPTS": "-Xms64m -Xmx128m", "KAFKA_JVM_PERFORMANCE_OPTS": "-XX:+UseSerialGC"}, ["-Xms64m -Xmx128m -XX:+UseSerialGC"], ["-Xmx2g", "G1"]),
    ):
        calls.unlink(missing_ok=True)
        result = subprocess.run(["bash", str(BROKER_SH), "start", "--port", str(_free_port())], capture_output=True, text=True, timeout=120,
                                env={**base, "SD_KAFKA_DATA_DIR": str(tmp_path / f"data{len(extra)}"), **env, **extra})
        assert result.returncode == 1 and "formatting KRaft storage" in result.stderr, result.stderr
        fmt = next(line for line in calls.read_text().splitlines() if "StorageTool format" in line)
        assert all(w in fmt for w in want) and not any(n in fmt for n in not_want), fmt


def test_log_cleaner_is_capped_by_default_and_refuses_a_bad_value(tmp_path):
    """The broker's log cleaner is capped at 8 MiB/s (Kafka's log.cleaner.io.max.bytes.per.second;
    docs/performance.md, "After phase 6"); --cleaner-io-bytes-per-s sets another cap, 0 none; a
    value that is not a whole number ends in one sentence."""
    env, _ = _stand_in_java(tmp_path)
    env = {**env, "SD_KAFKA_CLEANER_IO_BYTES_PER_S": ""}  # (unset: the default)
    for args, want in (([], "log.cleaner.io.max.bytes.per.second=8388608"), (["--cleaner-io-bytes-per-s", "1048576"], "log.cleaner.io.max.bytes.per.second=1048576"),
                       (["--cleaner-io-bytes-per-s", "0"], None)):
        data = tmp_path / f"data{len(args)}{args[-1] if args else ''}"
        result = _run(["start", "--port", str(_free_port()), *args], tmp_path, {**env, "SD_KAFKA_DATA_DIR": str(data)})
        assert result.returncode == 1 and "formatting KRaft storage" in result.stderr, result.stderr
        props = (data / "server.properties").read_text()
        assert (want in props) if want else ("log.cleaner.io" not in props), props
    bad = _run(["start", "--cleaner-io-bytes-per-s", "8MB"], tmp_path, env)
    assert bad.returncode == 1 and bad.stderr.strip() == "broker.sh: cleaner I/O cap '8MB' is not a whole number of bytes per second."
