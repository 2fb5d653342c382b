"""Thresholds: one contract suite over every implementation (warm-up, no learning from anomalies,
state round-trip, determinism), what each computes, and adversarial streams for the bound on how
far a threshold may rise without an alert (drift of the scores, heavy-tailed noise, a level shift
followed by a spike)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import orjson
import pytest

from stream_detector.core.calibration import ScoreDistribution, ScoreReference, calibrate_scores, describe_distribution
from stream_detector.core.alerts import OPEN, RESOLVED, AlertParams, AlertState, Source
from stream_detector.core.thresholds import (
    BLOCK,
    Calibrated,
    RollingQuantile,
    Spot,
    ThresholdParams,
    make_threshold,
    resolve_method,
    threshold_from_state,
)

PARAMS = {
    "calibrated": ThresholdParams(method="calibrated", warmup=50, history=200),
    "quantile": ThresholdParams(method="quantile", warmup=50, history=200, quantile=0.99, multiplier=1.2),
    "spot": ThresholdParams(method="spot", warmup=200, risk=1e-3, init_quantile=0.95, max_peaks=100),
}


def scores(rng, n):
    return rng.gamma(2.0, 1.0, size=n)


def reference(rng=None, n=5000, sample=None) -> ScoreReference:
    """The reference a bundle calibrated on gamma(2, 1) validation scores would carry."""
    if sample is None:
        sample = (rng or np.random.default_rng(99)).gamma(2.0, 1.0, size=n)
    ref = ScoreReference.from_calibration(calibrate_scores(sample, 0.999))
    assert ref is not None
    return ref


REF = reference()


def new(method, initial, p=None):
    return make_threshold(method, p or PARAMS[method], initial, REF)


@pytest.mark.parametrize("method", ["quantile", "spot"])
def test_initial_threshold_during_warmup(rng, method):
    p = PARAMS[method]
    t = new(method, 7.0)
    for x in scores(rng, p.warmup - 1):
        thr, _ = t.observe(float(min(x, 6.9)))
        assert thr == 7.0
    t.observe(1.0)
    assert t.threshold() != 7.0  # the entity's own statistics take over after warm-up


def test_calibrated_starts_at_the_reference_and_adapts_after_warmup(rng):
    p = PARAMS["calibrated"]
    t = new("calibrated", 7.0)
    start = math.exp(REF.point.log_score_at(p.alert_level))
    for x in scores(rng, p.warmup - 1):
        assert t.observe(float(x) * 0.5)[0] == start  # the bundle's calibration until warm-up
    t.observe(0.5)
    assert t.threshold() < start  # an entity half as noisy as the validation data gets a lower bar
    assert t.threshold() == pytest.approx(start * math.exp(t.shift))
    assert -math.log(2) - 0.5 < t.shift < -math.log(2) + 0.5  # (the 90 % quantile of 50 scores is rough)


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_scores_before_learning_and_ignores_anomalies(rng, method):
    t = new(method, 50.0)
    for x in scores(rng, 600):
        t.observe(float(x))
    before = orjson.dumps(t.state(), option=orjson.OPT_SERIALIZE_NUMPY)
    thr_before = t.threshold()
    thr, anomalous = t.observe(thr_before * 10)
    assert thr == thr_before and anomalous
    if method != "calibrated":  # (the calibrated threshold's run holds the score, judged or not)
        assert orjson.dumps(t.state(), option=orjson.OPT_SERIALIZE_NUMPY) == before  # nothing learned
    else:
        assert (
            orjson.loads(orjson.dumps(t.state(), option=orjson.OPT_SERIALIZE_NUMPY))["seen"]
            == orjson.loads(before)["seen"]
        )
    thr, anomalous = t.observe(float("nan"))
    assert anomalous and t.threshold() == thr_before


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_state_round_trip_through_json(rng, method):
    p = PARAMS[method]
    data = scores(rng, 900)
    for cut in (5, 10, p.warmup + 5, 700, 750):  # 750: within a block of the calibrated method's own tail
        a = new(method, 9.0)
        for x in data[:cut]:
            a.observe(float(x))
        state = orjson.loads(orjson.dumps(a.state(), option=orjson.OPT_SERIALIZE_NUMPY))
        b = threshold_from_state(p, state, REF)
        assert b.threshold() == a.threshold()
        for x in data[cut:]:
            assert a.observe(float(x)) == b.observe(float(x))


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_deterministic(method):
    outs = []
    for _ in range(2):
        r = np.random.default_rng(3)
        t = new(method, 9.0)
        outs.append([t.observe(float(x)) for x in scores(r, 500)])
    assert outs[0] == outs[1]


def test_rolling_quantile_matches_numpy_on_the_last_history(rng):
    p = ThresholdParams(
        method="quantile", warmup=10, history=64, quantile=0.9, multiplier=1.0, max_shift=1e12, max_shift_down=1e12
    )  # (no bound)
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
    p = ThresholdParams(method="quantile", warmup=3, history=10, quantile=1.0, multiplier=2.0, max_shift=1e12, max_shift_down=1e12)
    t = RollingQuantile(100.0, p)
    for x in (1.0, 3.0, 2.0):
        t.observe(x)
    assert t.threshold() == 6.0


def test_spot_threshold_is_a_far_tail_quantile(rng):
    p = ThresholdParams(method="spot", warmup=2000, risk=1e-3, init_quantile=0.95, max_peaks=2000, max_shift=1e12, max_shift_down=1e12)
    t = Spot(1e9, p)
    data = rng.exponential(1.0, size=20000)
    for x in data:
        t.observe(float(x))
    # exponential(1): P(X > z) = e^-z, so z(1e-3) = 6.9; the GPD fit of the tail should land near it
    assert 5.5 < t.threshold() < 8.5
    assert (data > t.threshold()).mean() < 5e-3


def test_calibrated_false_alarm_rate_matches_its_level(rng):
    """On scores drawn like the validation scores, single scores are judged anomalous at a rate
    near 10 ** -alert_level (the alert level is a probability, not a multiplier), and anomalous
    runs start at no more than that rate."""
    point_only = ScoreReference(REF.point, None, 0, REF.anchor)
    data = scores(rng, 200_000)
    for level in (2.0, 3.0):
        p = ThresholdParams(method="calibrated", alert_level=level, learn_level=1.5, warmup=100)
        t = Calibrated(point_only, p)
        rate = np.mean([t.observe(float(x))[1] for x in data])
        assert 0.5 * 10**-level < rate < 2.0 * 10**-level, (level, rate)
        both = Calibrated(REF, p)
        flags = np.array([both.observe(float(x))[1] for x in data])
        starts = np.sum(flags[1:] & ~flags[:-1])
        assert starts < 2.5 * 10**-level * data.size, (level, starts)


def test_a_tail_fitted_to_few_validation_scores_keeps_its_false_alarm_rate_over_draws(rng):
    """With 60 or 150 validation scores (300- and 750-row histories) the tail rests on 6 or 15
    scores above the 90 % quantile. Averaged over draws of those scores, the predictive tail's
    1-in-10,000 bar is passed by normal scores about once in 10,000; the exponential fitted to the
    same excesses, the tail without its estimation uncertainty, is passed several times as often."""
    for n in (60, 150):
        predictive, plain = [], []
        for _ in range(1000):
            s = rng.exponential(1.0, size=n)  # P(S > x) = e^-x
            quantiles, tail = describe_distribution(s)
            for out, t in ((predictive, tail), (plain, {**tail, "shape": 0.0})):
                bar = math.exp(ScoreDistribution.from_json(quantiles, t).log_score_at(4.0))
                out.append(math.exp(-bar))
        assert 0.7e-4 < np.mean(predictive) < 1.5e-4, (n, np.mean(predictive))
        assert np.mean(plain) > 3 * np.mean(predictive), (n, np.mean(plain))


def test_a_stationary_stream_keeps_its_threshold(rng):
    """No ratchet either way: over 100,000 scores like the validation ones, the bar stays where the
    calibration put it (median within 5 %, the same in the first and the second half)."""
    t = Calibrated(REF, ThresholdParams(method="calibrated"))
    start = t.threshold()
    thr = np.array([t.observe(float(x))[0] for x in scores(rng, 100_000)])[1000:]
    first, second = np.median(thr[: thr.size // 2]), np.median(thr[thr.size // 2 :])
    assert abs(first / start - 1) < 0.05 and abs(second / start - 1) < 0.05 and abs(second / first - 1) < 0.05


# ---- adversarial streams: the bar may not ratchet ---------------------------------------------

BOUNDED = {
    "calibrated": ThresholdParams(method="calibrated"),
    "quantile": ThresholdParams(method="quantile"),
    "spot": ThresholdParams(method="spot", risk=1e-4),
}


@pytest.mark.parametrize("method", sorted(BOUNDED))
def test_slow_upward_drift_ends_in_an_alert_not_a_runaway_bar(rng, method):
    """Scores whose level grows 100x over 20,000 events: the bar never exceeds max_shift x its
    start without the stream having been judged anomalous, and the drift ends up judged anomalous."""
    p = BOUNDED[method]
    t = make_threshold(method, p, REF_INITIAL, REF)
    start = t.threshold() if method == "calibrated" else REF_INITIAL
    n = 20_000
    growth = np.exp(np.linspace(0.0, math.log(100.0), n))
    first_anomaly = None
    for i, x in enumerate(scores(rng, n) * growth):
        thr, anomalous = t.observe(float(x))
        if first_anomaly is None and thr > p.max_shift * start * (1 + 1e-9):
            pytest.fail(f"{method}: threshold {thr:.3g} passed {p.max_shift} x its start {start:.3g} before any alert")
        if anomalous and first_anomaly is None:
            first_anomaly = i
        assert thr <= p.max_shift * start * (1 + 1e-9)
    assert first_anomaly is not None and first_anomaly < n * 0.8


REF_INITIAL = float(np.quantile(np.random.default_rng(99).gamma(2.0, 1.0, size=5000), 0.999))


@pytest.mark.parametrize("method", sorted(BOUNDED))
def test_heavy_tailed_noise_does_not_lift_the_bar(rng, method):
    """Pareto (tail index 1.5) noise on top of the usual scores: the tail never lifts the bar past
    max_shift x its start, and a score 50x the usual level still alerts at the end."""
    p = BOUNDED[method]
    t = make_threshold(method, p, REF_INITIAL, REF)
    start = t.threshold() if method == "calibrated" else REF_INITIAL
    noise = scores(rng, 30_000) * (1.0 + 0.05 * rng.pareto(1.5, size=30_000))
    thr = [t.observe(float(x))[0] for x in noise]
    assert max(thr) <= p.max_shift * start * (1 + 1e-9)
    assert t.observe(50.0 * float(np.median(noise)) * 10)[1]


@pytest.mark.parametrize("method", sorted(BOUNDED))
def test_level_shift_then_spike_alerts(rng, method):
    """The scores settle 2x higher for a long while (below the bar: a re-baselining within the
    bound), then one score 10x the largest pre-shift score arrives: it must be judged anomalous."""
    p = BOUNDED[method]
    t = make_threshold(method, p, REF_INITIAL, REF)
    before = scores(rng, 3000)
    for x in before:
        t.observe(float(x))
    for x in 2.0 * scores(rng, 10_000):
        t.observe(float(x))
    assert t.observe(10.0 * float(before.max()))[1]


def test_calibrated_run_catches_a_sustained_moderate_rise(rng):
    """Scores 3x their usual level: few are anomalous alone, but their run is within ten events."""
    t = Calibrated(REF, ThresholdParams(method="calibrated"))
    for x in scores(rng, 2000):
        t.observe(float(x))
    point = [t.observe(float(x))[1] for x in 3.0 * scores(rng, 10)]
    assert point[-1] and sum(point) < 10  # judged by the end of the first run, not by every score
    single_alone = sum(REF.point.surprise_of(math.log(3.0 * x)) > 4.0 for x in scores(rng, 1000))
    assert single_alone < 500


def test_calibrated_surprise_is_the_calibrated_value(rng):
    t = Calibrated(REF, ThresholdParams(method="calibrated"))
    for x in scores(rng, 500):
        t.observe(float(x))
    x = t.threshold()
    t.observe(x * 1.0001)
    assert t.surprise(x * 1.0001) >= 4.0
    low = float(np.median(scores(rng, 1000)))
    for _ in range(20):
        t.observe(low)
    assert 0.0 < t.surprise(low) < 1.0


def test_max_shift_down_1_keeps_a_quiet_entitys_bar_at_the_calibrated_one(rng):
    """An entity a tenth as noisy as the validation data: by default its bar falls to 1/2 of the
    calibrated one (max_shift_down 2), with max_shift_down 1 it stays there."""
    quiet = 0.1 * scores(rng, 3000)
    bars = {}
    for down in (2.0, 1.0):
        t = Calibrated(REF, ThresholdParams(method="calibrated", max_shift_down=down))
        start = t.threshold()
        for x in quiet:
            t.observe(float(x))
        bars[down] = t.threshold() / start
    assert bars[2.0] == pytest.approx(0.5) and bars[1.0] == pytest.approx(1.0)


def test_learn_tail_skip_keeps_moderate_incident_scores_out_of_the_level(rng):
    """A long stretch of scores above the learn level but below the alert level (an incident the
    point test does not flag, the run test switched off): capped, they lift the entity's level; skipped, they do not
    (its own tail, which would learn them, switched off)."""
    point_only = ScoreReference(REF.point, None, 0, REF.anchor)
    lo, hi = (math.exp(REF.point.log_score_at(s)) for s in (2.5, 3.5))
    lifted = {}
    for tail in ("cap", "skip"):
        t = Calibrated(point_only, ThresholdParams(method="calibrated", learn_tail=tail, own_tail=False))
        start = t.threshold()
        for x in scores(rng, 500):
            t.observe(float(x))
        flags = [t.observe(float(x))[1] for x in rng.uniform(lo, hi, size=1000)]
        assert not any(flags)
        lifted[tail] = t.threshold() / start
    assert lifted["cap"] > 1.3 and lifted["skip"] < 1.1, lifted


def test_confirm_within_needs_a_second_exceedance_unless_the_score_is_ten_times_rarer(rng):
    p = ThresholdParams(method="calibrated", confirm_within=10)
    point_only = ScoreReference(REF.point, None, 0, REF.anchor)
    moderate = math.exp(REF.point.log_score_at(4.5))  # past the alert level 4, not past 5
    extreme = math.exp(REF.point.log_score_at(5.5))
    typical = float(np.median(scores(rng, 1000)))

    def warm() -> Calibrated:
        t = Calibrated(point_only, p)
        for x in scores(np.random.default_rng(5), 300):
            t.observe(float(x))
        return t

    t = warm()
    assert not t.observe(moderate)[1]  # alone: not anomalous ...
    for _ in range(5):
        t.observe(typical)
    assert t.observe(moderate)[1]  # ... confirmed 6 scores later: anomalous
    t = warm()
    t.observe(moderate)
    for _ in range(10):
        t.observe(typical)
    assert not t.observe(moderate)[1]  # 11 scores later: alone again
    assert warm().observe(extreme)[1]  # ten times rarer than the alert level: anomalous alone
    assert Calibrated(point_only, ThresholdParams(method="calibrated")).observe(moderate)[1]  # off: anomalous alone
    # The pending exceedance moves with the entity's state (changelog, rebalance).
    t = warm()
    t.observe(moderate)
    restored = Calibrated.from_state(REF, p, orjson.loads(orjson.dumps(t.state(), option=orjson.OPT_SERIALIZE_NUMPY)))
    assert restored.observe(moderate)[1]


def test_confirm_within_lowers_the_false_alarm_rate_to_the_next_decade(rng):
    """On scores drawn like the validation scores, confirmed single scores are anomalous at about
    10 ** -(alert_level + 1), plus pairs: far below the 10 ** -alert_level without confirmation."""
    point_only = ScoreReference(REF.point, None, 0, REF.anchor)
    data = scores(rng, 200_000)
    level = 2.0
    base = ThresholdParams(method="calibrated", alert_level=level, learn_level=1.5, warmup=100)
    rates = {}
    for n in (0, 10):
        t = Calibrated(point_only, ThresholdParams(**{**base.__dict__, "confirm_within": n}))
        rates[n] = np.mean([t.observe(float(x))[1] for x in data])
    assert 0.5 * 10**-level < rates[0] < 2.0 * 10**-level
    assert 0.5 * 10 ** -(level + 1) < rates[10] < 3.0 * 10 ** -(level + 1), rates


@pytest.mark.parametrize("method", ["quantile", "spot"])
def test_near_zero_normal_scores_do_not_take_the_bar_to_zero(method, rng):
    """A count model's normal scores are about 0: the rolling bar stops at 1 / max_shift_down of its start."""
    p = BOUNDED[method]
    t = make_threshold(method, p, 1.0, None)
    for x in rng.uniform(0, 1e-12, size=5000):
        t.observe(float(x))
    assert t.threshold() == pytest.approx(1.0 / p.max_shift_down)
    assert not t.observe(0.1)[1]  # a score a tenth of the calibrated bar is not an alert


