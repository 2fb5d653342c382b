"""Atomic model hot reload: triggers (SIGHUP, watched path), verification and refusals that keep
the old model, and a reload in the middle of a stream of batches that loses no event and switches
`model_version` exactly at a batch boundary."""

from __future__ import annotations

import os
import shutil
import signal
import time

import numpy as np
import pytest

from bundle_factory import make_bundle
from stream_detector.core.alerts import AlertParams
from stream_detector.core.bundle import MODEL_FILE
from stream_detector.core.events import EventBatch
from stream_detector.core.pipeline import DetectionSettings, DetectorCore
from stream_detector.service.reload import LoadedModel, ModelReloader, ReloadError, check_compatible
from stream_detector.core.scorer import Scorer
from stream_detector.core.thresholds import ThresholdParams

F, W = 4, 8
FEATURES = ["a", "b", "c", "d"]


def build_scorer(bundle):
    return Scorer(bundle, provider="cpu", intra_op_threads=1)


def wait_for(reloader: ModelReloader, timeout: float = 20.0) -> LoadedModel | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = reloader.poll()
        if got is not None:
            return got
        if not reloader.busy and not reloader._requested.is_set():
            reloader.wait()
            return reloader.poll()
        time.sleep(0.02)
    raise AssertionError("the reload did not finish in time")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# ---- compatibility ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "features, window, message",
    [
        (["a", "b", "c", "e"], W, r"adds \['e'\], removes \['d'\].*needs a restart"),
        (["a", "b", "c", "d", "e"], W, r"adds \['e'\] compared with model"),
        (["b", "a", "c", "d"], W, "same features in another order"),
        (FEATURES, W * 2, f"window {W * 2} but model .* has {W}"),
    ],
)
def test_incompatible_bundles_are_refused_with_a_reason(tmp_path, features, window, message):
    old = make_bundle(tmp_path, FEATURES, W, name="old")
    new = make_bundle(tmp_path, features, window, name="new")
    with pytest.raises(ReloadError, match=message):
        check_compatible(old, new)


# ---- triggers and failures ------------------------------------------------------------------
def test_sighup_loads_verifies_and_hands_over_once(tmp_path, caplog):
    old = make_bundle(tmp_path, FEATURES, W, model_version="v1", name="live")
    results = []
    r = ModelReloader(old.path, old, build_scorer, watch=False, on_result=lambda ok, d: results.append((ok, d)))
    previous = r.install_sighup()
    try:
        make_bundle(tmp_path, FEATURES, W, kind="zeros", model_version="v2", name="live")  # replaced in place
        os.kill(os.getpid(), signal.SIGHUP)
        with caplog.at_level("INFO", logger="stream_detector.service.reload"):
            got = wait_for(r)
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert got is not None and got.bundle.model_version == "v2" and got.scorer.bundle is got.bundle
    assert r.current.model_version == "v2"
    assert r.poll() is None  # handed over once
    assert results == [(True, "v2")]
    assert "SIGHUP" in caplog.text


def test_unchanged_bundle_is_a_no_op(tmp_path):
    old = make_bundle(tmp_path, FEATURES, W, model_version="v1")
    r = ModelReloader(old.path, old, build_scorer, watch=False)
    r.request()
    assert wait_for(r) is None and r.last_error is None


def test_tampered_model_keeps_the_old_one_and_says_why(tmp_path, caplog):
    old = make_bundle(tmp_path, FEATURES, W, model_version="v1", name="live")
    results = []
    r = ModelReloader(old.path, old, build_scorer, watch=False, on_result=lambda ok, d: results.append((ok, d)))
    new = make_bundle(tmp_path, FEATURES, W, kind="zeros", model_version="v2", name="live")
    with open(new.model_path, "ab") as f:  # the sha256 in bundle.json no longer matches
        f.write(b"\0")
    r.request()
    with caplog.at_level("ERROR", logger="stream_detector.service.reload"):
        assert wait_for(r) is None
    assert r.current.model_version == "v1"
    assert "does not match the sha256" in r.last_error
    assert "failed, keeping model v1" in caplog.text
    assert results and results[0][0] is False


def test_incompatible_bundle_keeps_the_old_one(tmp_path):
    old = make_bundle(tmp_path, FEATURES, W, model_version="v1", name="live")
    r = ModelReloader(old.path, old, build_scorer, watch=False)
    make_bundle(tmp_path, FEATURES, W + 1, model_version="v2", name="live")
    r.request()
    assert wait_for(r) is None
    assert "window length needs a restart" in r.last_error and r.current.model_version == "v1"


def test_a_scorer_that_cannot_be_built_keeps_the_old_one(tmp_path):
    old = make_bundle(tmp_path, FEATURES, W, model_version="v1", name="live")

    def refuse(bundle):
        raise RuntimeError("the CUDA execution provider was required but is not active.")

    r = ModelReloader(old.path, old, refuse, watch=False)
    make_bundle(tmp_path, FEATURES, W, kind="zeros", model_version="v2", name="live")
    r.request()
    assert wait_for(r) is None and "CUDA" in r.last_error


