"""The real Alertmanager for tests: `AlertmanagerProcess(tmp_dir)` runs Debian's
`prometheus-alertmanager` (or `alertmanager`) on a free local port with a null receiver, no
clustering, and alerts grouped by incident. `stop()` then `start()` reuses the same port (an outage).

Fixtures (a test module loads them with `pytest_plugins = ["alertmanager_proc"]`): `alertmanager`, a
started process; `make_alertmanager(start=True)`, a factory for more. Each is stopped at the end of
the test. Without the binary the test is skipped.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

CONFIG = """\
route:
  receiver: "null"
  group_by: ['incident_id']
  group_wait: 1s
receivers:
  - name: "null"
"""
READY_TIMEOUT_S = 30.0


def find_binary() -> str:
    for name in ("prometheus-alertmanager", "alertmanager"):
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.skip("no Alertmanager on this machine; Debian: apt-get install prometheus-alertmanager")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AlertmanagerProcess:
    def __init__(self, tmp_dir: Path, port: int | None = None) -> None:
        self.binary = find_binary()
        self.dir = Path(tmp_dir)
        self.port = port if port is not None else free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.dir / "alertmanager.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self._proc is None, "already started"
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "alertmanager.yml"
        config.write_text(CONFIG)
        with self._log.open("ab") as log:  # a file, not a pipe: a full pipe would stall the process
            self._proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config}",
                    f"--storage.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--cluster.listen-address=",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        tail = self._log.read_text(errors="replace")[-2000:]
        pytest.fail(f"Alertmanager on port {self.port} did not become ready:\n{tail}", pytrace=False)

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._proc = None

    def alerts(self, active: bool = True) -> list[dict[str, Any]]:
        """GET /api/v2/alerts, parsed (Alertmanager never lists resolved alerts here)."""
        query = "active=true" if active else "active=false"
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts?{query}", timeout=5) as resp:
            return list(json.loads(resp.read()))


@pytest.fixture
def make_alertmanager(tmp_path: Path) -> Any:
    """Factory: make_alertmanager(start=True) -> a new AlertmanagerProcess on a free port of its own."""
    made: list[AlertmanagerProcess] = []

    def factory(start: bool = True) -> AlertmanagerProcess:
        am = AlertmanagerProcess(tmp_path / f"am{len(made)}")
        made.append(am)
        if start:
            am.start()
        return am

    yield factory
    for am in made:
        am.stop()


@pytest.fixture
def alertmanager(make_alertmanager: Any) -> AlertmanagerProcess:
    return make_alertmanager()