def test_method_resolution():
    assert resolve_method(ThresholdParams(), REF) == "calibrated"
    assert resolve_method(ThresholdParams(), None) == "quantile"
    with pytest.raises(ValueError, match="predates calibrated thresholds"):
        resolve_method(ThresholdParams(method="calibrated"), None)
    with pytest.raises(ValueError, match="cannot be restored"):
        threshold_from_state(ThresholdParams(), {"kind": "calibrated"}, None)


def test_bad_params_are_refused():
    with pytest.raises(ValueError, match="unknown threshold method"):
        ThresholdParams(method="magic").validate()
    with pytest.raises(ValueError, match="history"):
        ThresholdParams(warmup=100, history=50).validate()
    with pytest.raises(ValueError, match="max_shift"):
        ThresholdParams(max_shift=0.5).validate()
    with pytest.raises(ValueError, match="learn_level"):
        ThresholdParams(learn_level=5.0, alert_level=4.0).validate()
    with pytest.raises(ValueError, match="unknown threshold state kind"):
        threshold_from_state(ThresholdParams(), {"kind": "nope"})


# ---- the entity's own tail, and re-baselining one alert at a time -----------------------------


def heavier_tail(rng, n):
    """Scores like the calibration's in their bulk, but with a Pareto tail (index 1.5) on top, as
    real series whose short history held none of their spikes."""
    return scores(rng, n) * (1.0 + 0.3 * rng.pareto(1.5, size=n))