def test_a_model_that_scores_nan_keeps_the_old_one(tmp_path):
    old = make_bundle(tmp_path, FEATURES, W, model_version="v1", name="live")
    r = ModelReloader(old.path, old, build_scorer, watch=False)
    make_bundle(tmp_path, FEATURES, W, kind="nan", model_version="v2", name="live")
    r.request()
    assert wait_for(r) is None and r.current.model_version == "v1"
    assert "model v2 produced NaN or infinite scores" in r.last_error


def test_watched_symlink_repointed_is_loaded_after_it_holds_still(tmp_path):
    v1 = make_bundle(tmp_path, FEATURES, W, model_version="v1", name="v1")
    make_bundle(tmp_path, FEATURES, W, kind="zeros", model_version="v2", name="v2")
    current = tmp_path / "current"
    current.symlink_to("v1")
    clock = Clock()
    r = ModelReloader(current, v1, build_scorer, watch=True, watch_interval_s=1.0, clock=clock)
    clock.t = 1.0
    assert r.poll() is None and not r.busy  # nothing changed
    tmp_link = tmp_path / "current.tmp"
    tmp_link.symlink_to("v2")
    os.replace(tmp_link, current)  # the atomic way to roll out a new version directory
    clock.t = 2.0
    assert r.poll() is None and not r.busy  # first sight of the change: wait one more interval
    clock.t = 2.5
    assert r.poll() is None and not r.busy  # watch interval not over yet
    clock.t = 3.0
    got = wait_for(r)
    assert got is not None and got.bundle.model_version == "v2"
    clock.t = 10.0
    assert r.poll() is None and not r.busy  # the same target is not loaded twice


def test_watched_directory_mid_copy_is_not_loaded(tmp_path):
    v1 = make_bundle(tmp_path, FEATURES, W, model_version="v1", name="live")
    clock = Clock()
    r = ModelReloader(v1.path, v1, build_scorer, watch=True, watch_interval_s=1.0, clock=clock)
    (v1.path / MODEL_FILE).unlink()  # an operator's copy in progress: the model is missing for a while
    for t in (1.0, 2.0, 3.0):
        clock.t = t
        assert r.poll() is None and not r.busy
    shutil.rmtree(v1.path)
    make_bundle(tmp_path, FEATURES, W, kind="zeros", model_version="v2", name="live")
    clock.t = 4.0
    assert r.poll() is None and not r.busy
    clock.t = 5.0
    got = wait_for(r)
    assert got is not None and got.bundle.model_version == "v2"


# ---- under load --------------------------------------------------------------------------------
def test_reload_under_load_loses_no_event_and_switches_between_batches(tmp_path, rng):
    """A loop feeds batches to a DetectorCore and polls the reloader before each one, as the service
    does. Mid-stream the bundle is replaced and a reload requested; the new model loads on its
    thread while batches keep flowing. Every event is processed exactly once, the scored count is
    what the window length allows, and alerts switch from v1 to v2 at one batch boundary."""
    settings = DetectionSettings(threshold=ThresholdParams(warmup=20, history=200), alerts=AlertParams(resolve_after=3, cooldown=0))
    v1 = make_bundle(tmp_path, FEATURES, W, threshold=2.0, model_version="v1", name="live")
    core = DetectorCore(v1, build_scorer(v1), settings, clock=lambda: 1_800_000_000.0)
    r = ModelReloader(v1.path, v1, build_scorer, watch=False)

    n_entities, steps, batch_size = 10, 300, 40
    rows = rng.normal(size=(steps, n_entities, F)).astype(np.float32)
    spike_steps = np.arange(30, steps, 25)
    rows[spike_steps, :, 0] += 25.0  # every entity spikes every 25 steps: alerts before and after the switch
    keys = [f"e{e}" for _ in range(steps) for e in range(n_entities)]
    flat = rows.reshape(-1, F)
    n = flat.shape[0]
    swap_at_batch = None
    versions_per_batch: list[set[str]] = []
    processed = scored = 0
    for b, start in enumerate(range(0, n, batch_size)):
        got = r.poll()
        if got is not None:
            core.swap_model(got.bundle, got.scorer)
            swap_at_batch = b
        if b == 15:  # the operator rolls out v2 while events keep coming
            make_bundle(tmp_path, FEATURES, W, threshold=2.0, kind="zeros", model_version="v2", name="live")
            r.request("SIGHUP")
        stop = min(n, start + batch_size)
        res = core.process(EventBatch.build(keys[start:stop], flat[start:stop], topic="t", partition=0, offset=np.arange(start, stop)))
        processed += res.n_events
        scored += res.n_scored
        versions_per_batch.append({a["model_version"] for a in res.alerts})
    r.wait()
    assert swap_at_batch is not None and swap_at_batch > 15, "the reload never reached the loop"
    assert processed == n
    assert scored == n_entities * (steps - W + 1)  # every event with a full window, no gap at the swap
    assert all(len(v) <= 1 for v in versions_per_batch)
    before = set().union(*versions_per_batch[:swap_at_batch])
    after = set().union(*versions_per_batch[swap_at_batch:])
    assert before == {"v1"} and after == {"v2"}
    assert core.bundle.model_version == "v2" and core.scorer.bundle.model_version == "v2"


