"""The real Prometheus server for tests, run on a free loopback port with the project's own scrape
configuration and alerting rules.

    with PrometheusProc(tmp_path, target="127.0.0.1:9464") as prom:
        prom.query("up")  # -> the result list of /api/v1/query

The configuration is derived from deploy/docker/prometheus.yml (the one compose.yaml mounts): its
jobs, metrics paths, labels and rule files are kept; every static target is replaced by the test's
target (so both jobs, `stream-detector` and `stream-detector-gpu`, scrape the one process), each rule
file is pointed at the project's file of that name in deploy/docker by absolute path, and the scrape
and evaluation intervals become 1 s. The TSDB goes to a temporary directory.

Skips the test when `prometheus` is not on PATH (Debian: apt-get install prometheus)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "deploy" / "docker"
PROJECT_CONFIG = DOCKER / "prometheus.yml"
INTERVAL = "1s"


class PrometheusError(RuntimeError):
    """Prometheus answered a request with an error (its own text is the message)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def derived_config(target: str) -> dict[str, Any]:
    """deploy/docker/prometheus.yml with `target` as every static target, the rule files of
    deploy/docker by absolute path and 1 s intervals."""
    cfg = yaml.safe_load(PROJECT_CONFIG.read_text())
    cfg.setdefault("global", {}).update(scrape_interval=INTERVAL, evaluation_interval=INTERVAL)
    rule_files = []
    for path in cfg.get("rule_files", []):
        local = DOCKER / Path(path).name
        assert local.is_file(), f"prometheus.yml names the rule file {path}, but deploy/docker has no {local.name}"
        rule_files.append(str(local))
    cfg["rule_files"] = rule_files
    for job in cfg["scrape_configs"]:
        for static in job.get("static_configs", []):
            static["targets"] = [target]
    return cfg


def write_config(path: Path, target: str) -> Path:
    path.write_text(yaml.safe_dump(derived_config(target), sort_keys=False))
    return path


class PrometheusProc:
    """`prometheus` on 127.0.0.1:<free port> scraping `target`; a context manager (start/stop)."""

    def __init__(self, workdir: Path, target: str, ready_timeout_s: float = 30.0) -> None:
        self.binary = shutil.which("prometheus")
        if self.binary is None:
            pytest.skip("no Prometheus on this machine; Debian: apt-get install prometheus")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.target = target
        self.config_path = write_config(self.workdir / "prometheus.yml", target)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "prometheus.log"
        self.ready_timeout_s = ready_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> PrometheusProc:
        assert self.binary is not None
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=info",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._proc.returncode} before it was ready:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prometheus was not ready within {self.ready_timeout_s:.0f} s:\n{self.log()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None

    def __enter__(self) -> PrometheusProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self, last: int = 40) -> str:
        """The last lines of Prometheus's own log (for failure messages)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-last:])
        except OSError:
            return "(no log)"

    # ---- HTTP API --------------------------------------------------------------------------------
    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; returns `data`, or raises PrometheusError with Prometheus's error text."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                body = json.loads(text)
            except ValueError:
                raise PrometheusError(f"{path} {params}: HTTP {e.code}: {text.strip()}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; the result list (vector samples: {"metric": {...}, "value": [t, "v"]})."""
        try:
            data = self.api("query", query=expr)
        except PrometheusError as e:
            raise PrometheusError(f"query {expr!r} failed: {e}") from None
        result = data["result"]
        if data["resultType"] == "scalar" or data["resultType"] == "string":
            return [{"metric": {}, "value": result}]
        return list(result)

    def series_names(self) -> set[str]:
        """Every metric name in the TSDB (the values of the __name__ label)."""
        return set(self.api("label/__name__/values"))

    def rules(self) -> list[dict[str, Any]]:
        """The rule groups as /api/v1/rules lists them (each with its rules, health, lastError)."""
        return list(self.api("rules")["groups"])

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets (each with scrapePool, scrapeUrl, health, lastError)."""
        return list(self.api("targets")["activeTargets"])

    def metadata(self, metric: str) -> list[dict[str, Any]]:
        """HELP/TYPE of `metric` as scraped (a metric that has no series yet still has them)."""
        return list(self.api("metadata", metric=metric).get(metric, []))
