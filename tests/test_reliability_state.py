"""State that moves with partitions, without Kafka: the changelog encoding round trip is bit-exact
and compact, an entity's scores after a move (state_of -> encode -> decode -> restore in another
core) equal its scores without the move, the tracker writes changed entities and tombstones for
evicted ones, and its fences skip exactly the events a restored state already holds."""

from __future__ import annotations

import time

import numpy as np
import orjson
import pytest

from bundle_factory import make_bundle
from stream_detector.service.changelog import ChangelogError, StateAssembler, StateTracker, decode_state, encode_state
from stream_detector.core.events import EventBatch
from stream_detector.core.pipeline import DetectionSettings, DetectorCore
from stream_detector.core.scorer import Scorer
from stream_detector.service.checkpoint import paced_quota
from stream_detector.offline.simulate import SimConfig, Simulator
from stream_detector.core.calibration import calibrate_scores
from stream_detector.core.thresholds import ThresholdParams

F, W, E, T = 6, 8, 12, 300


def _core(bundle, **kw):
    settings = DetectionSettings(threshold=ThresholdParams(warmup=50, history=200, quantile=0.99, multiplier=1.2), **kw)
    return DetectorCore(bundle, Scorer(bundle, provider="cpu"), settings)


def _batches(sim, parts=4, size=97):
    keys, times, rows = sim.frame()
    partition = np.array([int(k.split("-")[1]) % parts for k in keys])
    offsets = np.arange(len(keys))
    for i in range(0, len(keys), size):
        yield EventBatch.build(keys[i:i + size], rows[i:i + size], times[i:i + size], "obs", partition[i:i + size], offsets[i:i + size])


@pytest.fixture(params=["quantile", "calibrated"])
def setup(request, tmp_path, rng):
    """A simulated fleet and a bundle whose thresholds are of either method (the calibrated one keeps a
    history of learned log-scores and a run in its state)."""
    seed = int(rng.integers(1_000_000))
    sim = Simulator(SimConfig(entities=E, features=F, anomaly_rate=4.0, warmup=60, seed=seed), T)
    clean = Simulator(SimConfig(entities=E, features=F, seed=seed + 1), 200).frame()[2]
    bundle = make_bundle(tmp_path, sim.features, W, "mean", 3.0, center=clean.mean(0), scale=clean.std(0))
    if request.param == "calibrated":
        keys, times, rows = Simulator(SimConfig(entities=E, features=F, seed=seed + 2), 200).frame()
        normal = _core(bundle).process(EventBatch.build(keys, rows, times)).score
        bundle = make_bundle(tmp_path, sim.features, W, "mean", name="calibrated", center=clean.mean(0), scale=clean.std(0),
                             calibration=calibrate_scores(normal, 0.999))
        assert _core(bundle).threshold_method == "calibrated"
    return sim, bundle


def test_encoding_round_trip_is_exact_and_smaller_than_json(setup):
    sim, bundle = setup
    core = _core(bundle)
    for b in _batches(sim):
        core.process(b)
    sizes = []
    for p, key in core.entities():
        state = core.state_of(p, key)
        value = encode_state(state, {"obs": 123})
        back, applied = decode_state(value)
        assert applied == {"obs": 123}
        assert np.array_equal(back["window"]["rows"], state["window"]["rows"]) and back["window"]["rows"].dtype == np.float32
        hist = state["threshold"]["history"]
        assert back["threshold"]["history"].dtype == hist.dtype and np.array_equal(back["threshold"]["history"], hist)
        assert back["alert"] == state["alert"] and back["window"]["count"] == state["window"]["count"]
        sizes.append((len(value), len(orjson.dumps(state, option=orjson.OPT_SERIALIZE_NUMPY))))
    binary, json = np.mean(sizes, axis=0)
    print(f"[changelog record] W={W} F={F} history<=200: binary {binary:.0f} B vs orjson {json:.0f} B per entity")
    assert binary < 0.6 * json
    with pytest.raises(ChangelogError, match="starts with"):
        decode_state(b"XXXX" + b"\0" * 8)


