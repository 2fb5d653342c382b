"""Per-entity sessions, sequences with gaps, and count vectors per time bucket."""

from __future__ import annotations

import numpy as np
import pytest

from stream_detector.logs.features import (
    LogFeatureConfigError,
    LogFeaturizer,
    end_template_ids,
    explode,
    make_feature_config,
)

V = 6  # vocabulary: id 0 unknown + 5 templates
S = 1000  # ms per second


def feed(fz: LogFeaturizer, events: list[tuple[str, int, int]]):
    ents, times, tids = zip(*events)
    return fz.add_batch(list(ents), np.array(times), np.array(tids))


def test_gaps_and_positions_are_per_entity():
    fz = LogFeaturizer(V, make_feature_config(session_timeout_s=100))
    out = feed(fz, [("a", 0, 1), ("b", 5 * S, 2), ("a", 7 * S, 3), ("a", 7 * S, 3), ("b", 6 * S, 4)])
    assert out.gap_s.tolist() == [0.0, 0.0, 7.0, 0.0, 1.0]
    assert out.position.tolist() == [0, 0, 1, 2, 1]
    assert out.sessions == [] and out.buckets == []
    done = fz.close_all().sessions
    by = {s.entity: s for s in done}
    assert by["a"].template_ids.tolist() == [1, 3, 3] and by["a"].gaps_s.tolist() == [0, 7, 0]
    assert (by["a"].start_ms, by["a"].end_ms, by["a"].reason) == (0, 7 * S, "flush")
    assert by["a"].counts(V).tolist() == [0, 1, 0, 2, 0, 0]


def test_inactivity_timeout_splits_sessions_at_next_event_and_on_expire():
    fz = LogFeaturizer(V, make_feature_config(session_timeout_s=10))
    out = feed(fz, [("a", 0, 1), ("a", 10 * S, 2), ("a", 21 * S, 3), ("b", 21 * S, 1)])
    assert [(s.entity, s.template_ids.tolist(), s.reason) for s in out.sessions] == [("a", [1, 2], "timeout")]
    assert out.position.tolist() == [0, 1, 0, 0] and out.gap_s[2] == 0.0
    assert fz.expire(31 * S).sessions == []  # exactly the timeout: still open
    exp = fz.expire(31 * S + 1).sessions
    assert sorted(s.entity for s in exp) == ["a", "b"] and all(s.reason == "timeout" for s in exp)
    assert len(fz) == 0


def test_end_template_closes_the_session_it_ends():
    templates = ["<unknown template>", "open <NUM>", "write", "close <NUM>", "x", "y"]
    cfg = make_feature_config(end_templates=("close <NUM>",))
    fz = LogFeaturizer(V, cfg, end_ids=end_template_ids(cfg, templates))
    out = feed(fz, [("a", 0, 1), ("a", S, 2), ("a", 2 * S, 3), ("a", 3 * S, 2)])
    assert [(s.template_ids.tolist(), s.reason) for s in out.sessions] == [([1, 2, 3], "end-template")]
    assert out.position.tolist() == [0, 1, 2, 0]
    with pytest.raises(LogFeatureConfigError, match="not in the template set"):
        end_template_ids(make_feature_config(end_templates=("nope",)), templates)


def test_entity_cap_evicts_least_recently_active_and_reports_it():
    fz = LogFeaturizer(V, make_feature_config(max_entities=2))
    out = feed(fz, [("a", 0, 1), ("b", S, 1), ("a", 2 * S, 2), ("c", 3 * S, 1)])
    assert [(s.entity, s.reason) for s in out.sessions] == [("b", "evicted")]
    assert len(fz) == 2


def test_max_session_events_bounds_memory():
    fz = LogFeaturizer(V, make_feature_config(max_session_events=3))
    out = feed(fz, [("a", i * S, 1) for i in range(7)])
    assert [len(s.template_ids) for s in out.sessions] == [3, 3]
    assert all(s.reason == "max-length" for s in out.sessions)


def test_count_vectors_per_bucket_match_a_direct_count(rng):
    n, bucket = 2000, 60
    ents = [f"e{k}" for k in rng.integers(0, 20, size=n)]
    times = np.sort(rng.integers(0, 3600 * S, size=n))
    tids = rng.integers(0, V, size=n)
    fz = LogFeaturizer(V, make_feature_config(bucket_s=bucket, session_timeout_s=10 * 3600))
    got = {}
    half = n // 2
    for part in (slice(0, half), slice(half, n)):  # batch boundaries must not matter
        for b in fz.add_batch(ents[part], times[part], tids[part]).buckets:
            got[(b.entity, b.start_ms)] = b.counts.tolist()
    for b in fz.close_all().buckets:
        got[(b.entity, b.start_ms)] = b.counts.tolist()
    want: dict = {}
    for e, t, k in zip(ents, times.tolist(), tids.tolist()):
        want.setdefault((e, t // (bucket * S) * bucket * S), [0] * V)[k] += 1
    assert got == want


def test_expire_emits_ended_buckets_once():
    fz = LogFeaturizer(V, make_feature_config(bucket_s=10, session_timeout_s=1000))
    feed(fz, [("a", 1 * S, 1), ("a", 2 * S, 1), ("b", 15 * S, 2)])
    assert fz.expire(9 * S).buckets == []
    first = fz.expire(10 * S).buckets
    assert [(b.entity, b.start_ms, b.counts.tolist()) for b in first] == [("a", 0, [0, 2, 0, 0, 0, 0])]
    assert fz.expire(10 * S).buckets == []
    assert [(b.entity, b.start_ms) for b in fz.expire(20 * S).buckets] == [("b", 10 * S)]


def test_late_event_gets_gap_zero_and_is_counted():
    fz = LogFeaturizer(V, make_feature_config(bucket_s=10))
    out = feed(fz, [("a", 30 * S, 1), ("a", 5 * S, 2)])
    assert out.gap_s.tolist() == [0.0, 0.0] and fz.late_events == 1
    (b,) = fz.close_all().buckets
    assert b.start_ms == 30 * S and b.counts.tolist() == [0, 1, 1, 0, 0, 0]


def test_explode_counts_a_line_for_each_entity():
    ents, times, tids, line = explode([("a",), ("b", "c"), ("a",)], [10, 20, 30], [1, 2, 3])
    assert ents == ["a", "b", "c", "a"]
    assert times.tolist() == [10, 20, 20, 30] and tids.tolist() == [1, 2, 2, 3] and line.tolist() == [0, 1, 1, 2]


def test_bad_input_and_config():
    with pytest.raises(LogFeatureConfigError, match="bucket_s"):
        make_feature_config(bucket_s=0)
    with pytest.raises(LogFeatureConfigError, match="0..5"):
        LogFeaturizer(V, end_ids=[9])
    with pytest.raises(ValueError, match="template ids"):
        LogFeaturizer(V).add_batch(["a"], [0], [V])