def test_own_tail_lifts_the_bar_of_an_entity_whose_tail_is_heavier_than_the_calibration(rng):
    """The same stream, judged with and without the entity's own tail: with it, far fewer normal
    scores cross the bar (the bar follows the tail, within max_shift since no alert opened)."""
    stream = heavier_tail(rng, 30_000)
    crossed, bars = {}, {}
    for own in (False, True):
        t = Calibrated(REF, ThresholdParams(method="calibrated", own_tail=own, max_shift=4.0))
        start = t.threshold()
        crossed[own] = sum(t.observe(float(x))[1] for x in stream)
        bars[own] = t.threshold() / start
        assert bars[own] <= t.params.max_shift * (1 + 1e-9)
    assert crossed[True] < 0.3 * crossed[False] and bars[True] > bars[False], (crossed, bars)


def test_own_tail_asks_nothing_of_a_stream_like_the_calibration_and_ignores_one_incidents_scores(rng):
    """Scores like the validation ones leave the bar where the calibration put it; then 150 scores
    just below the bar (an incident the bar does not flag) fill one or two blocks, and the median of
    the blocks' maxima bounds what they do to the entity's tail (with the 99 % quantile of the last
    1,000 scores instead, they would be its whole top 1 %)."""
    point_only = ScoreReference(REF.point, None, 0, REF.anchor)
    t = Calibrated(point_only, ThresholdParams(method="calibrated", learn_tail="skip"))
    start = t.threshold()
    for x in scores(rng, 20 * BLOCK):
        t.observe(float(x))
    assert t.threshold() == pytest.approx(start, rel=0.1)
    before = t.threshold()
    lo, hi = (math.exp(REF.point.log_score_at(z)) for z in (3.0, 3.8))
    assert not any(t.observe(float(x))[1] for x in rng.uniform(lo, hi, size=150))
    for x in scores(rng, 2 * BLOCK):
        t.observe(float(x))
    assert t.threshold() < 1.6 * before