# ---- the real service against the real broker ------------------------------------------------
@pytest.mark.kafka
def test_service_reload_under_load_loses_nothing(tmp_path, kafka_bootstrap, make_topic, rng):
    """Detector.run consumes while a producer keeps sending; mid-stream the bundle is replaced and
    a reload requested (what SIGHUP does). Every event is consumed and scored once, offsets reach
    the end of every partition, and per partition the alerts switch from v1 to v2 exactly once."""
    import json
    import threading
    import uuid

    from confluent_kafka import Consumer, Producer, TopicPartition

    from stream_detector.config import load_settings
    from stream_detector.service.loop import Detector

    topic, alerts_topic, dlq = make_topic(partitions=2), make_topic(partitions=1), make_topic()
    n_entities, steps = 12, 240
    n = n_entities * steps
    make_bundle(tmp_path, FEATURES, W, threshold=2.0, model_version="v1", name="live")
    settings = load_settings(overrides={
        "kafka": {"bootstrap_servers": kafka_bootstrap, "group_id": f"g-{uuid.uuid4().hex[:8]}", "topics": [topic],
                  "alerts_topic": alerts_topic, "dlq_topic": dlq},
        "model": {"bundle": str(tmp_path / "live"), "provider": "cpu", "watch": False},
        "detection": {"warmup": 20, "history": 200, "resolve_after": 3, "cooldown": 0},
        "runtime": {"max_batch": 40, "max_wait_ms": 20, "commit_interval_s": 0.2},
    })
    detector = Detector(settings)
    rows = rng.normal(size=(steps, n_entities, F))
    rows[np.arange(20, steps, 20), :, 0] += 25.0  # every entity spikes every 20 steps
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "linger.ms": 2})
    # The last third of the input comes only once the new model is in: every partition then has
    # events after the swap, however the consumer's fetches fell between the partitions before it
    # (a slow group join leaves a backlog, read a partition at a time).
    swapped = threading.Event()

    def produce() -> None:
        for t in range(steps):
            if t == 2 * steps // 3:
                producer.flush(30)
                swapped.wait(60)
            for e in range(n_entities):
                producer.produce(topic, key=f"e{e}", value=json.dumps(dict(zip(FEATURES, rows[t, e].tolist()))).encode())
            producer.poll(0)
            time.sleep(0.01)  # ~2.5 s of steady input
        producer.flush(30)

    feeder = threading.Thread(target=produce)
    feeder.start()
    runner_result = {}
    runner = threading.Thread(target=lambda: runner_result.update(stats=detector.run(max_messages=n, timeout=90)))
    runner.start()
    # the swap comes once both partitions have raised alerts with the first model
    watcher = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"w-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest"})
    watcher.subscribe([alerts_topic])
    seen: set[int] = set()
    deadline = time.monotonic() + 60
    while seen != {0, 1} and time.monotonic() < deadline:
        seen |= {json.loads(m.value())["source"]["partition"] for m in watcher.consume(100, 0.2) if m.error() is None}
    watcher.close()
    assert seen == {0, 1}, f"alerts of the first model came from partitions {seen} only"
    make_bundle(tmp_path, FEATURES, W, threshold=2.0, kind="zeros", model_version="v2", name="live")
    detector.reloader.request("SIGHUP")
    deadline = time.monotonic() + 60
    while detector.bundle.model_version != "v2" and time.monotonic() < deadline:
        time.sleep(0.01)
    swapped.set()
    feeder.join()
    runner.join(120)
    stats = runner_result["stats"]
    assert stats.consumed == n and stats.dead_letters == 0, stats
    assert stats.scored == n_entities * (steps - W + 1), stats  # each event with a full window, once
    assert detector.bundle.model_version == "v2"
    assert detector.metrics.registry.get_sample_value("stream_detector_model_reloads_total", {"result": "ok"}) == 1

    check = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": settings.kafka.group_id})
    committed = check.committed([TopicPartition(topic, p) for p in range(2)], timeout=10)
    assert sum(tp.offset for tp in committed) == n, (committed, stats)
    check.close()
    reader = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"r-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest"})
    reader.subscribe([alerts_topic])
    alerts, idle = [], 0
    while idle < 3:
        got = [m for m in reader.consume(500, 1.0) if m.error() is None]
        alerts += [json.loads(m.value()) for m in got]
        idle = 0 if got else idle + 1
    reader.close()
    assert {a["model_version"] for a in alerts} == {"v1", "v2"}
    for p in range(2):
        seq = [a["model_version"] for a in sorted(alerts, key=lambda a: a["source"]["offset"]) if a["source"]["partition"] == p]
        switch = seq.index("v2")
        assert set(seq[:switch]) == {"v1"} and set(seq[switch:]) == {"v2"}, seq
