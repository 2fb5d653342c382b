"""Thresholds: one contract suite over every implementation (warm-up, no learning from anomalies,
state round-trip, determinism), plus what each computes."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from stream_detector.core.thresholds import RollingQuantile, Spot, ThresholdParams, make_threshold, threshold_from_state

PARAMS = {
    "quantile": ThresholdParams(method="quantile", warmup=50, history=200, quantile=0.99, multiplier=1.2),
    "spot": ThresholdParams(method="spot", warmup=200, risk=1e-3, init_quantile=0.95, max_peaks=100),
}


def scores(rng, n):
    return rng.gamma(2.0, 1.0, size=n)


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_initial_threshold_during_warmup(rng, method):
    p = PARAMS[method]
    t = make_threshold(p, initial=7.0)
    for x in scores(rng, p.warmup - 1):
        thr, _ = t.observe(float(min(x, 6.9)))
        assert thr == 7.0
    t.observe(1.0)
    assert t.threshold() != 7.0  # the entity's own statistics take over after warm-up


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_scores_before_learning_and_ignores_anomalies(rng, method):
    p = PARAMS[method]
    t = make_threshold(p, initial=50.0)
    for x in scores(rng, 600):
        t.observe(float(x))
    before = orjson.dumps(t.state(), option=orjson.OPT_SERIALIZE_NUMPY)
    thr_before = t.threshold()
    thr, anomalous = t.observe(thr_before * 10)
    assert thr == thr_before and anomalous
    assert orjson.dumps(t.state(), option=orjson.OPT_SERIALIZE_NUMPY) == before  # nothing learned
    thr, anomalous = t.observe(float("nan"))
    assert anomalous and t.threshold() == thr_before


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_state_round_trip_through_json(rng, method):
    p = PARAMS[method]
    data = scores(rng, 900)
    for cut in (10, p.warmup + 5, 700):
        a = make_threshold(p, initial=9.0)
        for x in data[:cut]:
            a.observe(float(x))
        state = orjson.loads(orjson.dumps(a.state(), option=orjson.OPT_SERIALIZE_NUMPY))
        b = threshold_from_state(p, state)
        assert b.threshold() == a.threshold()
        for x in data[cut:]:
            assert a.observe(float(x)) == b.observe(float(x))


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_deterministic(method):
    p = PARAMS[method]
    outs = []
    for _ in range(2):
        r = np.random.default_rng(3)
        t = make_threshold(p, initial=9.0)
        outs.append([t.observe(float(x)) for x in scores(r, 500)])
    assert outs[0] == outs[1]


def test_rolling_quantile_matches_numpy_on_the_last_history(rng):
    p = ThresholdParams(warmup=10, history=64, quantile=0.9, multiplier=1.0)
    t = RollingQuantile(1e9, p)
    learned: list[float] = []
    for x in rng.normal(5, 1, size=500):
        thr, anomalous = t.observe(float(x))
        expected = 1e9 if len(learned) < p.warmup else float(np.quantile(learned[-p.history :], 0.9))
        assert thr == pytest.approx(expected, rel=1e-12)
        assert anomalous == (x > expected)
        if not anomalous:
            learned.append(float(x))
    assert len(learned) > 200


def test_rolling_quantile_multiplier():
    p = ThresholdParams(warmup=3, history=10, quantile=1.0, multiplier=2.0)
    t = RollingQuantile(100.0, p)
    for x in (1.0, 3.0, 2.0):
        t.observe(x)
    assert t.threshold() == 6.0


def test_spot_threshold_is_a_far_tail_quantile(rng):
    p = ThresholdParams(method="spot", warmup=2000, risk=1e-3, init_quantile=0.95, max_peaks=2000)
    t = Spot(1e9, p)
    data = rng.exponential(1.0, size=20000)
    for x in data:
        t.observe(float(x))
    # exponential(1): P(X > z) = e^-z, so z(1e-3) = 6.9; the GPD fit of the tail should land near it
    assert 5.5 < t.threshold() < 8.5
    assert (data > t.threshold()).mean() < 5e-3


def test_bad_params_are_refused():
    with pytest.raises(ValueError, match="unknown threshold method"):
        ThresholdParams(method="magic").validate()
    with pytest.raises(ValueError, match="history"):
        ThresholdParams(warmup=100, history=50).validate()
    with pytest.raises(ValueError, match="unknown threshold state kind"):
        threshold_from_state(ThresholdParams(), {"kind": "nope"})
