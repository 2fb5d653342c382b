"""The service's metrics through the real Prometheus (Debian's `prometheus` and `promtool`), with the
project's own scrape configuration and rules (tests/prometheus_proc.py derives the configuration from
deploy/docker/prometheus.yml).

One detector runs in-process against the real broker with its metrics port on, beside a shadow
candidate, an idle timeout that evicts one silent entity, and one undecodable message, so that every
metric family gets a series; events arrive over a few seconds while Prometheus scrapes every second.
Then, through Prometheus's HTTP API: the targets are up, every metric in docs/operations.md's metrics
table is a series, the rules of deploy/docker/alert-rules.yml are loaded and evaluate without error,
and every query of the Grafana dashboard runs (the throughput, inference and model panels with data).
`promtool` checks the rules file and the derived configuration (these two need no broker)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from bundle_factory import make_bundle
from faults import produce
from prometheus_proc import DOCKER, PrometheusError, PrometheusProc, free_port, write_config
from test_dashboard import exprs
from test_service_kafka import DETECTION, F, W, _bundle

from stream_detector.config import load_settings
from stream_detector.offline.simulate import SimConfig, Simulator, encode_event
from stream_detector.service.loop import Detector

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "operations.md"
RULES = DOCKER / "alert-rules.yml"

E, T = 20, 400  # entities, ticks: enough for the live and the shadow model to open alerts (as in test_shadow.py)
PRODUCE_S = 4.0  # the events go out over this long, so that several scrapes see them flow
IDLE_MS = 1000  # 100 ticks of event time
SETTLE_S = 40  # for every series to reach Prometheus (the state metrics refresh every 5 s)
# Documented metrics that have a series only after their event, which a healthy run does not provoke:
# checked through the metadata Prometheus scraped (HELP/TYPE) instead.
ONLY_AFTER_THEIR_EVENT = {
    "stream_detector_shadow_skipped_batches_total": "counted only when the shadow falls behind the live model",
}
# Dashboard panels that must have data once events have flowed.
MUST_HAVE_DATA = ("Events consumed /s", "Inference latency p99", "Model")


def documented_metrics() -> dict[str, str]:
    """{metric: type} of the metrics table in docs/operations.md's "## Metrics" section."""
    text = DOCS.read_text()
    section = text[text.index("\n## Metrics\n") :]
    section = section[: section.find("\n## ", 1)]
    rows = re.findall(r"^\| `(stream_detector_[a-z0-9_]+)` \| (\w+) \|", section, flags=re.M)
    assert len(rows) >= 20, "the metrics table in docs/operations.md was not found"
    return dict(rows)