def test_scores_after_a_move_equal_scores_without_it(setup):
    sim, bundle = setup
    batches = list(_batches(sim))
    half = len(batches) // 2
    whole = _core(bundle)
    first = _core(bundle)
    expected = [whole.process(b) for b in batches]
    for b in batches[:half]:
        first.process(b)
    moved = _core(bundle)  # another instance: state arrives only through the changelog encoding
    for p, key in first.entities():
        state, _ = decode_state(encode_state(first.state_of(p, key), {}))
        moved.restore(p, key, state)
    got = [moved.process(b) for b in batches[half:]]
    for e, g in zip(expected[half:], got):
        assert np.array_equal(e.index, g.index)
        assert np.array_equal(e.score, g.score) and np.array_equal(e.threshold, g.threshold)
        assert [a["event_id"] for a in e.alerts] == [a["event_id"] for a in g.alerts]
    assert sum(len(r.alerts) for r in got) > 0, "the second half should alert (anomalies are injected)"
    # a cold start (no move of state) would differ: windows refill and thresholds re-warm
    cold = _core(bundle)
    cold_scored = sum(cold.process(b).n_scored for b in batches[half:])
    assert cold_scored < sum(r.n_scored for r in got)


def _metas(recs):
    return [r for r in recs if "\x00" not in r.key]


def _compact(log_, recs):
    """Apply records to a compacted topic: the newest value per (partition, key) is kept."""
    for r in recs:
        log_[(r.partition, r.key)] = r.value


def _restore_all(log_, core, window):
    parts = {}
    for (p, key), value in log_.items():
        parts.setdefault(p, StateAssembler(window)).add(key, value)
    restored = 0
    for p, asm in parts.items():
        for key, state, _, why in asm.states():
            assert why is None, why
            core.restore(p, key, state)
            restored += 1
    return restored


def test_tracker_writes_changed_entities_and_tombstones_evicted(setup):
    sim, bundle = setup
    core = _core(bundle, max_entities=8)
    tracker = StateTracker(W, history=200)
    batches = list(_batches(sim))
    b = batches[0]
    tracker.note_batch(b)
    core.process(b)
    recs = tracker.snapshot(core, owned=range(4))
    assert {(r.partition, r.key) for r in _metas(recs)} == set(core.entities()) and all(r.value is not None for r in recs)
    assert tracker.snapshot(core, owned=range(4)) == [], "nothing changed, nothing written"
    later = EventBatch.build([f"other-{i}" for i in range(6)], np.zeros((6, F)), np.full(6, b.event_time_ms.max() + 1), "obs", 1, np.arange(6) + 10_000)
    evicted_before = {e for e in core.entities()}
    tracker.note_batch(later)
    core.process(later)  # cap 8: six new entities evict six least recently seen
    recs2 = tracker.snapshot(core, owned=range(4))
    tomb = {(r.partition, r.key) for r in _metas(recs2) if r.value is None}
    assert len(tomb) == 6 and not (tomb & set(core.entities()))
    # every key an evicted entity had is tombstoned, so compaction removes all of it
    log_ = {}
    _compact(log_, recs + recs2)
    gone = {k for (p, k), v in log_.items() if v is not None and k.split("\x00")[0] in {k for _, k in tomb}}
    assert not gone and tomb <= evicted_before
    last = {r.key: decode_state(r.value)[1] for r in _metas(recs2) if r.value is not None}
    assert last == {f"other-{i}": {"obs": 10_000 + i} for i in range(6)}


