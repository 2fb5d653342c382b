"""Alert lifecycle: open once, optional updates, resolve after N normal scores, cool-down,
deterministic ids, contract-3 JSON."""

from __future__ import annotations

import re

import numpy as np
import orjson
import pytest

from stream_detector.core.alerts import (
    ALERT_SCHEMA,
    AlertParams,
    AlertState,
    Source,
    alert_event,
    iso_utc,
    make_alert_id,
    top_features,
)
from stream_detector.core.events import NO_TIME


def run(pattern: str, params: AlertParams) -> list[str | None]:
    """Drive one entity with a pattern of normal ('.') and anomalous ('X') scores."""
    a = AlertState()
    out = []
    for i, c in enumerate(pattern):
        anomalous = c == "X"
        ev = a.step(10.0 + i if anomalous else 1.0, anomalous, params)
        if ev == "open":
            a.opened(f"id{i}", Source("t", 0, i))
        if ev == "resolved":
            a.closed(params)
        out.append(ev)
    return out


def events(out):
    return [(i, e) for i, e in enumerate(out) if e]


def test_one_incident_is_one_alert():
    out = run("..XXXX.X..XX....", AlertParams(resolve_after=3))
    assert events(out) == [(2, "open"), (14, "resolved")]


def test_resolve_after_counts_consecutive_normal_scores():
    out = run("X..X..X...", AlertParams(resolve_after=3))
    assert events(out) == [(0, "open"), (9, "resolved")]


def test_cooldown_suppresses_a_new_open_right_after_resolve():
    p = AlertParams(resolve_after=2, cooldown=3, resolve_backoff=0)
    out = run("X..XX.XX..", p)
    # resolved at 2; events 3, 4, 5 are inside the cool-down; 6 opens a new alert
    assert events(out) == [(0, "open"), (2, "resolved"), (6, "open"), (9, "resolved")]
    # without a cool-down the crossing at 3 opens a second alert at once
    assert events(run("X..XX.XX..", AlertParams(resolve_after=2, cooldown=0, resolve_backoff=0))) == [(0, "open"), (2, "resolved"), (3, "open"), (9, "resolved")]


def test_update_every_n_anomalous_scores():
    out = run("XXXXXXX..", AlertParams(resolve_after=2, update_every=3))
    assert events(out) == [(0, "open"), (3, "update"), (6, "update"), (8, "resolved")]


def test_update_when_score_rises_by_a_factor():
    p = AlertParams(resolve_after=1, update_factor=2.0)
    a = AlertState()
    assert a.step(10.0, True, p) == "open"
    a.opened("x", Source("t", 0, 0))
    assert a.step(15.0, True, p) is None
    assert a.step(25.0, True, p) == "update"  # 25 >= 2 x 10
    assert a.step(40.0, True, p) is None  # 40 < 2 x 25
    assert a.peak_score == 40.0 and a.n_anomalous == 4


def test_state_round_trip_mid_incident():
    p = AlertParams(resolve_after=3, update_every=2)
    pattern = "..XX.X..X.XXX...."
    full = run(pattern, p)
    a = AlertState()
    for i, c in enumerate(pattern[:6]):
        ev = a.step(5.0, c == "X", p)
        if ev == "open":
            a.opened("id", Source("t", 0, i))
    b = AlertState.from_state(orjson.loads(orjson.dumps(a.state())))
    rest = []
    for c in pattern[6:]:
        ev = b.step(5.0, c == "X", p)
        if ev == "resolved":
            b.closed(p)
        rest.append(ev)
    assert rest == full[6:]


def test_alert_id_is_deterministic_and_input_dependent():
    s = Source("metrics", 3, 1234)
    a = make_alert_id("m1", "host-1", s)
    assert a == make_alert_id("m1", "host-1", Source("metrics", 3, 1234))
    assert re.fullmatch(r"[0-9a-f]{32}", a)
    assert len({a, make_alert_id("m2", "host-1", s), make_alert_id("m1", "host-2", s), make_alert_id("m1", "host-1", Source("metrics", 3, 1235))}) == 4