def series_for(name: str, kind: str) -> list[str]:
    """The series names a documented metric must have in Prometheus."""
    return [f"{name}_bucket", f"{name}_count"] if kind == "histogram" else [name]


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as Grafana would send it: its interval macros as 1m, `$instance` as every instance."""
    expr = re.sub(r"\$\{?__(rate_interval|interval|range)\}?", "1m", expr)
    return re.sub(r"\$\{?instance\}?", ".*", expr)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.skip("no promtool on this machine; Debian: apt-get install prometheus")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


@dataclass
class Live:
    prom: PrometheusProc
    detector: Detector
    outcome: dict[str, object]  # "error": what Detector.run raised, if it did
    consumed: int
    settled_s: float


def _created_topics(bootstrap: str, specs: dict[str, int]) -> list[str]:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    fut = admin.create_topics([NewTopic(n, num_partitions=p, replication_factor=1) for n, p in specs.items()])
    for f in fut.values():
        f.result(timeout=30)
    return list(specs)


def _delete_topics(bootstrap: str, names: list[str]) -> None:
    from confluent_kafka.admin import AdminClient

    for f in AdminClient({"bootstrap.servers": bootstrap}).delete_topics(names, operation_timeout=30).values():
        try:
            f.result(timeout=30)
        except Exception:
            pass


def _settled(prom: PrometheusProc, documented: dict[str, str]) -> bool:
    names = prom.series_names()
    wanted = [s for m, k in documented.items() if m not in ONLY_AFTER_THEIR_EVENT for s in series_for(m, k)]
    if not set(wanted) <= names:
        return False
    rate = prom.query("sum(rate(stream_detector_events_consumed_total[1m]))")
    evaluated = all(r.get("lastEvaluation", "").startswith("2") for g in prom.rules() for r in g["rules"])
    return bool(rate) and float(rate[0]["value"][1]) > 0 and evaluated


@pytest.fixture(scope="module")
def live(kafka_bootstrap, tmp_path_factory):
    """A detector with its metrics port, scraped by the real Prometheus while events flow."""
    tmp = tmp_path_factory.mktemp("prometheus-real")
    port = free_port()
    prom = PrometheusProc(tmp / "prometheus", target=f"127.0.0.1:{port}")  # skips here without Prometheus
    # event times of now, 10 ms a tick: the events are about as old as they are late, so the end-to-end lag
    # is real (and the StreamDetectorEndToEndLag rule stays quiet)
    start_ms = int(time.time() * 1000)
    sim = Simulator(SimConfig(E, F, anomaly_rate=2.5, warmup=100, seed=21, start_ms=start_ms, interval_ms=10), T)
    bundle = _bundle(tmp, sim.features)
    shadow = make_bundle(
        tmp,
        sim.features,
        W,
        "mean",
        bundle.calibration.threshold / 2,
        name="candidate",
        center=bundle.normaliser.center,
        scale=bundle.normaliser.scale,
        model_version="candidate-v2",
    )
    tag = uuid.uuid4().hex[:12]
    topic, alerts, dlq, shadow_topic = f"obs-{tag}", f"alerts-{tag}", f"dlq-{tag}", f"shadow-{tag}"
    topics = _created_topics(kafka_bootstrap, {topic: 2, alerts: 1, dlq: 1, shadow_topic: 1})
    settings = load_settings(
        None,
        {
            "kafka": {
                "bootstrap_servers": kafka_bootstrap,
                "group_id": f"sd-{tag}",
                "topics": [topic],
                "alerts_topic": alerts,
                "dlq_topic": dlq,
                "shadow_alerts_topic": shadow_topic,
            },
            "input": {"timestamp_field": "ts"},
            "model": {"bundle": str(bundle.path), "provider": "cpu", "shadow_bundle": str(shadow.path)},
            # one entity sends a single event at the start: silent for more than IDLE_MS of event time, it is evicted
            "detection": {**DETECTION, "idle_timeout_ms": IDLE_MS},
            "runtime": {"max_batch": 500, "max_wait_ms": 50, "commit_interval_s": 0.5, "metrics_port": port},
        },
    )
    events = [(k.encode(), v) for k, _, v in sim.events()]
    lonely = (b"lonely", encode_event("lonely", start_ms, sim.features, [0.0] * F))
    items = [lonely, (b"undecodable", b"{not json"), *events]

    detector = Detector(settings)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["stats"] = detector.run(timeout=120)
        except BaseException as e:  # reported by the first test instead of dying quietly in the thread
            outcome["error"] = e

    runner = threading.Thread(target=run, name="detector", daemon=True)
    runner.start()
    try:
        with prom:
            # events only once the detector holds its partitions and Prometheus sees it ready: a backlog
            # consumed in one burst before the first scrape would leave rate() nothing to measure
            deadline = time.monotonic() + 60
            while not prom.query("stream_detector_ready == 1") and "error" not in outcome:
                assert time.monotonic() < deadline, f"the detector was not ready in 60 s: {detector.health.readiness()}"
                time.sleep(0.2)
            produce(kafka_bootstrap, topic, items, rate=len(items) / PRODUCE_S)  # paced, as a live stream
            deadline = time.monotonic() + 60
            while detector.stats.consumed < len(items) and "error" not in outcome and time.monotonic() < deadline:
                time.sleep(0.1)
            t0 = time.monotonic()
            documented = documented_metrics()
            while not _settled(prom, documented) and time.monotonic() - t0 < SETTLE_S:
                time.sleep(0.5)
            yield Live(prom, detector, outcome, len(items), time.monotonic() - t0)
    finally:
        detector.stop()
        runner.join(60)
        _delete_topics(kafka_bootstrap, topics)


@pytest.mark.kafka
@pytest.mark.slow
def test_the_service_is_scraped_and_its_targets_are_up(live):
    assert "error" not in live.outcome, f"the detector failed: {live.outcome['error']!r}"
    assert live.detector.stats.consumed == live.consumed, live.detector.stats
    print(f"[prometheus] settled {live.settled_s:.1f} s after the last event was consumed")
    targets = live.prom.targets()
    jobs = {"stream-detector", "stream-detector-gpu"}  # both jobs of prometheus.yml, here on the one process
    assert {t["scrapePool"] for t in targets} == jobs
    for t in targets:
        assert t["health"] == "up", f"{t['scrapeUrl']}: {t['health']} {t['lastError']}"
        assert t["labels"]["service"] == "stream-detector"
    up = live.prom.query('up{service="stream-detector"}')
    assert up and all(s["value"][1] == "1" for s in up)


@pytest.mark.kafka
@pytest.mark.slow
def test_every_documented_metric_is_a_series_in_prometheus(live):
    names = live.prom.series_names()
    documented = documented_metrics()
    missing = {m: k for m, k in documented.items() if not set(series_for(m, k)) <= names}
    for metric, why in ONLY_AFTER_THEIR_EVENT.items():
        if metric in missing:
            # no series yet, but Prometheus scraped its HELP/TYPE (OpenMetrics names a counter without _total)
            meta = live.prom.metadata(metric) or live.prom.metadata(metric.removesuffix("_total"))
            assert meta and meta[0]["type"] == documented[metric], f"{metric} ({why}): no metadata either"
            print(f"[prometheus] {metric}: no series ({why}); metadata {meta[0]}")
            del missing[metric]
    assert not missing, f"documented in docs/operations.md but not a series in Prometheus: {missing}"
    assert "process_resident_memory_bytes" in names


@pytest.mark.kafka
@pytest.mark.slow
def test_the_alert_rules_are_loaded_and_evaluate_without_error(live):
    in_file = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    loaded = {r["name"]: r for g in live.prom.rules() for r in g["rules"]}
    assert in_file and set(loaded) == in_file
    for name, rule in loaded.items():
        assert rule["type"] == "alerting"
        assert rule["health"] == "ok", f"{name}: {rule['health']} {rule.get('lastError')}"
        assert rule["lastEvaluation"].startswith("2"), f"{name} was never evaluated"
    # a healthy service fires none of its own alerts (a pending one would show what is wrong)
    firing = live.prom.query("ALERTS")
    assert not firing, [s["metric"] for s in firing]


@pytest.mark.kafka
@pytest.mark.slow
def test_every_dashboard_query_runs_and_the_flow_panels_have_data(live):
    errors, empty = [], []
    for title, ref, expr in exprs():
        try:
            result = live.prom.query(grafana_to_promql(expr))
        except PrometheusError as e:
            errors.append(f"{title}/{ref}: {e}")
            continue
        if title in MUST_HAVE_DATA and ref == "A":
            values = [float(s["value"][1]) for s in result]
            if not values or not all(math.isfinite(v) and v > 0 for v in values):
                empty.append(f"{title}/{ref}: {values}")
    assert not errors, errors
    assert not empty, f"panels without data after events flowed: {empty}"


def test_promtool_accepts_the_alert_rules():
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_accepts_the_derived_configuration(tmp_path):
    config = write_config(tmp_path / "prometheus.yml", "127.0.0.1:9464")
    done = promtool("check", "config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout and str(RULES) in done.stdout, done.stdout


def test_queries_as_grafana_sends_them_have_no_macro_left():
    for title, ref, expr in exprs():
        assert "$" not in grafana_to_promql(expr), f"{title}/{ref}: {expr}"
