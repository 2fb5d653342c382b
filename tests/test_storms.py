"""Alert storms grouped into incidents (core/storms.py) and false-positive feedback
(AlertState.learn_false_positive) through DetectorCore, on generated fleets."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from bundle_factory import make_bundle
from stream_detector.core.alerts import AlertParams
from stream_detector.core.events import EventBatch
from stream_detector.core.pipeline import DetectionSettings, DetectorCore
from stream_detector.core.scorer import Scorer
from stream_detector.core.storms import StormGrouper, StormParams
from stream_detector.core.thresholds import ThresholdParams

F, W = 4, 8
F_NAMES = ["a", "b", "c", "d"]  # bundle_factory's feature names
T0 = 1_700_000_000_000


def fleet(rng, n_entities=20, steps=300, faults=()):
    """One event per entity per second; `faults`: (entities, first step, steps, size) added to feature 1."""
    rows = rng.normal(size=(steps, n_entities, F)).astype(np.float32) * 2.0 + 10.0
    for ents, t, length, size in faults:
        for e in ents:
            rows[t : t + length, e, 1] += size
    keys = [f"host-{e:02d}" for _ in range(steps) for e in range(n_entities)]
    times = np.repeat(np.arange(steps, dtype=np.int64) * 1000, n_entities) + T0
    return keys, rows.reshape(-1, F), times


def new_core(tmp_path, storms=StormParams(), alerts=AlertParams(resolve_after=5, cooldown=10)):
    b = make_bundle(tmp_path, window=W, threshold=12.0, center=[10.0] * F, scale=[2.0] * F)
    settings = DetectionSettings(threshold=ThresholdParams(warmup=50, history=300), alerts=alerts, storms=storms)
    return DetectorCore(b, Scorer(b, provider="cpu", intra_op_threads=1), settings, clock=lambda: 1_800_000_000.0)


def run(core, keys, rows, times, batch=500, start=0):
    alerts = []
    for i in range(0, len(keys), batch):
        j = min(len(keys), i + batch)
        part = np.zeros(j - i, dtype=np.int32)
        b = EventBatch.build(
            keys[i:j], rows[i:j], times[i:j], topic="m", partition=part, offset=np.arange(start + i, start + j)
        )
        alerts += core.process(b).alerts
    return alerts


def opens(alerts):
    return [a for a in alerts if a["state"] == "open"]


def test_grouper_joins_within_the_window_and_starts_afresh_after_it():
    g = StormGrouper(StormParams(window_ms=10_000, min_entities=3))
    first = g.join("a1", "h1", 0)
    assert first.page and first.incident_id == "a1" and first.size == 1 and not first.storm
    second, third = g.join("a2", "h2", 4_000), g.join("a3", "h3", 10_000)
    assert g.join("a5", "h2", 9_000).size == 3, "an entity that opens again counts once"
    assert [second.incident_id, third.incident_id] == ["a1", "a1"] and not second.page and not third.page
    assert (second.size, second.storm, third.size, third.storm) == (2, False, 3, True)
    assert g.member("a1").size == 3 and not g.member("a1").page
    later = g.join("a4", "h4", 10_001)  # beyond the window of a1's start: a new incident, a new page
    assert later.page and later.incident_id == "a4"
    off = StormGrouper(StormParams(window_ms=0))
    assert all(off.join(f"x{i}", "h", i).page for i in range(5))


def test_fleet_wide_fault_across_20_entities_pages_once(tmp_path, rng):
    keys, rows, times = fleet(rng, faults=[(range(20), 200, 20, 40.0)])
    alerts = run(new_core(tmp_path), keys, rows, times)
    opened = opens(alerts)
    assert len({a["key"] for a in opened}) == 20, "every entity's alert is still on the topic"
    assert sum(a["page"] for a in opened) == 1, "one page, not 20"
    assert len({a["incident_id"] for a in alerts}) == 1
    assert max(a["incident_size"] for a in opened) == 20 and opened[-1]["storm"]
    resolved = [a for a in alerts if a["state"] == "resolved"]
    assert len(resolved) == len(opened) and all(a["incident_id"] == opened[0]["incident_id"] for a in resolved)
    # without grouping the same fault pages 20 times
    alone = opens(run(new_core(tmp_path / "off", storms=StormParams(window_ms=0)), keys, rows, times))
    assert len({a["key"] for a in alone}) == 20 and all(a["page"] for a in alone)
    assert len({a["incident_id"] for a in alone}) == len(alone)


def test_faults_far_apart_are_separate_incidents(tmp_path, rng):
    keys, rows, times = fleet(rng, n_entities=4, steps=400, faults=[([0], 150, 10, 40.0), ([1], 300, 10, 40.0)])
    opened = opens(run(new_core(tmp_path, storms=StormParams(window_ms=60_000)), keys, rows, times))
    assert [a["key"] for a in opened] == ["host-00", "host-01"]
    assert all(a["page"] for a in opened) and opened[0]["incident_id"] != opened[1]["incident_id"]


@pytest.mark.parametrize("larger", [False, True])
def test_false_positive_verdict_silences_the_same_pattern_but_not_a_larger_one(tmp_path, rng, larger):
    n, size = 3, 40.0
    keys, rows, times = fleet(rng, n_entities=n, steps=300, faults=[([1], 200, 10, size)])
    core = new_core(tmp_path)
    first = opens(run(core, keys, rows, times))
    assert [a["key"] for a in first] == ["host-01"]
    found = core.learn_false_positive(first[0]["alert_id"])
    assert found is not None and found[1] == "host-01" and found[2] > first[0]["threshold"]
    assert core.learn_false_positive("no-such-alert") is None
    # the same pattern again (fresh noise), or one three times larger
    again = size * (3.0 if larger else 1.0)
    keys2, rows2, times2 = fleet(rng, n_entities=n, steps=300, faults=[([1], 200, 10, again)])
    second = opens(run(core, keys2, rows2, times2 + 300_000, start=len(keys)))
    assert [a["key"] for a in second] == (["host-01"] if larger else [])


def test_feedback_floor_is_bounded_and_travels_with_the_entity_state(tmp_path, rng):
    keys, rows, times = fleet(rng, n_entities=2, steps=300, faults=[([0], 200, 10, 400.0)])  # a huge episode
    core = new_core(tmp_path, alerts=AlertParams(resolve_after=5, cooldown=10, feedback_max_factor=2.0))
    alert = opens(run(core, keys, rows, times))[0]
    _, _, floor = core.learn_false_positive(alert["alert_id"], key="host-00")
    state = core.state_of(0, "host-00")
    threshold_now = state["threshold"]
    assert floor < alert["peak_score"], "bounded: one verdict cannot blind the entity to the whole episode"
    # the floor covers the top_k features that led the episode at its peak, the faulty one (1) first
    assert F_NAMES.index(alert["top_features"][0]["name"]) == 1
    floors = state["alert"]["feedback_floors"]
    assert len(floors) == AlertParams().top_k and 1 in [f for f, _ in floors]
    assert all(v == pytest.approx(floor) for _, v in floors)
    assert state["alert"]["feedback_floor"] == 0.0, "no floor for the features the alert did not name"
    # the state round-trips through JSON (the changelog) with the floors and the remembered alert
    moved = new_core(tmp_path / "other")
    moved.restore(0, "host-00", orjson.loads(orjson.dumps(state, option=orjson.OPT_SERIALIZE_NUMPY)))
    assert moved.state_of(0, "host-00")["alert"]["feedback_floors"] == state["alert"]["feedback_floors"]
    assert moved.learn_false_positive(alert["alert_id"]) is not None, "the resolved alert is remembered"
    assert threshold_now is not None


def test_a_verdict_on_one_feature_does_not_hide_an_incident_on_another(tmp_path, rng):
    """A false positive led by feature 1 excuses the same burst on feature 1 again, not a burst of
    the same size on feature 3 of the same entity (a verdict on a noisy metric must not blind the
    rest of a multivariate entity)."""
    core = new_core(tmp_path, alerts=AlertParams(resolve_after=5, cooldown=10, top_k=1))
    keys, rows, times = fleet(rng, n_entities=2, steps=300, faults=[([1], 200, 10, 40.0)])
    first = opens(run(core, keys, rows, times))
    assert [a["key"] for a in first] == ["host-01"] and first[0]["top_features"][0]["name"] == "b"
    assert core.learn_false_positive(first[0]["alert_id"]) is not None
    for r, (feature, expected) in enumerate(((1, []), (3, ["host-01"]), (1, [])), start=1):
        keys2, rows2, times2 = fleet(rng, n_entities=2, steps=300)
        rows2.reshape(300, 2, F)[200:210, 1, feature] += 40.0
        opened = opens(run(core, keys2, rows2, times2 + 300_000 * r, start=r * len(keys)))
        assert [a["key"] for a in opened] == expected, f"a burst on feature {feature}"


def test_a_floor_from_an_older_state_still_covers_every_feature(tmp_path, rng):
    """States written before floors were per feature carry one floor, and remembered alerts without
    their features: both go on covering every feature."""
    core = new_core(tmp_path)
    keys, rows, times = fleet(rng, n_entities=2, steps=300, faults=[([1], 200, 10, 40.0)])
    alert = opens(run(core, keys, rows, times))[0]
    state = orjson.loads(orjson.dumps(core.state_of(0, "host-01"), option=orjson.OPT_SERIALIZE_NUMPY))
    old = {k: v for k, v in state["alert"].items() if k not in ("feedback_floors", "peak_features")}
    old["recent"] = [r[:2] for r in old["recent"]]
    old["feedback_floor"] = 5.0 * alert["peak_score"]
    older = new_core(tmp_path / "older")
    older.restore(0, "host-01", {**state, "alert": old})
    keys2, rows2, times2 = fleet(rng, n_entities=2, steps=300)
    rows2.reshape(300, 2, F)[200:210, 1, 3] += 40.0
    assert opens(run(older, keys2, rows2, times2 + 300_000, start=len(keys))) == []
    _, _, floor = older.learn_false_positive(alert["alert_id"])
    assert older.state_of(0, "host-01")["alert"]["feedback_floor"] == pytest.approx(5.0 * alert["peak_score"])
    assert floor > 0 and older.state_of(0, "host-01")["alert"]["feedback_floors"] == []
