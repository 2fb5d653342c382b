"""`stream-detector-train retrain` through the real broker (issue 19, part 4): a candidate fit on the
topic's recent span with the live bundle's recipe is promoted when it pages better than a live model
trained before the fleet changed (MODELS/current re-pointed atomically, and the service's watch loads
it); a candidate trained on corrupted data is refused and the live model stays; a candidate with other
features, no live model, an unreachable broker: one sentence, exit 2, nothing promoted."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from stream_detector.core.bundle import load_bundle

pytestmark = pytest.mark.kafka

FEATURES = ("cpu", "mem", "disk")
ENTITIES, TICKS = 3, 1200
START_MS = 1_767_225_600_000  # 2026-01-01T00:00Z, one row a minute
STEP_MS = 60_000
CHANGE = 400  # the fleet's level moves at this tick (a new software version, say)
INCIDENT = (1100, 1106)  # machine m-1, in the held-out span [1000, 1200)
NOW = "2026-01-01T20:00:00Z"  # tick 1200
TINY = ["--window", "16", "--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--ff-dim", "32", "--epochs", "3",
        "--threads", "1", "--seed", "3", "--no-progress"]


def fleet(seed: int, shift: float = 8.0, corrupt: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    base = {e: rng.normal(size=len(FEATURES)) * 3 + 50 for e in range(ENTITIES)}
    out = []
    for i in range(TICKS):
        for e in range(ENTITIES):
            v = base[e] + 5 * np.sin(2 * np.pi * i / 96 + e) + rng.normal(size=len(FEATURES))
            if i >= CHANGE:
                v = v + shift
            if e == 1 and INCIDENT[0] <= i < INCIDENT[1]:
                v = v + 25.0
            if corrupt and CHANGE <= i < 1000:
                # a collector that sent one reading, barely moving, for weeks (an exact constant is
                # refused by fit itself: training/sizing.py)
                v = base[e] + shift + rng.normal(size=len(FEATURES)) * 1e-3
            row = {"key": f"m-{e}", "ts": START_MS + i * STEP_MS}
            row.update({f: float(np.float32(x)) for f, x in zip(FEATURES, v)})
            out.append(row)
    return out


def make_topic(bootstrap: str, recs: list[dict]) -> str:
    topic = f"retrain-{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    keep = {"retention.ms": "-1"}  # event times of 2026-01-01: the test broker's 24 h retention would delete them
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1, config=keep)])[topic].result(timeout=30)
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for r in recs:
        p.produce(topic, key=r["key"].encode(), value=orjson.dumps(r), timestamp=r["ts"])
    assert p.flush(30) == 0
    return topic


def fit_file(tmp: Path, recs: list[dict], name: str) -> Path:
    data = tmp / f"{name}.jsonl"
    data.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    done = subprocess.run([sys.executable, "-m", "training.cli", "fit", *TINY, "--data", str(data), "--out", str(tmp / name)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return tmp / name


def retrain(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "training.cli", "retrain", *argv], capture_output=True, text=True,
                          timeout=600)


def labels_file(path: Path) -> Path:
    start = START_MS + INCIDENT[0] * STEP_MS
    path.write_bytes(orjson.dumps({"entity": "m-1", "start_ms": start, "end_ms": START_MS + INCIDENT[1] * STEP_MS}) + b"\n")
    return path


@pytest.fixture(scope="module")
def setup(kafka_bootstrap, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrain")
    recs = fleet(seed=11)
    topic = make_topic(kafka_bootstrap, recs)
    models = tmp / "models"
    models.mkdir()
    live = fit_file(tmp, [r for r in recs if r["ts"] < START_MS + CHANGE * STEP_MS], "before-the-change")
    version = load_bundle(live).model_version
    os.rename(live, models / version)
    os.symlink(version, models / "current")
    toml = tmp / "run.toml"
    toml.write_text(f'[kafka]\nbootstrap_servers = "{kafka_bootstrap}"\ntopics = ["{topic}"]\n'
                    '[input]\ntimestamp_field = "ts"\n[detection]\nwarmup = 50\n')
    return {"tmp": tmp, "recs": recs, "topic": topic, "models": models, "toml": toml, "first": version}


def test_a_better_candidate_is_promoted_and_the_watch_loads_it_then_a_corrupted_one_is_refused(setup):
    from stream_detector.core.scorer import Scorer
    from stream_detector.service.reload import ModelReloader

    models, toml, tmp = setup["models"], setup["toml"], setup["tmp"]
    live = load_bundle(models / "current")
    reloader = ModelReloader(models / "current", live, lambda b: Scorer(b, provider="cpu", intra_op_threads=1),
                             watch=True, watch_interval_s=0.2)
    labels = labels_file(tmp / "incidents.jsonl")
    done = retrain("--config", str(toml), "--models", str(models), "--now", NOW, "--train", "10h", "--holdout", "200m",
                   "--labels", str(labels))
    assert done.returncode == 0, done.stdout + done.stderr
    print(done.stdout)  # the two backtests and the decision (docs/operations.md quotes them)
    report = orjson.loads((models / "retrain-report.json").read_bytes())
    assert report["decision"] == "promoted", report
    assert report["spans"] == {"train": ["2026-01-01T06:40:00.000Z", "2026-01-01T16:40:00.000Z"],
                               "holdout": ["2026-01-01T16:40:00.000Z", "2026-01-01T20:00:00.000Z"]}
    cand, old = report["candidate"], report["live"]
    assert cand["caught"] == 1 and cand["false_opens"] <= old["false_opens"], report
    promoted = os.readlink(models / "current")
    assert promoted != setup["first"] and load_bundle(models / "current").model_version == cand["model_version"]
    assert (models / setup["first"]).is_dir(), "the old version stays, for a rollback"
    recipe = load_bundle(models / "current").training["settings"]
    assert recipe["window"] == 16 and recipe["d_model"] == 16 and recipe["kafka_topic"] == setup["topic"]

    # The running service's watch: the re-pointed link is loaded (after holding still for a poll), no restart.
    deadline, got = time.monotonic() + 30, None
    while time.monotonic() < deadline and got is None:
        got = reloader.poll()
        time.sleep(0.25)
    assert got is not None and got.bundle.model_version == cand["model_version"]

    corrupted = fit_file(tmp, [r for r in fleet(seed=11, corrupt=True) if START_MS + CHANGE * STEP_MS <= r["ts"]
                               < START_MS + 1000 * STEP_MS], "corrupted")
    refused = retrain("--config", str(toml), "--models", str(models), "--now", NOW, "--holdout", "200m",
                      "--labels", str(labels), "--candidate", str(corrupted))
    assert refused.returncode == 3, refused.stdout + refused.stderr
    print(refused.stdout)
    assert "refused" in refused.stdout and os.readlink(models / "current") == promoted
    assert orjson.loads((models / "retrain-report.json").read_bytes())["decision"] == "refused"


def test_bad_input_is_one_sentence_exit_2_and_the_live_model_stays(setup, tmp_path, kafka_bootstrap):
    models, toml = setup["models"], setup["toml"]
    before = os.readlink(models / "current")
    other = fit_file(tmp_path, [{**{k: v for k, v in r.items() if k != "disk"}} for r in setup["recs"][:1500]], "two-features")
    unreachable = tmp_path / "unreachable.toml"
    unreachable.write_text(toml.read_text().replace(kafka_bootstrap, "127.0.0.1:1").replace("[kafka]\n", "[kafka]\ntimeout_s = 2\n"))
    empty = tmp_path / "no-models"
    empty.mkdir()
    cases = [
        (["--config", str(toml), "--models", str(models), "--now", NOW, "--candidate", str(other)], "other features"),
        (["--config", str(toml), "--models", str(empty), "--now", NOW], "is not a symlink"),
        (["--config", str(unreachable), "--models", str(models), "--now", NOW, "--candidate", str(other.parent / "two-features")],
         "other features"),
        (["--config", str(unreachable), "--models", str(models), "--now", NOW, "--holdout", "200m"], "cannot reach the Kafka broker"),
        (["--config", str(toml), "--models", str(models), "--now", NOW, "--holdout", "soon"], "not a duration"),
    ]
    for argv, fragment in cases:
        done = retrain(*argv)
        err = done.stderr.strip().splitlines()
        assert done.returncode == 2, (argv, done.stdout, done.stderr)
        assert err and err[-1].startswith("error: ") and fragment in err[-1] and "Traceback" not in done.stderr, (argv, err)
        assert os.readlink(models / "current") == before and not (models / ".retrain").exists()


def test_a_promotion_reaches_the_running_service_without_a_restart_or_a_lost_or_repeated_alert(kafka_bootstrap, make_topic,
                                                                                                tmp_path):
    """The service runs on MODELS/current; retrain promotes a candidate (here one made elsewhere, gated
    with --candidate) in the middle of the stream; the watch loads it, alerts after the swap carry its
    version, every event is consumed once and no alert id repeats."""
    import threading
    import uuid as _uuid

    from stream_detector.config import load_settings
    from stream_detector.offline.simulate import SimConfig, Simulator
    from stream_detector.service.loop import Detector
    from test_service_kafka import DETECTION, F, W, _bundle, _produce, read_to_end

    sim = Simulator(SimConfig(entities=10, features=F, anomaly_rate=3.0, warmup=100, seed=5), 600)
    models = tmp_path / "models"
    models.mkdir()
    live = _bundle(tmp_path, sim.features)
    os.rename(live.path, models / "v1")
    os.symlink("v1", models / "current")
    from bundle_factory import make_bundle

    candidate = make_bundle(tmp_path, sim.features, W, "mean", live.calibration.threshold, name="v2",
                            center=live.normaliser.center, scale=live.normaliser.scale, model_version="v2")
    keep = {"retention.ms": "-1"}  # simulated event times of 2023
    topic = make_topic(partitions=2, prefix="obs", config=keep)
    alerts, dlq = make_topic(prefix="alerts"), make_topic(prefix="dlq")
    events = [(k.encode(), v) for k, _, v in sim.events()]
    half = len(events) // 2
    settings = load_settings(None, {
        "kafka": {"bootstrap_servers": kafka_bootstrap, "group_id": f"sd-{_uuid.uuid4().hex[:8]}", "topics": [topic],
                  "alerts_topic": alerts, "dlq_topic": dlq},
        "input": {"timestamp_field": "ts"},
        "model": {"bundle": str(models / "current"), "provider": "cpu", "watch": True, "watch_interval_s": 0.3},
        "detection": DETECTION,
        "runtime": {"max_batch": 500, "max_wait_ms": 50, "commit_interval_s": 0.5},
    })
    detector = Detector(settings)
    result = {}
    runner = threading.Thread(target=lambda: result.update(stats=detector.run(timeout=120)), daemon=True)
    runner.start()
    try:
        _produce(kafka_bootstrap, topic, events[:half])
        deadline = time.monotonic() + 60
        while detector.stats.consumed < half and time.monotonic() < deadline:
            time.sleep(0.2)
        assert detector.stats.consumed == half
        toml = tmp_path / "run.toml"
        toml.write_text(f'[kafka]\nbootstrap_servers = "{kafka_bootstrap}"\ntopics = ["{topic}"]\n'
                        f'[input]\ntimestamp_field = "ts"\n[detection]\nwarmup = 200\n')
        # The span is in the records' Kafka timestamps (offsets-for-times): they were produced just now.
        done = retrain("--config", str(toml), "--models", str(models), "--holdout", "10m",
                       "--candidate", str(candidate.path))
        assert done.returncode == 0, done.stdout + done.stderr
        assert os.readlink(models / "current") == "v2"
        deadline = time.monotonic() + 30
        while detector.bundle.model_version != "v2" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert detector.bundle.model_version == "v2", "the running service did not load the promoted model"
        _produce(kafka_bootstrap, topic, events[half:])
        deadline = time.monotonic() + 60
        while detector.stats.consumed < len(events) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        detector.stop()
        runner.join(60)
    assert result["stats"].consumed == len(events), "every event consumed exactly once"
    out = [orjson.loads(m.value()) for m in read_to_end(kafka_bootstrap, alerts)]
    ids = [(a["alert_id"], a["event_id"]) for a in out]
    assert len(ids) == len(set(ids)), "an alert event was published twice"
    second_half = datetime_iso(sim.config.start_ms + (600 // 2) * sim.config.interval_ms)
    second_half_opens = [a for a in out if a["state"] == "open" and a["event_time"] >= second_half]
    assert second_half_opens and all(a["model_version"] == "v2" for a in second_half_opens)
    assert any(a["model_version"] == live.model_version for a in out), "the first half was the live model's"


def datetime_iso(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