def test_own_tail_lowers_the_bar_of_a_lighter_tailed_entity_within_max_shift_down(rng):
    """own_tail_lowers: an entity whose scores have the calibration's 90 % quantile but a lighter tail
    (gamma with a larger shape, scaled to it) gets a lower bar, never below 1 / max_shift_down of
    the one its level asks for; a spike between the two bars alerts only with the option. A stream
    like the calibration's keeps its bar."""
    q90 = float(np.quantile(scores(rng, 100_000), 0.9))
    light = rng.gamma(12.0, 1.0, size=20 * BLOCK) * (q90 / float(np.quantile(rng.gamma(12.0, 1.0, 100_000), 0.9)))
    bars = {}
    for lowers in (False, True):
        t = Calibrated(REF, ThresholdParams(method="calibrated", own_tail_lowers=lowers))
        for x in light:
            t.observe(float(x))
        bars[lowers] = t
    lower, level_only = bars[True].threshold(), bars[False].threshold()
    assert level_only / bars[True].params.max_shift_down * (1 - 1e-9) <= lower < 0.7 * level_only
    spike = math.sqrt(lower * level_only)
    assert bars[True].observe(spike)[1] and not bars[False].observe(spike)[1]
    like = Calibrated(REF, ThresholdParams(method="calibrated", own_tail_lowers=True))
    start = like.threshold()
    for x in scores(rng, 20 * BLOCK):
        like.observe(float(x))
    assert like.threshold() == pytest.approx(start, rel=0.15)


