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


# ---- the broker's reachability over time (runtime.broker_unready_after_s, brokerwatch.py) -----------


def test_the_broker_counts_as_unreachable_only_after_the_configured_time():
    clock = Clock()
    h = Health(stall_after_s=100, clock=clock, broker_unready_after_s=5)
    h.tick(), h.model_loaded("v1"), h.broker_reachable(), h.assigned([("obs", 0)])
    h.broker_unreachable("first failure")
    clock.t += 4.9
    h.tick()
    h.broker_unreachable("a later failure")  # the outage still counts from its first report
    assert h.readiness().ok
    clock.t += 0.2
    h.tick()
    st = h.readiness()
    assert not st.ok and st.reasons == ("the Kafka broker has been unreachable for 5s (a later failure)",)
    h.broker_reachable()
    assert h.readiness().ok
    h.broker_unreachable("again")  # a new outage starts a new count
    clock.t += 4
    h.tick()
    assert h.readiness().ok


def test_before_the_broker_was_reached_it_is_not_ready_whatever_the_grace():
    h = Health(stall_after_s=10, clock=Clock(), broker_unready_after_s=60)
    h.tick(), h.model_loaded("v1"), h.assigned([("obs", 0)])
    assert h.readiness().reasons == ("the broker has not been reached yet",)


def _stats(*states: str) -> str:
    import orjson

    return orjson.dumps({"name": "c", "brokers": {f"b{i}": {"name": f"b{i}:9092/{i}", "state": s} for i, s in enumerate(states)}}).decode()


def test_broker_watch_reads_librdkafka_errors_and_statistics():
    from confluent_kafka import KafkaError

    from stream_detector.service.brokerwatch import BrokerWatch

    clock = Clock()
    h = Health(stall_after_s=100, clock=clock, broker_unready_after_s=2)
    h.tick(), h.model_loaded("v1"), h.broker_reachable(), h.assigned([("obs", 0)])
    watch = BrokerWatch(h)
    watch.on_error(KafkaError(KafkaError._MSG_TIMED_OUT, "not about reachability"))
    watch.on_stats(_stats("UP"))
    clock.t += 10
    assert h.readiness().ok
    watch.on_error(KafkaError(KafkaError._TRANSPORT, "b0:9092/0: Connection refused"))
    watch.on_stats(_stats("CONNECT", "DOWN"))
    clock.t += 2
    st = h.readiness()
    assert not st.ok and "unreachable for 2s (b0:9092/0: Connection refused)" in st.text()
    watch.on_stats("{not json")  # ignored
    watch.on_stats(_stats("DOWN", "UP"))  # one connection up again: reachable
    assert h.readiness().ok
    watch.on_stats(_stats("DOWN", "TRY_CONNECT"))  # no error callback this time: the statistics alone
    clock.t += 3
    assert "no broker connection is up (b0:9092/0 DOWN, b1:9092/1 TRY_CONNECT)" in h.readiness().text()
    watch.reachable()
    watch.failed("committing offsets failed: Coordinator not available")
    clock.t += 2
    assert "committing offsets failed" in h.readiness().text()