def test_incremental_changelog_restores_the_same_scores_and_writes_per_event(setup):
    """Several checkpoints of incremental records, compacted, read back in another core: the scores
    after the move equal those without it; bytes written per event are a fraction of whole states."""
    sim, bundle = setup
    batches = list(_batches(sim, size=31))
    half = len(batches) // 2
    whole, first = _core(bundle), _core(bundle)
    expected = [whole.process(b) for b in batches]
    tracker, log_ = StateTracker(W, history=200), {}
    written = whole_bytes = 0
    for i, b in enumerate(batches[:half]):
        tracker.note_batch(b)
        first.process(b)
        if True:  # a checkpoint after every batch: ~2.6 events per entity between checkpoints
            recs = tracker.snapshot(first, owned=range(4))
            written += sum(len(r.key) + len(r.value or b"") for r in recs)
            whole_bytes += sum(len(r.key) + len(encode_state(first.state_of(r.partition, r.key), {"obs": 0})) for r in _metas(recs))
            _compact(log_, recs)
    _compact(log_, tracker.snapshot(first, owned=range(4)))
    moved = _core(bundle)
    assert _restore_all(log_, moved, W) == len(first.entities())
    got = [moved.process(b) for b in batches[half:]]
    for e, g in zip(expected[half:], got):
        assert np.array_equal(e.index, g.index)
        assert np.array_equal(e.score, g.score) and np.array_equal(e.threshold, g.threshold)
        assert [a["event_id"] for a in e.alerts] == [a["event_id"] for a in g.alerts]
    events = sum(b.n for b in batches[:half])
    print(f"[changelog] incremental {written / events:.0f} B/event vs whole states {whole_bytes / events:.0f} B/event (W={W}, F={F})")
    assert written < 0.6 * whole_bytes


def test_a_checkpoint_written_in_slices_survives_a_crash_at_its_commit(setup):
    """At-least-once checkpoints are written in slices between batches (`begin`, then one entity
    per `write_some` here) while batches keep changing the entities. A crash right after such a
    checkpoint commits the offsets of its `begin`: the state read back plus the fenced re-processing
    from those offsets gives every event the score it had without the crash."""
    sim, bundle = setup
    batches = list(_batches(sim, size=31))
    whole, first = _core(bundle), _core(bundle)
    expected = {}
    for b in batches:
        r = whole.process(b)
        expected.update(zip(b.offset[r.index].tolist(), r.score.tolist()))
    tracker, log_ = StateTracker(W, history=200), {}
    emit = lambda r: _compact(log_, [r])  # noqa: E731
    begun_at = crash = None
    slices = 0
    for i, b in enumerate(batches):
        tracker.note_batch(b)
        first.process(b)
        if i == len(batches) // 3 and begun_at is None:
            begun_at = i
            tracker.begin(first, range(4), emit)
            assert tracker.writing > 1, "the test needs a checkpoint that takes several slices"
        elif begun_at is not None and tracker.writing:
            slices += 1
            if tracker.write_some(first, emit, budget_s=0.0):
                crash = i  # the checkpoint is complete here: its offsets get committed, then the crash
                break
    assert crash is not None and crash > begun_at + 1 and slices > 1
    done = batches[: begun_at + 1]
    committed = {p: int(max(b.offset[b.partition == p].max(initial=-1) for b in done)) + 1 for p in range(4)}
    moved, tracker2 = _core(bundle), StateTracker(W, history=200)
    parts = {}
    for (p, key), value in log_.items():
        parts.setdefault(p, StateAssembler(W)).add(key, value)
    for p, asm in parts.items():
        for key, state, applied, why in asm.states():
            assert why is None, why
            moved.restore(p, key, state)
            tracker2.restored(p, key, applied, {"obs": committed[p]}, state)
    compared = 0
    for b in batches[begun_at + 1:]:  # re-processing from the committed offsets
        fenced = tracker2.fence(b)
        r = moved.process(fenced)
        got = dict(zip(fenced.offset[r.index].tolist(), r.score.tolist()))
        kept = set(fenced.offset.tolist())
        assert got == {o: score for o, score in expected.items() if o in kept}
        compared += len(got)
    assert tracker2.skipped > 0 and compared > 100