@pytest.mark.parametrize("entities", [1, 3, None])
def test_single_entity_floor_keeps_a_one_entity_bundles_bar_at_its_calibration(rng, entities):
    """A quiet stretch (scores a third of the calibration's) sinks the bar to 1 / max_shift_down of its
    start, except with single_entity_floor for a bundle whose calibration is one entity's own scores;
    a pooled calibration (several entities) or an unknown one (older bundles) sinks as before."""
    ref = dataclasses.replace(REF, entities=entities)
    bars = {}
    for floor in (False, True):
        t = Calibrated(ref, ThresholdParams(method="calibrated", single_entity_floor=floor))
        start = t.threshold()
        for x in scores(rng, 3000) / 3.0:
            t.observe(float(x))
        bars[floor] = t.threshold() / start
    assert bars[False] == pytest.approx(1 / 2.0)
    assert bars[True] == (pytest.approx(1.0) if entities == 1 else pytest.approx(1 / 2.0))


def replay_with_alerts(t, stream, params=AlertParams()):
    """Judge `stream` as the pipeline does: the threshold, then the entity's alert lifecycle, which
    tells the threshold of every alert it opens. Yields (threshold, anomalous, alerts opened so far)."""
    alert, opened = AlertState(), 0
    for i, x in enumerate(stream):
        thr, anomalous = t.observe(float(x))
        ev = alert.step(float(x), anomalous, params)
        if ev == OPEN:
            alert.opened(f"a{i}", Source("t", 0, i))
            t.alert_opened()
            opened += 1
        elif ev == RESOLVED:
            alert.closed(params)
        yield thr, anomalous, opened


