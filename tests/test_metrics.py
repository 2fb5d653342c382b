"""Metrics exposure: the loop's calls show up in a real scrape over HTTP, parsed with
prometheus-client's own parser; the documented metric list matches what is exposed."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stream_detector.service.health import Health
from stream_detector.service.metrics import Metrics, MetricsServer

DOCS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def served():
    metrics = Metrics()
    health = Health(stall_after_s=30)
    metrics.track_readiness(health)
    with MetricsServer(metrics, health, host="127.0.0.1", port=0) as server:
        yield metrics, health, server


def test_batch_alert_and_state_calls_appear_in_a_scrape(served, rng):
    metrics, health, server = served
    n_batches = int(rng.integers(3, 8))
    sizes = rng.integers(1, 512, size=n_batches)
    for n in sizes:
        metrics.observe_batch(
            consumed_by_topic={"obs": int(n)},
            decoded=int(n) - 1,
            dead_lettered={"missing_feature": 1},
            scored=int(n) // 2,
            max_batch=512,
            inference_s=0.004,
            oldest_event_time_ms=1_000,
            now_ms=3_500,
        )
    metrics.observe_alert("open", event_time_ms=10_000, published_ms=10_250)
    metrics.observe_alert("resolved", event_time_ms=None, published_ms=11_000)
    metrics.set_consumer_lag({("obs", 0): 17, ("obs", 1): 0})
    metrics.set_state(tracked_entities=42, open_alerts=1, paused_partitions=0)
    metrics.evicted(3, "idle")
    thresholds = rng.gamma(2.0, 1.0, size=1000)
    metrics.set_thresholds(thresholds)
    metrics.set_model("v7", "CPUExecutionProvider", window=8, n_features=4)

    code, text = scrape(server.port)
    assert code == 200
    s = samples(text)
    total = float(sizes.sum())
    assert s[("stream_detector_events_consumed_total", (("topic", "obs"),))] == total
    assert s[("stream_detector_events_decoded_total", ())] == total - n_batches
    assert s[("stream_detector_events_dead_lettered_total", (("reason", "missing_feature"),))] == n_batches
    assert s[("stream_detector_windows_scored_total", ())] == float((sizes // 2).sum())
    assert s[("stream_detector_batch_size_count", ())] == n_batches
    assert s[("stream_detector_batch_size_sum", ())] == total
    assert s[("stream_detector_inference_seconds_count", ())] == n_batches
    assert s[("stream_detector_event_lag_seconds", ())] == pytest.approx(2.5)
    assert s[("stream_detector_alerts_total", (("state", "open"),))] == 1
    assert s[("stream_detector_alerts_total", (("state", "update"),))] == 0
    assert s[("stream_detector_alerts_total", (("state", "resolved"),))] == 1
    # only the alert with an event time feeds the end-to-end histogram; 0.25 s falls in le=0.25
    assert s[("stream_detector_end_to_end_lag_seconds_count", ())] == 1
    assert s[("stream_detector_end_to_end_lag_seconds_bucket", (("le", "0.25"),))] == 1
    assert s[("stream_detector_end_to_end_lag_seconds_bucket", (("le", "0.1"),))] == 0
    assert s[("stream_detector_consumer_lag_messages", (("partition", "0"), ("topic", "obs")))] == 17
    assert s[("stream_detector_tracked_entities", ())] == 42
    assert s[("stream_detector_evictions_total", (("cause", "idle"),))] == 3
    assert s[("stream_detector_threshold", (("quantile", "0.5"),))] == pytest.approx(np.quantile(thresholds, 0.5))
    assert s[("stream_detector_threshold", (("quantile", "1"),))] == pytest.approx(thresholds.max())
    info = [k for k in s if k[0] == "stream_detector_model_info"]
    assert dict(info[0][1])["model_version"] == "v7" and dict(info[0][1])["provider"] == "CPUExecutionProvider"
    assert s[("process_resident_memory_bytes", ())] > 10e6  # a Python process with numpy loaded
    assert s[("stream_detector_ready", ())] == 0  # nothing assigned yet


def test_fill_ratio_is_capped_and_bucketed(served):
    metrics, _, server = served
    metrics.observe_batch(consumed_by_topic={"a": 64, "b": 64}, decoded=128, scored=0, max_batch=256)
    metrics.observe_batch(consumed_by_topic={"a": 256}, decoded=256, scored=0, max_batch=256)
    s = samples(scrape(server.port)[1])
    assert s[("stream_detector_batch_fill_ratio_bucket", (("le", "0.5"),))] == 1
    assert s[("stream_detector_batch_fill_ratio_bucket", (("le", "1.0"),))] == 2
    assert s[("stream_detector_batch_fill_ratio_sum", ())] == pytest.approx(1.5)


def test_revoked_partitions_lose_their_lag_series(served):
    metrics, _, server = served
    metrics.set_consumer_lag({("obs", 0): 5, ("obs", 1): 6})
    metrics.drop_partitions([("obs", 1), ("obs", 9)])  # 9 was never there: no error
    s = samples(scrape(server.port)[1])
    lag = {k for k in s if k[0] == "stream_detector_consumer_lag_messages"}
    assert lag == {("stream_detector_consumer_lag_messages", (("partition", "0"), ("topic", "obs")))}


def test_openmetrics_is_served_when_asked_for(served):
    _, _, server = served
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        assert r.read().decode().rstrip().endswith("# EOF")


def test_two_detectors_in_one_process_do_not_share_series():
    a, b = Metrics(process_metrics=False), Metrics(process_metrics=False)
    a.observe_batch(consumed_by_topic={"t": 5}, decoded=5, scored=5, max_batch=10)
    assert a.registry.get_sample_value("stream_detector_events_consumed_total", {"topic": "t"}) == 5
    assert b.registry.get_sample_value("stream_detector_events_consumed_total", {"topic": "t"}) is None


def test_port_in_use_is_one_sentence():
    with MetricsServer(Metrics(process_metrics=False), host="127.0.0.1", port=0) as first:
        with pytest.raises(OSError, match=rf"cannot serve metrics on 127.0.0.1:{first.port} \("):
            MetricsServer(Metrics(process_metrics=False), host="127.0.0.1", port=first.port)


def test_unknown_path_is_404(served):
    assert scrape(served[2].port, "/nope")[0] == 404


def test_every_exposed_metric_is_documented():
    """docs/operations.md lists every metric family the service exposes (and nothing it does not)."""
    names = set(Metrics().names())
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", DOCS.read_text(), flags=re.M))
    ours = {n for n in names if n.startswith("stream_detector_")}
    assert ours - documented == set(), "exposed but not documented"
    assert {d for d in documented if d.startswith("stream_detector_")} - ours == set(), "documented but not exposed"
    assert "process_resident_memory_bytes" in names