def test_a_sliced_checkpoint_writes_at_most_the_entities_asked_for(setup):
    """`write_some(max_entities=n)` writes n changed entities (each: its parts, then its meta
    record), however much time budget is left; the pacing of the service relies on it."""
    sim, bundle = setup
    core, tracker = _core(bundle), StateTracker(W, history=200)
    for b in _batches(sim):
        tracker.note_batch(b)
        core.process(b)
    recs = []
    tracker.begin(core, range(4), recs.append)
    total = tracker.writing
    assert total == E
    metas = lambda: sum(1 for r in recs if "\x00" not in r.key)  # noqa: E731
    assert not tracker.write_some(core, recs.append, budget_s=None, max_entities=3)
    assert metas() == 3 and tracker.writing == total - 3
    assert not tracker.write_some(core, recs.append, budget_s=None, max_entities=0)
    assert metas() == 3
    assert tracker.write_some(core, recs.append, budget_s=None)
    assert metas() == E and tracker.writing == 0


def test_paced_quota_spreads_a_checkpoint_evenly_and_finishes_it_in_time():
    """The service writes a sliced checkpoint's entities evenly over the spread: at any moment about
    elapsed / spread of them are written, never more than are left, all of them once the spread is
    over (also when the loop was too busy to write earlier)."""
    entities, spread = 1000, 2.5
    left, written_at = entities, []
    for step in range(1, 60):  # a slice every 50 ms
        t = step * 0.05
        quota = paced_quota(entities, left, t, spread)
        assert 0 <= quota <= left
        left -= quota
        written_at.append((t, entities - left))
    assert left == 0
    for t, written in written_at:
        assert written == min(entities, -(-entities * t // spread))  # on schedule: ceil(entities * t / spread)
    assert paced_quota(entities, entities, 0.0, spread) == 0  # nothing yet at the moment it begins
    assert paced_quota(entities, entities, 0.001, spread) == 1  # then at least one
    assert paced_quota(entities, 700, 10.0, spread) == 700  # late (a busy loop): the rest at once
    assert paced_quota(entities, 700, 0.1, 0.0) == 700  # no spread: as fast as the time budget allows


def test_an_entity_that_came_back_after_eviction_is_written_whole(setup):
    """Evicted and seen again between two checkpoints: its count restarted, so its rows from the
    earlier life must not be mistaken for the new one's (the new window is written whole)."""
    sim, bundle = setup
    core = _core(bundle, max_entities=2)
    tracker, log_ = StateTracker(W, history=200), {}
    rng = np.random.default_rng(7)

    def feed(keys, t0):
        b = EventBatch.build(keys, rng.normal(size=(len(keys), F)), np.arange(len(keys)) + t0, "obs", 0, np.arange(len(keys)) + t0)
        tracker.note_batch(b)
        core.process(b)

    feed(["a"] * 20, 0)
    _compact(log_, tracker.snapshot(core, owned=[0]))
    feed(["b", "c"], 100)  # cap 2: "a" is evicted ...
    feed(["b", "c"] + ["a"] * 21, 200)  # ... and comes back with a count (21) above the written one (20)
    _compact(log_, tracker.snapshot(core, owned=[0]))
    moved = _core(bundle, max_entities=2)
    _restore_all(log_, moved, W)
    assert np.array_equal(moved.state_of(0, "a")["window"]["rows"], core.state_of(0, "a")["window"]["rows"])


def test_a_partly_written_entity_is_reported_not_restored_wrong(setup):
    sim, bundle = setup
    core = _core(bundle)
    tracker, log_ = StateTracker(W, history=200), {}
    batches = list(_batches(sim))
    for b in batches[:3]:
        tracker.note_batch(b)
        core.process(b)
    _compact(log_, tracker.snapshot(core, owned=range(4)))
    tracker.note_batch(batches[3])
    core.process(batches[3])
    recs = tracker.snapshot(core, owned=range(4))
    meta_at = next(i for i, r in enumerate(recs) if "\x00" not in r.key)
    victim = recs[meta_at].key
    # killed in the middle: the victim's meta arrives with only some of its rows
    _compact(log_, [r for i, r in enumerate(recs) if i == meta_at or (r.key.startswith(victim + "\x00w") and i % 2)])
    asm = StateAssembler(W)
    for (p, key), value in log_.items():
        if p == recs[meta_at].partition:
            asm.add(key, value)
    why = {k: w for k, _, _, w in asm.states()}
    assert why[victim] is not None and "row" in why[victim]


def test_fences_skip_exactly_what_restored_state_holds():
    tracker = StateTracker(W)
    tracker.restored(0, "a", {"obs": 105}, committed={"obs": 100})  # state ahead of the commit: fence
    tracker.restored(0, "b", {"obs": 90}, committed={"obs": 100})  # behind the commit: nothing to skip
    keys = ["a", "b", "a", "a", "b"]
    offs = [101, 102, 105, 107, 108]
    batch = EventBatch.build(keys, np.zeros((5, 2)), None, "obs", 0, offs)
    out = tracker.fence(batch)
    assert list(zip(out.keys, out.offset.tolist())) == [("b", 102), ("a", 107), ("b", 108)]
    assert tracker.skipped == 2
    again = tracker.fence(EventBatch.build(["a"], np.zeros((1, 2)), None, "obs", 0, [108]))
    assert again.n == 1, "a fence is gone once the entity moved past it"


def test_exactly_once_without_changelog_is_refused_in_one_sentence():
    from stream_detector.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="exactly_once needs the state changelog"):
        load_settings(None, {"processing": {"guarantee": "exactly_once", "changelog": False}})
    s = load_settings(None, {"kafka": {"group_id": "g"}, "processing": {"instance_id": "a"}})
    assert s.processing.transactional_id_for("g") == "g-a" and s.processing.changelog_topic_for("g") == "g-changelog"


@pytest.mark.kafka
def test_changelog_topic_created_checked_and_refused(kafka_bootstrap, make_topic, tmp_path):
    import subprocess
    import sys
    import uuid

    from confluent_kafka.admin import AdminClient, ConfigResource

    from stream_detector.service.changelog import ensure_changelog_topic
    from stream_detector.config import load_settings

    def settings(topic):
        return load_settings(None, {"kafka": {"bootstrap_servers": kafka_bootstrap, "group_id": f"g-{uuid.uuid4().hex[:8]}"},
                                    "processing": {"changelog_topic": topic}})

    fresh = f"state-{uuid.uuid4().hex[:10]}"
    assert ensure_changelog_topic(settings(fresh), 3) == fresh
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    deadline = time.monotonic() + 30  # the broker that created it may answer metadata before it knows the topic
    while (meta := admin.list_topics(timeout=10).topics.get(fresh)) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert meta is not None, f"{fresh} was created but never listed"
    res = ConfigResource(ConfigResource.Type.TOPIC, fresh)
    assert len(meta.partitions) == 3 and admin.describe_configs([res])[res].result(10)["cleanup.policy"].value == "compact"
    admin.delete_topics([fresh])
    small = make_topic(partitions=1, config={"cleanup.policy": "compact"})
    with pytest.raises(ChangelogError, match="has 1 partitions, but the input has 3"):
        ensure_changelog_topic(settings(small), 3)
    plain = make_topic(partitions=3)
    with pytest.raises(ChangelogError, match="must be compacted"):
        ensure_changelog_topic(settings(plain), 3)
    # the CLI: one sentence, exit 2, before consuming
    topic, alerts, dlq = make_topic(partitions=3), make_topic(), make_topic()
    bundle = make_bundle(tmp_path, ["a", "b"], 4, "mean", 1.0)
    r = subprocess.run([sys.executable, "-m", "stream_detector.cli", "run", "--kafka.bootstrap-servers", kafka_bootstrap, "--kafka.topics", topic,
                        "--kafka.alerts-topic", alerts, "--kafka.dlq-topic", dlq, "--model.bundle", str(bundle.path), "--model.provider", "cpu",
                        "--processing.changelog-topic", plain], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "must be compacted" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_restored_entity_rewrites_its_alert_record_when_it_changes(setup):
    """The changelog holds an open alert for an entity; another member restores it, the alert ends
    (state None): the next checkpoint must say so, or a later restore would reopen the old alert."""
    sim, bundle = setup
    tracker, log_ = StateTracker(W, history=200), {}
    core = _core(bundle)
    b = list(_batches(sim))[0]
    tracker.note_batch(b)
    core.process(b)
    _compact(log_, tracker.snapshot(core, owned=range(4)))
    p, key = core.entities()[0]
    log_[(p, key + "\x00a")] = orjson.dumps({"stale": "open alert"})  # as an earlier owner left it
    moved, tracker2 = _core(bundle), StateTracker(W, history=200)
    asm = StateAssembler(W)
    for (q, k), v in log_.items():
        if q == p and k.split("\x00")[0] == key:
            asm.add(k, v)
    (_, state, applied, _), = [x for x in asm.states() if x[0] == key]
    assert state["alert"] == {"stale": "open alert"}
    state["alert"] = None  # install without it (the alert ended), as if processed further
    moved.restore(p, key, state)
    tracker2.restored(p, key, applied, {"obs": 0}, state)
    tracker2.note_batch(EventBatch.build([key], np.zeros((1, F)), None, "obs", p, [10**6]))  # marked changed
    recs = {r.key: r.value for r in tracker2.snapshot(moved, owned=[p])}
    assert recs[key + "\x00a"] == b"null"
    _compact(log_, [r for r in tracker2.snapshot(moved, owned=[p])])
    log_.update({(p, k): v for k, v in recs.items()})
    again = StateAssembler(W)
    for (q, k), v in log_.items():
        if q == p and k.split("\x00")[0] == key:
            again.add(k, v)
    assert [x[1]["alert"] for x in again.states() if x[0] == key] == [None]



def test_a_stalled_loop_ends_the_process_in_one_sentence():
    """A main loop that stops ticking (librdkafka can block in a call far past its timeout after a
    broker outage) exits 1 with one sentence, so the supervisor restarts it from committed offsets."""
    import subprocess
    import sys
    import time

    code = (
        "import threading\n"
        "from stream_detector.service.health import Health\n"
        "from stream_detector.service.loop import Detector\n"
        "d = Detector.__new__(Detector)\n"
        "d.health, d._stop = Health(), threading.Event()\n"
        "d.health.tick()\n"
        "d._stall_guard(0.5, threading.Event())\n"
        "print('not reached')\n"
    )
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and time.monotonic() - t0 < 20
    assert "not reached" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run: the main loop has not ticked for"), r.stderr
    # a loop that keeps ticking, or one told to stop, is left alone
    code_ok = (
        "import threading, time\n"
        "from stream_detector.service.health import Health\n"
        "from stream_detector.service.loop import Detector\n"
        "d = Detector.__new__(Detector)\n"
        "d.health, d._stop = Health(), threading.Event()\n"
        "done = threading.Event()\n"
        "g = threading.Thread(target=d._stall_guard, args=(0.5, done)); g.start()\n"
        "for _ in range(30):\n"
        "    d.health.tick(); time.sleep(0.1)\n"
        "done.set(); g.join(5)\n"
        "assert not g.is_alive()\n"
        "time.sleep(2)\n"
        "print('alive')\n"
    )
    r = subprocess.run([sys.executable, "-c", code_ok], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "alive", r.stderr
