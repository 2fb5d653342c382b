"""The Alertmanager sink (service/alertmanager.py) against the real Alertmanager (tests/alertmanager_proc.py):
one alert per incident, resolve, silences, outages without loss, two URLs, re-sends and `check`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest

from stream_detector.config import AlertmanagerSettings
from stream_detector.core.alerts import iso_utc
from stream_detector.service.alertmanager import ALERTNAME, AlertmanagerSink, check_alertmanager

if TYPE_CHECKING:
    from alertmanager_proc import AlertmanagerProcess

pytest_plugins = ["alertmanager_proc"]  # the fixtures `alertmanager` and `make_alertmanager`


def event(
    state: str,
    key: str,
    *,
    alert_id: str | None = None,
    incident_id: str | None = None,
    score: float = 4.0,
    silenced: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A contract-3 alert event plus the incident fields; detected now."""
    alert_id = alert_id or f"a-{key}"
    now = iso_utc(time.time() * 1000)
    return {
        "alert_id": alert_id,
        "event_id": f"{alert_id}-{state}",
        "state": state,
        "key": key,
        "event_time": now,
        "detected_at": now,
        "score": score,
        "threshold": 2.5,
        "calibrated_score": None,
        "peak_score": score,
        "model_version": "m-1",
        "source": {"topic": "observations", "partition": 0, "offset": 7},
        "opened_by": {"topic": "observations", "partition": 0, "offset": 7},
        "top_features": [{"name": "cpu", "share": 0.62, "error": 3.1}, {"name": "mem", "share": 0.2, "error": 1.0}],
        "incident_id": incident_id or alert_id,
        "page": True,
        "incident_size": 1,
        "silenced": silenced,
    }


