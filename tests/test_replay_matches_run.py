"""One settings path: `replay --config run.toml` on a file reproduces what `run` with the same TOML
does on the same events through the real broker — the same alerts (entity, state, event time,
score, threshold, calibrated score, top features; the file holds the values to 5 decimals, so
scores are compared to 4), with every detection knob set away from its
default in the TOML."""

from __future__ import annotations

import uuid

import numpy as np
import orjson
import pytest

from bundle_factory import make_bundle
from conftest import read_to_end
from stream_detector.cli import main
from stream_detector.config import load_settings
from stream_detector.core.calibration import calibrate_scores
from stream_detector.core.events import EventBatch
from stream_detector.core.pipeline import DetectionSettings, DetectorCore
from stream_detector.core.scorer import Scorer
from stream_detector.offline.simulate import SimConfig, Simulator, write_file
from stream_detector.service.loop import Detector

pytestmark = pytest.mark.kafka

F, W, E, T = 6, 8, 12, 600

DETECTION_TOML = """
[detection]
hop = 2
threshold = "calibrated"
alert_level = 3.5
learn_level = 1.5
max_shift = 3.0
warmup = 40
history = 300
resolve_after = 8
cooldown = 20
update_every = 2
update_factor = 1.5
top_features = 2
max_entities = 500
idle_timeout_ms = 3600000
"""


def _bundle(tmp_path, features):
    clean = Simulator(SimConfig(entities=E, features=F, seed=99), 400).frame()[2]
    center, scale = clean.mean(0), clean.std(0)
    probe = make_bundle(tmp_path, features, W, "mean", 1.0, name="probe", center=center, scale=scale)
    keys, times, rows = Simulator(SimConfig(entities=E, features=F, seed=98), 400).frame()
    normal = DetectorCore(probe, Scorer(probe, provider="cpu"), DetectionSettings()).process(EventBatch.build(keys, rows, times)).score
    return make_bundle(tmp_path, features, W, "mean", name="calibrated", center=center, scale=scale,
                       calibration=calibrate_scores(normal, 0.999))


def _view(alerts):
    """What must agree, per alert event (ids differ: they name the source topic, partition and offset),
    in a stable order; the numbers apart, compared by `_same`."""
    return sorted(
        ((a["key"], a["event_time"], a["state"], a["calibrated_threshold"], a["anomalous_scores"], tuple(f["name"] for f in a["top_features"])),
         (a["score"], a["threshold"], a["calibrated_score"]))
        for a in alerts
    )


def _same(a, b):
    """The same alert events; numbers within 1e-4 relative (scores) and 0.01 (calibrated scores)."""
    return len(a) == len(b) and all(
        x[0] == y[0] and np.allclose(x[1][:2], y[1][:2], rtol=1e-4) and abs(x[1][2] - y[1][2]) < 0.01 for x, y in zip(a, b)
    )


def test_replay_with_the_run_config_gives_the_alerts_of_run(kafka_bootstrap, make_topic, tmp_path, rng):
    seed = int(rng.integers(1_000_000))
    print(f"[simulation seed] {seed}")
    cfg = SimConfig(entities=E, features=F, anomaly_rate=3.0, warmup=120, seed=seed)
    sim = Simulator(cfg, T)
    bundle = _bundle(tmp_path, sim.features)
    config = tmp_path / "run.toml"
    config.write_text(
        f'[input]\nkey_field = "entity"\ntimestamp_field = "ts"\n[model]\nbundle = "{bundle.path}"\nprovider = "cpu"\n'
        f"[runtime]\nmax_batch = 500\n" + DETECTION_TOML
    )

    topic, alerts_topic, dlq = make_topic(partitions=3, prefix="obs"), make_topic(prefix="alerts"), make_topic(prefix="dlq")
    events = list(sim.events())
    from test_service_kafka import _produce

    _produce(kafka_bootstrap, topic, [(k.encode(), v) for k, _, v in events])
    settings = load_settings(config, {"kafka": {"bootstrap_servers": kafka_bootstrap, "group_id": f"g-{uuid.uuid4().hex[:8]}",
                                                "topics": [topic], "alerts_topic": alerts_topic, "dlq_topic": dlq},
                                      "runtime": {"max_wait_ms": 50, "commit_interval_s": 0.5}})
    assert settings.detection.alert_level == 3.5 and settings.detection.top_features == 2  # the TOML reached `run`
    stats = Detector(settings).run(max_messages=len(events), timeout=90)
    assert stats.consumed == len(events) and stats.dead_letters == 0
    run_alerts = [orjson.loads(m.value()) for m in read_to_end(kafka_bootstrap, alerts_topic)]

    data = tmp_path / "events.csv"
    write_file(Simulator(cfg, T), data)  # the same events (a simulator's stream can be read once)
    out = tmp_path / "replay"
    assert main(["replay", "--config", str(config), "--input", str(data), "--out", str(out)]) == 0
    replay_alerts = [orjson.loads(line) for line in (out / "alerts.jsonl").read_bytes().splitlines()]

    opens = [a for a in run_alerts if a["state"] == "open"]
    assert len(opens) >= 3 and any(a["state"] == "update" for a in run_alerts)  # the knobs were exercised
    assert all(a["calibrated_threshold"] == 3.5 and len(a["top_features"]) == 2 for a in run_alerts)
    assert _same(_view(replay_alerts), _view(run_alerts)), (_view(replay_alerts), _view(run_alerts))

    # and a knob given as a flag on top of the same TOML changes the replay (it is not ignored)
    other = tmp_path / "replay-other"
    assert main(["replay", "--config", str(config), "--input", str(data), "--out", str(other), "--detection.alert-level", "6"]) == 0
    assert not _same(_view([orjson.loads(x) for x in (other / "alerts.jsonl").read_bytes().splitlines()]), _view(run_alerts))