def test_flapping_alerts_back_off_their_resolve_period():
    pattern = "X...X...X...X....."  # the same trouble coming back every 4 scores
    flat = AlertParams(resolve_after=2, cooldown=0, resolve_backoff=0)
    assert events(run(pattern, flat)) == [(0, "open"), (2, "resolved"), (4, "open"), (6, "resolved"),
                                          (8, "open"), (10, "resolved"), (12, "open"), (14, "resolved")]
    # it came back within one resolve period of resolving: the second alert waits 4 normal scores,
    # so the later crossings stay in it
    backoff = AlertParams(resolve_after=2, cooldown=0, resolve_backoff=2)
    assert events(run(pattern, backoff)) == [(0, "open"), (2, "resolved"), (4, "open"), (16, "resolved")]


def test_resolve_backoff_is_capped_and_a_quiet_period_resets_it():
    p = AlertParams(resolve_after=2, cooldown=1, resolve_backoff=1)
    a = AlertState()
    periods = []
    # alerts that each come back 2 scores after the previous resolved (inside cool-down + period)
    for _ in range(4):
        assert a.step(9.0, True, p) == "open"
        a.opened("x", Source("t", 0, 0))
        periods.append(a.resolve_period(p))
        while a.step(1.0, False, p) != "resolved":
            pass
        a.closed(p)
        assert a.step(1.0, False, p) is None  # cool-down
    assert periods == [2, 4, 4, 4]  # doubled once, never more (resolve_backoff 1)
    for _ in range(p.cooldown + 4):  # a whole watch (cool-down + period) without trouble
        a.step(1.0, False, p)
    assert a.step(9.0, True, p) == "open" and a.resolve_period(p) == 2
    restored = AlertState.from_state(a.state())
    assert (restored.flaps, restored.watch_left) == (a.flaps, a.watch_left)
    old = {k: v for k, v in a.state().items() if k not in ("flaps", "watch_left")}  # written before resolve_backoff
    assert AlertState.from_state(old).resolve_period(p) == 2


def test_alert_event_json_contract():
    a = AlertState()
    p = AlertParams()
    assert a.step(12.0, True, p) == "open"
    src = Source("metrics", 2, 77)
    a.opened(make_alert_id("v1", "pump-7", src), src)
    ev = alert_event(
        state="open", alert=a, key="pump-7", source=src, event_time_ms=1_700_000_000_123, detected_at_ms=1_700_000_001_000.0,
        score=12.0, threshold=3.0, model_version="v1", feature_errors=np.array([1.0, 6.0, 0.0, 3.0], np.float32),
        feature_names=["a", "b", "c", "d"], top_k=3,
    )
    doc = orjson.loads(orjson.dumps(ev))
    assert doc["schema"] == ALERT_SCHEMA and doc["state"] == "open" and doc["key"] == "pump-7"
    assert doc["event_time"] == "2023-11-14T22:13:20.123Z" and doc["detected_at"] == "2023-11-14T22:13:21.000Z"
    assert doc["source"] == {"topic": "metrics", "partition": 2, "offset": 77} == doc["opened_by"]
    assert doc["score"] == 12.0 and doc["threshold"] == 3.0 and doc["model_version"] == "v1"
    assert [f["name"] for f in doc["top_features"]] == ["b", "d", "a"]
    assert doc["top_features"][0]["share"] == pytest.approx(0.6)
    assert doc["alert_id"] == a.alert_id and len(doc["event_id"]) == 32 and doc["event_id"] != doc["alert_id"]


def test_unknown_event_time_is_null_and_iso_format():
    assert iso_utc(0) == "1970-01-01T00:00:00.000Z"
    a = AlertState()
    a.step(5.0, True, AlertParams())
    a.opened("x", Source("f", 0, 0))
    ev = alert_event(state="open", alert=a, key="k", source=Source("f", 0, 0), event_time_ms=NO_TIME, detected_at_ms=0,
                     score=5.0, threshold=1.0, model_version="v", feature_errors=np.zeros(2), feature_names=["p", "q"], top_k=5)
    assert ev["event_time"] is None
    assert [f["share"] for f in ev["top_features"]] == [0.0, 0.0]


def test_top_features_order_and_k():
    tf = top_features(np.array([0.1, 0.5, 0.4]), ["x", "y", "z"], 2)
    assert [(f["name"], f["share"]) for f in tf] == [("y", 0.5), ("z", 0.4)]


def test_bad_params_are_refused():
    with pytest.raises(ValueError, match="resolve_after"):
        AlertParams(resolve_after=0).validate()
    with pytest.raises(ValueError, match="update_factor"):
        AlertParams(update_factor=0.5).validate()