def test_a_drift_re_baselines_one_alert_per_step_and_a_spike_after_it_still_alerts(rng):
    """Scores whose level grows 100x over 20,000 events, with alerts as the pipeline opens them: the
    bar never passes max_shift ** (1 + alerts opened so far) x its start, the drift opens alerts
    rather than lifting the bar silently, the bar does re-baseline (it ends above max_shift x its
    start), and a spike 10x the drifted level afterwards alerts."""
    p = ThresholdParams(method="calibrated", rebaseline_per_alert=True)
    t = Calibrated(REF, p)
    start = t.threshold()
    n = 20_000
    drift = scores(rng, n) * np.exp(np.linspace(0.0, math.log(100.0), n))
    opened = 0
    for thr, _, opened in replay_with_alerts(t, drift):
        assert thr <= start * p.max_shift ** (1 + opened) * (1 + 1e-9)
    assert 1 <= opened <= 40
    assert t.threshold() > p.max_shift * start
    assert t.observe(10.0 * 100.0 * float(np.median(scores(rng, 1000))))[1]


def test_without_rebaseline_per_alert_the_bound_stays_whatever_alerts_open(rng):
    p = ThresholdParams(method="calibrated", rebaseline_per_alert=False)
    t = Calibrated(REF, p)
    start = t.threshold()
    drift = scores(rng, 5000) * np.exp(np.linspace(0.0, math.log(100.0), 5000))
    assert max(thr for thr, _, _ in replay_with_alerts(t, drift)) <= p.max_shift * start * (1 + 1e-9)