class Done:
    """done() callbacks that count, and check they run on the test's thread."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        import threading

        assert threading.current_thread() is threading.main_thread()
        self.calls += 1


def sink_for(*urls: str, **kw: Any) -> AlertmanagerSink:
    return AlertmanagerSink(AlertmanagerSettings(urls=list(urls), timeout_s=2.0, **kw))


def wait_for(cond: Callable[[], bool], sink: AlertmanagerSink | None = None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sink is not None:
            sink.poll()
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"not true within {timeout} s: {cond.__doc__ or cond}")


def of_incident(am: AlertmanagerProcess, incident_id: str) -> list[dict[str, Any]]:
    return [a for a in am.alerts() if a["labels"].get("incident_id") == incident_id]


@pytest.fixture
def sinks():
    """Closes every sink a test made (their worker threads)."""
    made: list[AlertmanagerSink] = []
    yield made
    for s in made:
        s.close(0.5)


def test_open_alert_arrives_with_its_labels_then_resolves(alertmanager: AlertmanagerProcess, sinks) -> None:
    sink = sink_for(alertmanager.url, extra_labels={"team": "ops"})
    sinks.append(sink)
    done = Done()
    sink.submit(event("open", "host-1"), done)
    assert sink.pending == 1
    wait_for(lambda: done.calls == 1, sink)
    assert sink.pending == 0 and sink.last_error is None
    [alert] = of_incident(alertmanager, "a-host-1")
    assert alert["labels"] == {
        "alertname": ALERTNAME,
        "incident_id": "a-host-1",
        "entity": "host-1",
        "model_version": "m-1",
        "top_feature": "cpu",
        "source_topic": "observations",
        "team": "ops",
    }
    ann = alert["annotations"]
    assert ann["members"] == "host-1" and ann["member_count"] == "1" and ann["alert_ids"] == "a-host-1"
    assert ann["top_features"] == "cpu 62%, mem 20%" and ann["score"] == "4" and ann["threshold"] == "2.5"
    assert "host-1" in ann["summary"] and "\n" not in ann["summary"]
    assert alert["status"]["state"] == "active"

    sink.submit(event("resolved", "host-1", score=1.0), done)
    wait_for(lambda: done.calls == 2, sink)
    assert of_incident(alertmanager, "a-host-1") == []


def test_storm_is_one_alert_until_every_member_resolves(alertmanager: AlertmanagerProcess, sinks) -> None:
    sink = sink_for(alertmanager.url)
    sinks.append(sink)
    done = Done()
    keys = [f"host-{i}" for i in range(5)]
    for i, k in enumerate(keys):
        sink.submit(event("open", k, incident_id="storm-1", score=3.0 + i), done)
    wait_for(lambda: done.calls == 5, sink)
    [alert] = of_incident(alertmanager, "storm-1")
    assert alert["labels"]["entity"] == "host-0"
    assert alert["annotations"]["members"].split(", ") == keys
    assert alert["annotations"]["member_count"] == "5"
    assert alert["annotations"]["score"] == "7"  # the worst open member

    for k in keys[:4]:
        sink.submit(event("resolved", k, incident_id="storm-1", score=1.0), done)
    wait_for(lambda: done.calls == 9, sink)
    [alert] = of_incident(alertmanager, "storm-1")
    assert alert["annotations"]["members"].split(", ") == keys

    sink.submit(event("resolved", "host-4", incident_id="storm-1", score=1.0), done)
    wait_for(lambda: done.calls == 10, sink)
    assert of_incident(alertmanager, "storm-1") == []
    assert sink.pending == 0


def test_resolve_of_an_alert_never_seen_open_ends_it(alertmanager: AlertmanagerProcess, sinks) -> None:
    """After a restart the new sink knows nothing of the open alert; the resolve must still end it."""
    before, after = sink_for(alertmanager.url), sink_for(alertmanager.url)
    sinks += [before, after]
    done = Done()
    before.submit(event("open", "host-1"), done)
    wait_for(lambda: done.calls == 1, before)
    assert len(of_incident(alertmanager, "a-host-1")) == 1
    after.submit(event("resolved", "host-1", score=1.0), done)
    wait_for(lambda: done.calls == 2, after)
    assert of_incident(alertmanager, "a-host-1") == []


def test_silenced_events_never_reach_alertmanager(alertmanager: AlertmanagerProcess, sinks) -> None:
    sink = sink_for(alertmanager.url)
    sinks.append(sink)
    silenced, loud = Done(), Done()
    sink.submit(event("open", "quiet", silenced={"id": "s-1", "reason": "maintenance"}), silenced)
    assert sink.poll() == 1 and silenced.calls == 1 and sink.pending == 0
    sink.submit(event("open", "loud"), loud)  # posted after the silenced one would have been
    wait_for(lambda: loud.calls == 1, sink)
    assert [a["labels"]["entity"] for a in alertmanager.alerts()] == ["loud"]


@pytest.mark.slow
def test_outage_keeps_events_pending_until_it_is_back(alertmanager: AlertmanagerProcess, sinks, caplog) -> None:
    caplog.set_level(logging.INFO, logger="stream_detector.service.alertmanager")
    sink = sink_for(alertmanager.url)
    sinks.append(sink)
    done = Done()
    alertmanager.stop()
    sink.submit(event("open", "host-1"), done)
    wait_for(lambda: sink.last_error is not None, sink)
    time.sleep(0.7)  # past the first retries
    assert sink.poll() == 0 and sink.pending == 1 and done.calls == 0
    assert alertmanager.url in (sink.last_error or "") and "connection refused" in (sink.last_error or "")

    alertmanager.start()  # the same port
    wait_for(lambda: done.calls == 1, sink)
    assert sink.pending == 0 and sink.last_error is None
    assert len(of_incident(alertmanager, "a-host-1")) == 1
    levels = [r.levelname for r in caplog.records]
    assert levels == ["WARNING", "INFO"]  # once per outage, not per retry; then the recovery


@pytest.mark.slow
def test_two_urls_done_only_when_both_accept(alertmanager: AlertmanagerProcess, make_alertmanager, sinks) -> None:
    second = make_alertmanager(start=False)
    sink = sink_for(alertmanager.url, second.url)
    sinks.append(sink)
    done = Done()
    sink.submit(event("open", "host-1"), done)
    wait_for(lambda: len(of_incident(alertmanager, "a-host-1")) == 1, sink)
    time.sleep(0.3)
    assert sink.poll() == 0 and sink.pending == 1
    assert second.url in (sink.last_error or "")

    second.start()
    wait_for(lambda: done.calls == 1, sink)
    assert len(of_incident(second, "a-host-1")) == 1 and sink.pending == 0


@pytest.mark.slow
def test_open_alert_is_resent_and_ends_by_itself_when_resends_stop(alertmanager: AlertmanagerProcess) -> None:
    sink = sink_for(alertmanager.url, resend_interval_s=0.5)
    done = Done()
    try:
        sink.submit(event("open", "host-1"), done)
        wait_for(lambda: done.calls == 1, sink)
        [first] = of_incident(alertmanager, "a-host-1")
        ends = datetime.fromisoformat(first["endsAt"])
        assert 1.0 < (ends - datetime.now(UTC)).total_seconds() <= 2.1  # 4 x the re-send interval ahead
        wait_for(lambda: of_incident(alertmanager, "a-host-1")[0]["updatedAt"] != first["updatedAt"], sink, 3.0)
        [later] = of_incident(alertmanager, "a-host-1")
        assert later["endsAt"] > first["endsAt"] and later["startsAt"] == first["startsAt"]
    finally:
        sink.close(1.0)
    # A service that stopped re-sending: its alert ends within 4 re-send intervals.
    wait_for(lambda: of_incident(alertmanager, "a-host-1") == [], timeout=4.0)


def test_check_alertmanager(alertmanager: AlertmanagerProcess, make_alertmanager) -> None:
    assert check_alertmanager(AlertmanagerSettings(urls=[alertmanager.url])) is None
    nobody = make_alertmanager(start=False).url  # a free port where nothing listens
    error = check_alertmanager(AlertmanagerSettings(urls=[alertmanager.url, nobody], timeout_s=2.0))
    assert error is not None and nobody in error and "connection refused" in error
    assert error.count(".") <= 4 and "\n" not in error  # one sentence (the URL has its own dots)


@pytest.mark.parametrize(
    ("section", "why"),
    [
        ({"urls": ["http://127.0.0.1:1"], "extra_labels": {"a-b": "x"}}, "not a valid Alertmanager label name"),
        ({"urls": ["http://127.0.0.1:1"], "extra_labels": {"entity": "x"}}, "a label the Alertmanager sink sets"),
        ({"urls": ["ftp://127.0.0.1:1"]}, "not an http:// or https:// URL"),
    ],
)
def test_bad_alertmanager_settings_are_one_sentence(section: dict[str, Any], why: str) -> None:
    from stream_detector.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match=why) as refused:
        load_settings(None, {"alertmanager": section})
    assert "\n" not in str(refused.value) and str(refused.value).startswith("configuration key 'alertmanager.")


def test_forget_lets_go_of_incidents_whose_partitions_moved_away(
    make_alertmanager: Callable[..., AlertmanagerProcess],
) -> None:
    down = make_alertmanager(start=False)  # nothing is accepted: only `forget` can settle an event
    sink = sink_for(down.url)
    done = Done()
    moved = event("open", "h1")
    stays = event("open", "h2")
    stays["source"] = {"topic": "observations", "partition": 1, "offset": 3}
    sink.submit(moved, done)
    sink.submit(stays, done)
    try:
        assert sink.forget({("observations", 0)}) == 1
        assert sink.poll() == 1 and sink.pending == 1, "the moved incident's event no longer holds its batch"
        assert sink.forget({("observations", 0)}) == 0 and sink.pending == 1
    finally:
        sink.close(0.1)
