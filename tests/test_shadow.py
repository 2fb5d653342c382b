"""A shadow candidate in the running service, through the real broker (issue 19, part 3): it scores
the same events with its own thresholds, its alerts land only on the shadow topic tagged with its
model version, the live alerts are exactly those of a run without a shadow, `stream-detector compare`
reads both topics side by side, and a shadow with other features is refused in one sentence."""

from __future__ import annotations

import subprocess
import sys
import uuid

import orjson
import pytest

from bundle_factory import make_bundle
from conftest import read_to_end
from stream_detector.config import ConfigError, load_settings
from stream_detector.offline.simulate import SimConfig, Simulator
from stream_detector.service.loop import Detector
from test_service_kafka import DETECTION, F, W, _bundle, _opens, _produce

pytestmark = pytest.mark.kafka

E, T = 20, 400


def settings(bootstrap, topic, group, alerts, dlq, shadow_topic, bundle, shadow):
    return load_settings(None, {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": group, "topics": [topic], "alerts_topic": alerts,
                  "dlq_topic": dlq, "shadow_alerts_topic": shadow_topic},
        "input": {"timestamp_field": "ts"},
        "model": {"bundle": str(bundle), "provider": "cpu", **({"shadow_bundle": str(shadow)} if shadow else {})},
        "detection": DETECTION,
        "runtime": {"max_batch": 2000, "max_wait_ms": 50, "commit_interval_s": 0.5},
    })


def test_the_shadow_alerts_only_on_its_topic_and_leaves_the_live_alerts_as_they_were(kafka_bootstrap, make_topic, tmp_path):
    sim = Simulator(SimConfig(entities=E, features=F, anomaly_rate=2.5, warmup=100, seed=21), T)
    live = _bundle(tmp_path, sim.features)
    # The candidate: the same model with a bar twice as low (it pages more), under its own version.
    candidate = make_bundle(tmp_path, sim.features, W, "mean", live.calibration.threshold / 2, name="candidate",
                            center=live.normaliser.center, scale=live.normaliser.scale, model_version="candidate-v2")
    topic = make_topic(partitions=2, prefix="obs")
    alerts, dlq, shadow_topic = make_topic(prefix="alerts"), make_topic(prefix="dlq"), make_topic(prefix="shadow")
    alerts_plain = make_topic(prefix="alerts")
    events = [(k.encode(), v) for k, _, v in sim.events()]
    _produce(kafka_bootstrap, topic, events)

    with_shadow = Detector(settings(kafka_bootstrap, topic, f"sd-{uuid.uuid4().hex[:8]}", alerts, dlq, shadow_topic,
                                    live.path, candidate.path))
    assert with_shadow.run(max_messages=len(events), timeout=60).consumed == len(events)
    without = Detector(settings(kafka_bootstrap, topic, f"sd-{uuid.uuid4().hex[:8]}", alerts_plain, dlq, shadow_topic,
                                live.path, None))
    assert without.run(max_messages=len(events), timeout=60).consumed == len(events)

    live_events = [orjson.loads(m.value()) for m in read_to_end(kafka_bootstrap, alerts)]
    shadow_events = [orjson.loads(m.value()) for m in read_to_end(kafka_bootstrap, shadow_topic)]
    assert live_events and shadow_events
    assert all(a["model_version"] == live.model_version and "shadow" not in a for a in live_events)
    assert all(a["model_version"] == "candidate-v2" and a["shadow"] is True for a in shadow_events)
    plain = [orjson.loads(m.value()) for m in read_to_end(kafka_bootstrap, alerts_plain)]
    # (sorted: the two input partitions interleave differently from run to run)
    assert sorted(a["event_id"] for a in live_events) == sorted(a["event_id"] for a in plain), "a shadow changed the live alerts"
    shadow_opens, live_opens = _opens(read_to_end(kafka_bootstrap, shadow_topic)), _opens(read_to_end(kafka_bootstrap, alerts))
    assert len(shadow_opens) >= len(live_opens), "a bar twice as low opens at least as many alerts"

    toml = tmp_path / "run.toml"
    toml.write_text(f'[kafka]\nbootstrap_servers = "{kafka_bootstrap}"\nalerts_topic = "{alerts}"\n'
                    f'shadow_alerts_topic = "{shadow_topic}"\n')
    done = subprocess.run([sys.executable, "-m", "stream_detector.cli", "compare", "--config", str(toml), "--since", "earliest",
                           "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    assert report["live"]["alerts_opened"] == len(live_opens) and report["shadow"]["alerts_opened"] == len(shadow_opens)
    assert report["live"]["model_versions"] == [live.model_version] and report["shadow"]["model_versions"] == ["candidate-v2"]
    assert report["live"]["matched_by_the_other"] == len(live_opens), "every live page is also a shadow page here"
    table = subprocess.run([sys.executable, "-m", "stream_detector.cli", "compare", "--config", str(toml), "--since",
                            "earliest"], capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "alerts opened" in table.stdout and "candidate-v2" in table.stdout, table.stdout


def test_a_shadow_with_other_features_is_refused_in_one_sentence(kafka_bootstrap, make_topic, tmp_path):
    live = make_bundle(tmp_path, ["a", "b", "c", "d"], W, name="live")
    other = make_bundle(tmp_path, ["a", "b", "c"], W, name="other")
    topic, alerts, dlq = make_topic(prefix="obs"), make_topic(prefix="alerts"), make_topic(prefix="dlq")
    with pytest.raises(ConfigError) as e:
        Detector(settings(kafka_bootstrap, topic, "g", alerts, dlq, make_topic(prefix="shadow"), live.path, other.path))
    assert "reads other features than the live model" in str(e.value) and str(e.value).endswith(".")
    checked = subprocess.run([sys.executable, "-m", "stream_detector.cli", "check", "--model.bundle", str(live.path),
                              "--model.shadow-bundle", str(other.path), "--kafka.bootstrap-servers", kafka_bootstrap,
                              "--kafka.topics", topic, "--kafka.alerts-topic", alerts, "--kafka.dlq-topic", dlq,
                              "--model.provider", "cpu"], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 2 and "other features" in checked.stderr and "Traceback" not in checked.stderr, checked.stderr