def test_the_widened_bound_and_the_blocks_survive_a_state_round_trip(rng):
    t = Calibrated(REF, ThresholdParams(method="calibrated", rebaseline_per_alert=True))
    drift = scores(rng, 6000) * np.exp(np.linspace(0.0, math.log(30.0), 6000))
    *_, (_, _, opened) = replay_with_alerts(t, drift)
    assert opened >= 1
    state = orjson.loads(orjson.dumps(t.state(), option=orjson.OPT_SERIALIZE_NUMPY))
    back = threshold_from_state(t.params, state, REF)
    assert back.threshold() == t.threshold()
    for x in 30.0 * heavier_tail(rng, 2000):
        assert back.observe(float(x)) == t.observe(float(x))


def test_a_state_restored_with_own_tail_off_keeps_only_the_level(rng):
    """A user who turns own_tail off keeps the entity's learned level but not its tail's lift."""
    on = Calibrated(REF, ThresholdParams(method="calibrated", max_shift=4.0))
    for x in heavier_tail(rng, 5000):
        on.observe(float(x))
    state = orjson.loads(orjson.dumps(on.state(), option=orjson.OPT_SERIALIZE_NUMPY))
    off = ThresholdParams(method="calibrated", max_shift=4.0, own_tail=False)
    restored = threshold_from_state(off, state, REF)
    without_tail = threshold_from_state(off, {k: v for k, v in state.items() if k not in ("block_maxima", "block", "tail_shift")}, REF)
    assert restored.threshold() == without_tail.threshold() < on.threshold()


# ---- a pooled bundle calibrated in each entity's own frame (calibration.entity_frame) ------------

FLEET_SCALES = {"quiet": 1.0, "middle": 3.0, "loud": 9.0}  # entities' score levels in one pooled bundle


def fleet_reference(rng, per_entity: bool) -> ScoreReference:
    """A pooled bundle's reference: gamma(2, 1) validation scores of three entities at FLEET_SCALES,
    calibrated with (per_entity) or without the entity of each score."""
    keys = [k for k in FLEET_SCALES for _ in range(2000)]
    sample = np.concatenate([scale * rng.gamma(2.0, 1.0, size=2000) for scale in FLEET_SCALES.values()])
    ref = ScoreReference.from_calibration(calibrate_scores(sample, 0.999, entities=keys if per_entity else None), 3)
    assert ref is not None
    return ref


