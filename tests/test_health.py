"""Liveness and readiness: the rules on an injected clock, then the same answers over HTTP."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from stream_detector.service.health import Health
from stream_detector.service.metrics import Metrics, MetricsServer


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def ready_health(clock: Clock) -> Health:
    h = Health(stall_after_s=10, clock=clock)
    h.tick()
    h.model_loaded("v1")
    h.broker_reachable()
    h.assigned([("obs", 0)])
    return h


def test_alive_during_start_grace_then_dead_if_loop_never_starts():
    clock = Clock()
    h = Health(stall_after_s=10, clock=clock)
    assert h.liveness().ok
    clock.t += 11
    st = h.liveness()
    assert not st.ok and "has not started" in st.text()


def test_stuck_loop_is_not_live():
    clock = Clock()
    h = ready_health(clock)
    clock.t += 9.5
    assert h.liveness().ok and h.readiness().ok
    clock.t += 1
    assert not h.liveness().ok
    st = h.readiness()
    assert not st.ok and "last ticked 10s ago" in st.text()
    h.tick()
    assert h.liveness().ok and h.readiness().ok


@pytest.mark.parametrize(
    "breaks, reason",
    [
        (lambda h: h.revoked([("obs", 0)]), "no partitions are assigned"),
        (lambda h: h.broker_unreachable("all brokers are down (127.0.0.1:1)"), "all brokers are down"),
        (lambda h: h.stopping(), "shutting down"),
    ],
)
def test_each_readiness_condition_is_needed_and_named(breaks, reason):
    h = ready_health(Clock())
    assert h.readiness().ok
    breaks(h)
    st = h.readiness()
    assert not st.ok and any(reason in r for r in st.reasons)
    assert h.liveness().ok  # not ready is not dead


def test_not_ready_without_a_model_and_lists_every_reason():
    h = Health(stall_after_s=10, clock=Clock())
    st = h.readiness()
    assert not st.ok
    assert set(st.reasons) == {
        "no model is loaded",
        "the broker has not been reached yet",
        "no partitions are assigned to this member",
    }


def test_partitions_add_and_remove_by_topic_and_partition():
    h = ready_health(Clock())
    h.assigned([("obs", 1), ("obs", 2)])
    h.revoked([("obs", 0), ("obs", 2)])
    assert h.partitions == {("obs", 1)}


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_http_probes_follow_the_health_object():
    clock = Clock()
    h = Health(stall_after_s=10, clock=clock)
    metrics = Metrics(process_metrics=False)
    metrics.track_readiness(h)
    with MetricsServer(metrics, h, host="127.0.0.1", port=0) as srv:
        assert get(srv.port, "/healthz") == (200, "ok\n")
        code, body = get(srv.port, "/readyz")
        assert code == 503 and "no model is loaded" in body
        assert metrics.registry.get_sample_value("stream_detector_ready") == 0
        h.tick(), h.model_loaded("v1"), h.broker_reachable(), h.assigned([("obs", 3)])
        assert get(srv.port, "/readyz") == (200, "ok\n")
        assert metrics.registry.get_sample_value("stream_detector_ready") == 1
        clock.t += 60
        code, body = get(srv.port, "/healthz")
        assert code == 503 and "last ticked 60s ago" in body
        req = urllib.request.Request(f"http://127.0.0.1:{srv.port}/readyz", method="HEAD")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 503
