"""DetectorCore end to end on generated data: injected spikes open alerts, normal entities stay
quiet, results do not depend on how the stream is cut into batches, state moves between cores."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from bundle_factory import make_bundle
from stream_detector.core.alerts import AlertParams
from stream_detector.core.events import EventBatch
from stream_detector.core.pipeline import DetectionSettings, DetectorCore
from stream_detector.core.scorer import Scorer
from stream_detector.core.thresholds import ThresholdParams
from stream_detector.core.windows import hop_phase

F, W = 4, 8
SETTINGS = DetectionSettings(threshold=ThresholdParams(warmup=50, history=300), alerts=AlertParams(resolve_after=5))


def stream(rng, n_entities=6, steps=400, spikes=((3, 300),)):
    """Interleaved events of n_entities (entity e on partition e % 2) with spikes (entity, step)."""
    rows = rng.normal(size=(steps, n_entities, F)).astype(np.float32) * 2.0 + 10.0
    for e, t in spikes:
        rows[t, e, 1] += 30.0
    order = np.stack([rng.permutation(n_entities) for _ in range(steps)])  # random order within each step
    keys = [f"dev-{e}" for t in range(steps) for e in order[t]]
    flat = np.stack([rows[t, order[t]] for t in range(steps)]).reshape(-1, F)
    ents = order.reshape(-1)
    times = np.repeat(np.arange(steps, dtype=np.int64) * 1000, n_entities) + 1_700_000_000_000
    return keys, flat, times, (ents % 2).astype(np.int32)


def new_core(tmp_path, settings=SETTINGS, name="b"):
    b = make_bundle(tmp_path, window=W, threshold=12.0, center=[10.0] * F, scale=[2.0] * F, name=name)
    return DetectorCore(b, Scorer(b, provider="cpu", intra_op_threads=1), settings, clock=lambda: 1_800_000_000.0)


def run(core, keys, rows, times, parts, batch_sizes, row_state=False):
    results, i, k = [], 0, 0
    while i < len(keys):
        j = min(len(keys), i + batch_sizes[k % len(batch_sizes)])
        batch = EventBatch.build(keys[i:j], rows[i:j], times[i:j], topic="sensors", partition=parts[i:j], offset=np.arange(i, j))
        results.append((i, core.process(batch, row_alert_state=row_state)))
        i, k = j, k + 1
    return results


def flatten(results):
    out = []
    for start, r in results:
        for j, idx in enumerate(r.index.tolist()):
            out.append((start + idx, float(r.score[j]), float(r.threshold[j]), bool(r.alert_open[j]), r.alert_event[j]))
    return out


def test_spike_opens_one_alert_and_normal_entities_stay_quiet(tmp_path, rng):
    keys, rows, times, parts = stream(rng)
    core = new_core(tmp_path)
    results = run(core, keys, rows, times, parts, [97])
    alerts = [a for _, r in results for a in r.alerts]
    opens = [a for a in alerts if a["state"] == "open"]
    assert [a["key"] for a in opens] == ["dev-3"], alerts
    spike_offset = next(i for i, k in enumerate(keys) if k == "dev-3" and i >= 300 * 6)
    assert opens[0]["source"] == {"topic": "sensors", "partition": 1, "offset": spike_offset}
    assert opens[0]["top_features"][0]["name"] == "b"
    assert opens[0]["event_time"] == "2023-11-14T22:18:20.000Z"  # step 300
    assert [a["state"] for a in alerts] == ["open", "resolved"]
    assert alerts[1]["alert_id"] == opens[0]["alert_id"]
    # every event is scored once its window is full (hop 1): 6 entities x (400 - W + 1)
    assert sum(r.n_scored for _, r in results) == 6 * (400 - W + 1)


def test_batching_does_not_change_results(tmp_path, rng):
    keys, rows, times, parts = stream(rng, spikes=((1, 120), (4, 250), (4, 330)))
    a = flatten(run(new_core(tmp_path, name="a"), keys, rows, times, parts, [len(keys)]))
    b = flatten(run(new_core(tmp_path, name="b"), keys, rows, times, parts, [1, 7, 300, 64]))
    assert a == b
    assert sum(1 for x in a if x[4] == "open") >= 3


def test_reprocessing_gives_the_same_alert_ids(tmp_path, rng):
    keys, rows, times, parts = stream(rng)
    ids = []
    for name in ("x", "y"):
        res = run(new_core(tmp_path, name=name), keys, rows, times, parts, [128])
        ids.append([(a["alert_id"], a["event_id"], a["state"]) for _, r in res for a in r.alerts])
    assert ids[0] == ids[1] and ids[0]


def test_hop_scores_every_kth_event(tmp_path, rng):
    keys, rows, times, parts = stream(rng, n_entities=3, steps=100, spikes=())
    settings = DetectionSettings(hop=4, threshold=SETTINGS.threshold)
    res = run(new_core(tmp_path, settings), keys, rows, times, parts, [50])
    scored = [i for i, *_ in flatten(res)]
    per_entity = {}
    for i in scored:
        per_entity.setdefault(keys[i], []).append(keys[: i + 1].count(keys[i]))
    # each entity at every 4th of its events once its window (8) is full, at its own phase
    assert {k: counts[0] for k, counts in per_entity.items()} == {k: 8 + (hop_phase(k, 4) - 8) % 4 for k in per_entity}
    assert all(np.diff(counts).tolist() == [4] * (len(counts) - 1) and counts[-1] > 96 for counts in per_entity.values())
    assert len({hop_phase(k, 4) for k in per_entity}) > 1, "the test keys should not share one phase"


def test_row_alert_state_matches_a_per_row_walk(tmp_path, rng):
    # spikes on events that are scored: entity e's step t is its event t + 1, scored when that
    # count is congruent to its hop phase
    spikes = tuple((e, t + (hop_phase(f"dev-{e}", 3) - t - 1) % 3) for e, t in ((2, 100), (5, 200)))
    keys, rows, times, parts = stream(rng, spikes=spikes)
    settings = DetectionSettings(hop=3, threshold=SETTINGS.threshold, alerts=AlertParams(resolve_after=4))
    res = run(new_core(tmp_path, settings), keys, rows, times, parts, [50, 333], row_state=True)
    got = np.concatenate([r.open_after for _, r in res])
    state: dict[str, bool] = {}
    expected = []
    scored = {i: is_open for i, _, _, is_open, _ in flatten(res)}
    for i, k in enumerate(keys):
        if i in scored:
            state[k] = scored[i]
        expected.append(state.get(k, False))
    assert got.tolist() == expected and any(expected)


def test_state_moves_to_another_core(tmp_path, rng):
    keys, rows, times, parts = stream(rng, spikes=((0, 150), (5, 300)))
    whole = flatten(run(new_core(tmp_path, name="whole"), keys, rows, times, parts, [100]))
    first = new_core(tmp_path, name="first")
    cut = 160 * 6
    part1 = run(first, keys[:cut], rows[:cut], times[:cut], parts[:cut], [100])
    second = new_core(tmp_path, name="second")
    for p, k in first.entities():
        state = orjson.loads(orjson.dumps(first.state_of(p, k), option=orjson.OPT_SERIALIZE_NUMPY))
        second.restore(p, k, state)
    part2 = run(second, keys[cut:], rows[cut:], times[cut:], parts[cut:], [100])
    moved = flatten(part1) + [(i + cut, *rest) for i, *rest in flatten(part2)]
    assert moved == whole


def test_drop_partitions_forgets_their_entities(tmp_path, rng):
    keys, rows, times, parts = stream(rng, steps=20, spikes=())
    core = new_core(tmp_path)
    run(core, keys, rows, times, parts, [1000])
    assert core.drop_partitions([1]) == 3
    assert all(p == 0 for p, _ in core.entities())
    assert core.state_of(1, "dev-1") is None and core.state_of(0, "dev-0") is not None


def test_batches_larger_than_the_entity_cap_are_split(tmp_path, rng):
    keys, rows, times, parts = stream(rng, n_entities=6, steps=30, spikes=())
    capped = DetectionSettings(max_entities=6, threshold=SETTINGS.threshold)
    a = flatten(run(new_core(tmp_path, capped, name="capped"), keys, rows, times, parts, [len(keys)]))
    b = flatten(run(new_core(tmp_path, name="free"), keys, rows, times, parts, [len(keys)]))
    assert a == b


def test_refuses_mismatched_input_and_state(tmp_path, rng):
    core = new_core(tmp_path)
    with pytest.raises(ValueError, match="3 features per event; the model expects 4"):
        core.process(EventBatch.build(["a"], np.zeros((1, 3))))
    with pytest.raises(ValueError, match="saved for model"):
        core.restore(0, "a", {"version": 1, "model_version": "other", "window": {}, "threshold": None, "alert": None})
    with pytest.raises(ValueError, match="hop"):
        DetectorCore(core.bundle, core.scorer, DetectionSettings(hop=0))


def test_swap_model_renormalises_stored_windows(tmp_path, rng):
    """Hot reload to a bundle with another normaliser: the stored windows are re-expressed in the
    new normalisation, so scores after the swap equal those of a core that ran the new bundle all along."""
    keys, rows, times, parts = stream(rng, steps=60, spikes=((3, 45),))
    new = make_bundle(tmp_path, window=W, threshold=12.0, center=[9.0, 11.0, 10.0, 8.0], scale=[1.5, 3.0, 2.0, 0.5],
                      name="new", model_version="v-new")
    half = len(keys) // 2
    swapped = new_core(tmp_path, name="old")
    run(swapped, keys[:half], rows[:half], times[:half], parts[:half], [50])
    swapped.swap_model(new, Scorer(new, provider="cpu", intra_op_threads=1))
    reference = DetectorCore(new, Scorer(new, provider="cpu", intra_op_threads=1), SETTINGS, clock=lambda: 1_800_000_000.0)
    run(reference, keys[:half], rows[:half], times[:half], parts[:half], [50])
    tail = (keys[half:], rows[half:], times[half:], parts[half:])
    got = [x[1] for x in flatten(run(swapped, *tail, [50]))]
    want = [x[1] for x in flatten(run(reference, *tail, [50]))]
    assert len(got) == len(want) > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def calibrated_zeros_bundle(tmp_path, rng, training=None):
    """A bundle with a fitted calibration: the "zeros" model scores the mean square of the normalised
    newest row, calibrated on such scores of standard-normal rows (F features, window 2)."""
    from stream_detector.core.calibration import calibrate_scores

    normal = (rng.normal(size=(20_000, F)) ** 2).mean(axis=1)
    cal = calibrate_scores(normal, 0.999, np.arange(0, 20_000, 2000))
    return make_bundle(tmp_path, features=[f"f{i}" for i in range(F)], window=2, kind="zeros", name="cal",
                       calibration=cal, training=training)


def test_a_calibrated_run_opens_an_alert_that_no_single_score_would(tmp_path, rng):
    """A sustained moderate rise (scores about 3x their usual level, below the point threshold)
    opens an alert through the calibrated threshold's run test; the same stream with the run
    test unavailable (a point-only reference) opens none during the rise."""
    b = calibrated_zeros_bundle(tmp_path, rng)
    rows = rng.normal(size=(1500, F)).astype(np.float32)
    rows[1000:1100] *= np.float32(np.sqrt(3.0))  # scores x3 for 100 events
    batch = EventBatch.build(["e"] * 1500, rows, np.arange(1500, dtype=np.int64) * 1000)

    def opens(reference_without_run: bool):
        core = DetectorCore(b, Scorer(b, provider="cpu", intra_op_threads=1), DetectionSettings(), clock=lambda: 1.8e9)
        if reference_without_run:
            ref = core._reference
            core._reference = type(ref)(ref.point, None, 0, ref.anchor)
        res = core.process(batch)
        return [(int(res.index[j]), float(res.score[j]), float(res.threshold[j])) for j, ev in enumerate(res.alert_event) if ev == "open"]

    with_run = opens(False)
    assert core_method_is_calibrated(b)
    rise = [o for o in with_run if 1000 <= o[0] < 1100]
    assert rise and rise[0][1] < rise[0][2], with_run  # opened below the point threshold: by the run
    assert not [o for o in with_run if o[0] < 1000]  # nothing before the rise
    assert not [o for o in opens(True) if 1000 <= o[0] < 1100 and o[1] < o[2]]


@pytest.mark.parametrize("entities", [1, 3])
def test_the_bundles_training_entities_decide_whether_a_quiet_entitys_bar_may_sink(tmp_path, rng, entities):
    """single_entity_floor (the default) through the pipeline: the bundle's `training.entities`
    reaches the calibrated threshold. A quiet stream (scores a third of the calibration's) leaves a
    one-entity bundle's bar at its calibrated value and sinks a pooled bundle's to half of it."""
    b = calibrated_zeros_bundle(tmp_path, rng, training={"entities": entities})
    rows = (rng.normal(size=(3000, F)) / np.sqrt(3.0)).astype(np.float32)
    core = DetectorCore(b, Scorer(b, provider="cpu", intra_op_threads=1), DetectionSettings(), clock=lambda: 1.8e9)
    res = core.process(EventBatch.build(["e"] * 3000, rows, np.arange(3000, dtype=np.int64) * 1000))
    thr = np.asarray(res.threshold, dtype=np.float64)
    thr = thr[~np.isnan(thr)]
    assert thr[-1] / thr[0] == (pytest.approx(1.0) if entities == 1 else pytest.approx(0.5))


def test_each_entity_a_pooled_calibration_knows_starts_at_its_own_level_and_keeps_it_through_a_restore(tmp_path, rng):
    """A pooled bundle calibrated in each entity's own frame: through the pipeline, the entity key
    picks its level, so an entity at 4x the calibration's level starts at 4x its bar and one the
    calibration never saw starts at the bar itself; a state restored on another core keeps the level."""
    import dataclasses
    import math

    from stream_detector.core.calibration import calibrate_scores

    normal = (rng.normal(size=(20_000, F)) ** 2).mean(axis=1)
    cal = dataclasses.replace(calibrate_scores(normal, 0.999), entity_levels={"loud": math.log(4.0), "known": 0.0})
    b = make_bundle(tmp_path, features=[f"f{i}" for i in range(F)], window=2, kind="zeros", name="levels",
                    calibration=cal, training={"entities": 2})
    keys = ["loud", "known", "new"] * 3
    rows = (rng.normal(size=(len(keys), F)) * 0.1).astype(np.float32)
    core = DetectorCore(b, Scorer(b, provider="cpu", intra_op_threads=1), DetectionSettings(), clock=lambda: 1.8e9)
    res = core.process(EventBatch.build(keys, rows, np.repeat(np.arange(3, dtype=np.int64), 3) * 1000))
    first = {keys[i]: float(t) for i, t in zip(res.index.tolist(), res.threshold.tolist())}
    assert first["loud"] / first["known"] == pytest.approx(4.0) and first["new"] == pytest.approx(first["known"])
    other = DetectorCore(b, Scorer(b, provider="cpu", intra_op_threads=1), DetectionSettings(), clock=lambda: 1.8e9)
    other.restore(0, "loud", core.state_of(0, "loud"))
    again = other.process(EventBatch.build(["loud"], rows[:1], np.array([3000], dtype=np.int64)))
    assert float(again.threshold[0]) == pytest.approx(first["loud"])


def core_method_is_calibrated(bundle) -> bool:
    return DetectorCore(bundle, Scorer(bundle, provider="cpu", intra_op_threads=1), DetectionSettings()).threshold_method == "calibrated"


def test_an_alert_that_widens_its_bar_does_so_at_once_however_the_stream_is_batched(tmp_path, rng):
    """A calibrated bar that sits at its bound when an alert opens widens it (`rebaseline_per_alert`)
    before the entity's next score is judged, in the same batch or the next: a slow upward drift,
    fed whole and in small batches, gives the same scores, thresholds and alert events."""
    b = calibrated_zeros_bundle(tmp_path, rng)
    n = 6000
    rows = rng.normal(size=(n, F)).astype(np.float32) * np.exp(np.linspace(0.0, np.log(6.0), n))[:, None].astype(np.float32)
    keys, times, parts = ["e"] * n, np.arange(n, dtype=np.int64) * 1000, np.zeros(n, dtype=np.int32)
    settings = DetectionSettings(threshold=ThresholdParams(rebaseline_per_alert=True),
                                 alerts=AlertParams(resolve_after=20, cooldown=5))

    def replay(batch_sizes):
        core = DetectorCore(b, Scorer(b, provider="cpu", intra_op_threads=1), settings, clock=lambda: 1.8e9)
        res = run(core, keys, rows, times, parts, batch_sizes)
        return flatten(res), [(a["alert_id"], a["state"], a["threshold"]) for _, r in res for a in r.alerts]

    whole, whole_alerts = replay([n])
    assert sum(1 for a in whole_alerts if a[1] == "open") >= 3  # the drift re-baselines one alert at a time
    assert replay([1, 7, 64]) == (whole, whole_alerts)


@pytest.mark.parametrize("restart", [True, False])
def test_a_sensor_back_from_an_outage_at_another_level_is_not_judged_across_the_outage(tmp_path, rng, restart):
    """Training never windows across a time gap (training/windows.py, gap_factor); with the bundle's
    gap_factor the service restarts the window there too. A reading that returns from a 10-minute
    silence 3 sigma higher then reads as the entity's level, not as a jump from before the silence."""
    b = make_bundle(tmp_path, window=W, threshold=12.0, center=[10.0] * F, scale=[2.0] * F, name=f"gap{restart}",
                    training={"settings": {"gap_factor": 3.0}})
    assert b.gap_factor == 3.0
    settings = DetectionSettings(threshold=ThresholdParams(warmup=50, history=300), alerts=AlertParams(resolve_after=5),
                                 restart_after_gap=restart)
    core = DetectorCore(b, Scorer(b, provider="cpu", intra_op_threads=1), settings, clock=lambda: 1_800_000_000.0)
    n = 400
    rows = (rng.normal(size=(n, F)) * 2.0 + 10.0).astype(np.float32)
    rows[200:, 1] += 30.0  # back from the outage 15 sigma higher on one feature, and staying there
    times = 1_700_000_000_000 + np.arange(n, dtype=np.int64) * 1_000
    times[200:] += 600_000
    results = run(core, ["dev-0"] * n, rows, times, np.zeros(n, np.int32), [64])
    opens = [a for _, r in results for a in r.alerts if a["state"] == "open"]
    scored = sum(r.n_scored for _, r in results)
    if restart:
        assert opens == [] and core.store.gap_restarts == 1
        assert scored == n - 2 * (W - 1)  # W - 1 rows after the first event and after the gap
    else:
        assert len(opens) == 1 and opens[0]["source"]["offset"] == 200 and scored == n - (W - 1)


def test_a_bundle_without_a_gap_rule_has_no_gaps(tmp_path, rng):
    core = new_core(tmp_path)  # make_bundle's default training section records no gap_factor
    assert core.bundle.gap_factor is None and core.store.gap_factor is None