def test_a_pooled_calibration_in_each_entitys_frame_keeps_every_entitys_false_alarm_rate(rng):
    """Three entities 3x apart pooled raw form a mixture far wider than each one: its 1-in-1,000 bar,
    moved by each entity's own level, is passed by every entity's normal scores more than ten times
    less often than promised (the bar sits that much too high for incidents too). Calibrated in each
    entity's frame, every entity starts at its own level and its normal scores pass the bar at about
    the promised rate."""
    p = ThresholdParams(method="calibrated", alert_level=3.0, learn_level=1.5, warmup=100)
    pooled, framed = fleet_reference(rng, False), fleet_reference(rng, True)
    assert pooled.entity_levels == {} and set(framed.entity_levels) == set(FLEET_SCALES)
    levels = framed.entity_levels
    assert levels["middle"] - levels["quiet"] == pytest.approx(math.log(3.0), abs=0.15)
    assert levels["loud"] - levels["middle"] == pytest.approx(math.log(3.0), abs=0.15)
    for key, scale in FLEET_SCALES.items():
        data = scale * scores(rng, 100_000)
        rates = {}
        for name, ref in (("pooled", pooled), ("framed", framed)):
            t = make_threshold("calibrated", p, 1.0, dataclasses.replace(ref, run=None, run_length=0), key)
            rates[name] = np.mean([t.observe(float(x))[1] for x in data])
        assert 0.2e-3 < rates["framed"] < 2.0e-3, (key, rates)
        assert rates["pooled"] < 0.1e-3, (key, rates)


def test_a_known_entity_starts_at_its_level_and_its_bounds_are_around_it(rng):
    """An entity the calibration knows starts at its own bar (no warm-up at the pooled one), sinks at
    most max_shift_down below it and drifts at most max_shift above it before an alert; an entity it
    did not see starts at the pooled bar."""
    ref = fleet_reference(rng, True)
    p = ThresholdParams(method="calibrated")
    unknown = make_threshold("calibrated", p, 1.0, ref, "new-entity")
    loud = make_threshold("calibrated", p, 1.0, ref, "loud")
    start = loud.threshold()
    assert start / unknown.threshold() == pytest.approx(math.exp(ref.entity_levels["loud"]))
    for x in 9.0 * scores(rng, 3000) / 4.0:  # a quiet stretch: a quarter of its calibration
        loud.observe(float(x))
    assert loud.threshold() == pytest.approx(start / 2.0)
    crossed = False
    for x in 9.0 * scores(rng, 20_000) * np.linspace(1.0, 20.0, 20_000):  # a slow drift upward
        thr, anomalous = loud.observe(float(x))
        assert thr <= 2.0 * start * (1 + 1e-9)
        crossed = crossed or anomalous
    assert crossed
    state = orjson.loads(orjson.dumps(loud.state(), option=orjson.OPT_SERIALIZE_NUMPY))
    restored = threshold_from_state(p, state, ref, "loud")
    assert restored.threshold() == pytest.approx(loud.threshold())


def test_relearn_after_keeps_the_scores_just_after_an_anomalous_one_out_of_the_bar(rng):
    """An incident that ends in a long tail of sub-threshold scores (what a window over the incident
    scores after it): learned, they lift the entity's bar; with relearn_after longer than that tail,
    the bar stays where it was. Scores after the pause are learned again, and the pause survives a
    state round trip."""
    lo, hi = (math.exp(REF.point.log_score_at(s)) for s in (2.5, 3.8))
    spike = math.exp(REF.point.log_score_at(6.0))
    point_only = ScoreReference(REF.point, None, 0, REF.anchor)  # the run test would flag the echo
    lifted = {}
    for n in (0, 200):
        t = Calibrated(point_only, ThresholdParams(method="calibrated", relearn_after=n))
        for x in scores(rng, 1500):
            t.observe(float(x))
        start = t.threshold()
        assert t.observe(spike)[1]
        echo = rng.uniform(lo, hi, size=150)
        flags = [t.observe(float(x))[1] for x in echo[:100]]
        assert not any(flags)
        lifted[n] = t.threshold() / start
        if n:
            state = orjson.loads(orjson.dumps(t.state(), option=orjson.OPT_SERIALIZE_NUMPY))
            assert state["since_anomalous"] == 100
            back = threshold_from_state(t.params, state, point_only)
            for x in echo[100:]:  # the rest of the pause: learned by neither
                assert back.observe(float(x)) == t.observe(float(x))
            assert t.threshold() == pytest.approx(start)
            for x in rng.uniform(lo, hi, size=600):  # after it, the same scores are learned again
                t.observe(float(x))
            assert t.threshold() > 1.2 * start
    assert lifted[0] > 1.2 and lifted[200] == pytest.approx(1.0), lifted
