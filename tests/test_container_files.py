"""Lint-style checks of the deployment files that can run without a Docker engine or a systemd
instance: the Dockerfile's stages (non-root user, health check, no remote ADD, pinned bases, no
torch), compose.yaml (parses; KRaft Kafka from the official image, the detector with a read-only
model, Prometheus scraping the detector's metrics port), the Prometheus files (every metric they
use is one the service exposes), and the systemd unit (`systemd-analyze verify` where available,
plus the settings the service relies on). The containers themselves were not run here."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stream_detector.config import Settings
from stream_detector.service.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "deploy" / "docker"
UNIT = REPO / "deploy" / "systemd" / "stream-detector.service"
METRICS_PORT = 9464


# ---- Dockerfile ----------------------------------------------------------------------------------
def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """{stage name: [(INSTRUCTION, arguments)]}, continuation lines joined, comments dropped."""
    text = (DOCKER / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    stages: dict[str, list[tuple[str, str]]] = {"<global>": []}
    current = "<global>"
    for line in joined.splitlines():
        if not line.strip():
            continue
        instr, _, args = line.strip().partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), flags=re.I)
            current = m.group(2) or f"stage{len(stages)}"
            stages[current] = []
        stages[current].append((instr, args.strip()))
    return stages


def test_dockerfile_has_cpu_and_gpu_targets_with_the_right_bases():
    stages = dockerfile_stages()
    assert {"build", "gpu", "cpu"} <= set(stages)
    args = dict(a.split("=", 1) for i, a in stages["<global>"] if i == "ARG")
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:13.") and "runtime" in args["CUDA_IMAGE"]
    assert stages["gpu"][0][1].startswith("${CUDA_IMAGE}")
    assert stages["cpu"][0][1].startswith("${PYTHON_IMAGE}")
    assert list(stages)[-1] == "cpu", "the default target (last stage) should be the CPU image"


@pytest.mark.parametrize("stage", ["cpu", "gpu"], ids=["cpu-stage", "gpu-stage"])  # an id "gpu" would trip the gpu marker skip
def test_runtime_stages_run_as_non_root_with_a_healthcheck(stage):
    instrs = dockerfile_stages()[stage]
    users = [a for i, a in instrs if i == "USER"]
    assert users, "no USER instruction"
    assert users[-1].split(":")[0] not in ("0", "root")
    last_user = max(k for k, (i, _) in enumerate(instrs) if i == "USER")
    assert all(i != "RUN" for i, _ in instrs[last_user:]), "RUN after USER would run as the service user at build time"
    health = [a for i, a in instrs if i == "HEALTHCHECK"]
    assert health and "127.0.0.1:{port}/healthz" in health[0] and "SD_RUNTIME__METRICS_PORT" in health[0], "the check follows the port setting"
    assert ("EXPOSE", str(METRICS_PORT)) in instrs
    env = " ".join(a for i, a in instrs if i == "ENV")
    assert f"SD_RUNTIME__METRICS_PORT={METRICS_PORT}" in env and "SD_MODEL__BUNDLE=/models/current" in env
    entry = [a for i, a in instrs if i == "ENTRYPOINT"]
    assert entry and entry[0].startswith("["), "ENTRYPOINT in exec form, so SIGTERM reaches the service"


def test_dockerfile_hygiene():
    stages = dockerfile_stages()
    for name, instrs in stages.items():
        for instr, args in instrs:
            assert instr != "ADD", f"{name}: use COPY, not ADD (no remote URLs, no implicit unpacking)"
            if instr == "FROM":
                assert ":latest" not in args
            if instr == "RUN":
                assert "torch" not in args, "the runtime image must not install torch"
                if "apt-get install" in args:
                    assert "--no-install-recommends" in args and "rm -rf /var/lib/apt/lists" in args
                if "pip install" in args:
                    assert "--no-cache-dir" in args
                assert "curl " not in args and "wget " not in args, "no downloads outside package managers"
            if instr == "COPY" and "--from=" not in args:
                for src in args.split()[:-1]:
                    assert (REPO / src).exists(), f"COPY source {src} is not in the build context"


# ---- compose -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_has_kraft_kafka_detector_and_prometheus(compose):
    services = compose["services"]
    assert {"kafka", "topics", "detector", "prometheus"} <= set(services)
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:4.")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert not any("ZOOKEEPER" in k for k in env)
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert "kafka-topics.sh" in " ".join(services["topics"]["command"])


@pytest.mark.parametrize("name", ["detector", "detector-gpu"])
def test_compose_detector_is_locked_down_and_reads_the_model_read_only(compose, name):
    d = compose["services"][name]
    stages = dockerfile_stages()
    assert d["build"]["target"] in stages
    assert (REPO / "deploy" / "docker" / d["build"]["context"] / d["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    assert any(v.endswith(":/models/current:ro") for v in d["volumes"])
    assert d["read_only"] is True and d["cap_drop"] == ["ALL"] and "no-new-privileges:true" in d["security_opt"]
    env = d["environment"]
    assert env["SD_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["SD_RUNTIME__METRICS_PORT"] == str(METRICS_PORT)
    # compose must wait longer than the service's own drain before it kills
    grace = float(env["SD_RUNTIME__SHUTDOWN_GRACE_S"])
    assert float(d["stop_grace_period"].rstrip("s")) > grace
    # every SD_ variable is a real settings key (a typo would otherwise be refused at start-up)
    for key in env:
        section, _, field = key.removeprefix("SD_").lower().partition("__")
        assert field in Settings.model_fields[section].annotation.model_fields, key


def test_compose_gpu_service_reserves_a_gpu(compose):
    d = compose["services"]["detector-gpu"]
    assert d["profiles"] == ["gpu"]
    dev = d["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert d["environment"]["SD_MODEL__REQUIRE_CUDA"] == "true"


def test_prometheus_scrapes_the_detectors_and_mounts_existing_files(compose):
    prom = compose["services"]["prometheus"]
    for vol in prom["volumes"]:
        src = vol.split(":")[0]
        assert (DOCKER / src).is_file(), src
    cfg = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = {t for job in cfg["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"detector:{METRICS_PORT}", f"detector-gpu:{METRICS_PORT}"}
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in cfg["scrape_configs"])
    assert cfg["rule_files"] == ["/etc/prometheus/alert-rules.yml"]


def test_grafana_is_pinned_reads_its_provisioning_read_only_and_finds_prometheus_and_the_dashboard(compose):
    """The grafana service: a pinned image, every mount an existing file or directory of deploy/grafana
    and read-only, the datasource at the compose Prometheus, the dashboard provider at the directory the
    dashboard is mounted in (tests/test_dashboard.py checks the dashboard's queries)."""
    services = compose["services"]
    graf = services["grafana"]
    image, _, tag = graf["image"].partition(":")
    assert image == "grafana/grafana" and re.fullmatch(r"\d+\.\d+\.\d+", tag), "pin an exact Grafana release"
    assert graf["depends_on"] == ["prometheus"] and "3000:3000" in graf["ports"]
    mounts = {}
    for vol in graf["volumes"]:
        src, dst, mode = vol.split(":")
        assert mode == "ro", vol
        assert (DOCKER / src).resolve().is_relative_to(REPO / "deploy" / "grafana") and (DOCKER / src).exists(), vol
        mounts[dst] = (DOCKER / src).resolve()
    provisioning = mounts["/etc/grafana/provisioning/datasources"]
    sources = [d for f in sorted(provisioning.glob("*.yml")) for d in yaml.safe_load(f.read_text())["datasources"]]
    prom_port = services["prometheus"]["ports"][0].split(":")[-1]
    assert [(d["type"], d["url"]) for d in sources] == [("prometheus", f"http://prometheus:{prom_port}")]
    providers = [
        p
        for f in sorted(mounts["/etc/grafana/provisioning/dashboards"].glob("*.yml"))
        for p in yaml.safe_load(f.read_text())["providers"]
    ]
    assert [p["type"] for p in providers] == ["file"]
    dashboards = {dst: src for dst, src in mounts.items() if dst.endswith(".json")}
    assert dashboards and all(Path(dst).parent == Path(providers[0]["options"]["path"]) for dst in dashboards)
    assert REPO / "deploy" / "grafana" / "stream-detector.json" in dashboards.values()


def test_alert_rules_use_only_metrics_the_service_exposes():
    rules = yaml.safe_load((DOCKER / "alert-rules.yml").read_text())
    exposed = set(Metrics().names())
    used = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["alert"] and rule["expr"] and rule["annotations"]["summary"]
            used |= set(re.findall(r"\b(stream_detector_[a-z_]+)", rule["expr"]))
    assert used
    for name in used:
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        assert name in exposed or base in exposed, f"{name} is not a metric the service exposes"


# ---- systemd -------------------------------------------------------------------------------------
def unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # systemd keys are case-sensitive
    cp.read_string(UNIT.read_text())
    return cp


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", value.strip())
    assert m, value
    return float(m.group(1)) * (60 if m.group(2) == "min" else 1)


def test_unit_is_notify_with_watchdog_and_a_stop_timeout_covering_the_drain():
    s = unit()["Service"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert seconds(s["WatchdogSec"]) >= 10
    grace = Settings().runtime.shutdown_grace_s
    assert seconds(s["TimeoutStopSec"]) > grace, "systemd would kill the service in the middle of its drain"
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert "--config /etc/stream-detector/config.toml" in s["ExecStart"]
    assert s["RestartPreventExitStatus"] == "2"


def test_unit_hardening():
    s = unit()["Service"]
    assert s.get("DynamicUser") == "yes" or s.get("User") not in (None, "root")
    assert s["ProtectSystem"] == "strict"
    assert s["NoNewPrivileges"] == "yes"
    assert "/var/lib/stream-detector/models" in s["ReadOnlyPaths"]
    assert s["ProtectHome"] == "yes" and s["PrivateTmp"] == "yes"
    assert s["CapabilityBoundingSet"] == ""
    assert s["ConfigurationDirectory"] == "stream-detector"
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart= binaries exist: point them at a stand-in executable
    stub = tmp_path / "stream-detector"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text().replace("/opt/stream-detector/bin/stream-detector", str(stub))
    copy = tmp_path / "stream-detector.service"
    copy.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


RETRAIN = REPO / "deploy" / "systemd" / "stream-detector-retrain.service"
TIMER = REPO / "deploy" / "systemd" / "stream-detector-retrain.timer"


def test_retrain_unit_runs_the_gated_retrain_daily_and_a_refusal_is_not_a_failure():
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read_string(RETRAIN.read_text())
    s = cp["Service"]
    assert s["Type"] == "oneshot" and "stream-detector-train retrain" in s["ExecStart"]
    assert "--models /var/lib/stream-detector/models" in s["ExecStart"], "the directory the service reads its model from"
    assert "--config /etc/stream-detector/config.toml" in s["ExecStart"], "the service's own settings"
    assert s["SuccessExitStatus"] == "3", "exit 3 (refused, the live model stays) is a normal outcome"
    assert s["StateDirectory"] == "stream-detector/models" and s["StateDirectoryMode"] == "0755"
    assert s.get("User") not in (None, "root") and s["NoNewPrivileges"] == "yes"
    timer = configparser.ConfigParser(strict=False, interpolation=None)
    timer.optionxform = str
    timer.read_string(TIMER.read_text())
    assert timer["Timer"]["OnCalendar"] and timer["Timer"]["Persistent"] == "true"
    assert timer["Install"]["WantedBy"] == "timers.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_retrain_unit_and_timer_pass_systemd_analyze_verify(tmp_path):
    stub = tmp_path / "stream-detector-train"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    service = tmp_path / RETRAIN.name
    service.write_text(RETRAIN.read_text().replace("/opt/stream-detector/bin/stream-detector-train", str(stub)))
    timer = tmp_path / TIMER.name
    timer.write_text(TIMER.read_text())
    r = subprocess.run(["systemd-analyze", "verify", str(service), str(timer)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stdout + r.stderr
