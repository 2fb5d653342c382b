"""Training and backtesting straight from a topic, through the real broker (issue 19, parts 1-2):
`stream-detector-train fit --kafka-topic` trains on exactly the rows a file of the same records gives
(same bundle: model.onnx byte for byte, same normaliser and calibration), `replay --kafka-topic`
writes the same scores and alerts as `replay --input` of that file, records the service would
dead-letter are counted by reason and skipped, `--since`/`--until` cut the range by time or offset,
the reader never joins or commits to a consumer group, and bad input ends in one sentence with exit
2 and nothing written."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from stream_detector.config import load_settings
from stream_detector.ingest.topic_range import TopicRangeError, _resolve, parse_bound, read_topic_range

pytestmark = pytest.mark.kafka

ENTITIES, ROWS, FEATURES = 3, 700, ("cpu", "mem", "disk")
START_MS = 1_767_225_600_000  # 2026-01-01T00:00Z
STEP_MS = 60_000
TINY = ["--window", "16", "--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--ff-dim", "32", "--epochs", "2",
        "--threads", "1", "--seed", "3", "--no-progress"]


def records(rng) -> list[dict]:
    """Three machines, a daily-ish cycle plus noise; float32-exact values, so a file and the decoder's
    float32 rows are the same numbers. Tick-major, as a live fleet produces them."""
    t = np.arange(ROWS)
    out = []
    base = {e: rng.normal(size=len(FEATURES)) * 3 + 50 for e in range(ENTITIES)}
    for i in t:
        for e in range(ENTITIES):
            v = base[e] + 5 * np.sin(2 * np.pi * i / 96 + e) + rng.normal(size=len(FEATURES))
            if e == 1 and 600 <= i < 606:
                v = v + 25.0  # an incident in the replayed part
            row = {"key": f"m-{e}", "ts": int(START_MS + i * STEP_MS)}
            row.update({f: float(np.float32(x)) for f, x in zip(FEATURES, v)})
            out.append(row)
    return out


def produce(bootstrap: str, topic: str, recs: list[dict], extra: list[tuple[bytes | None, bytes]] = ()) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for r in recs:
        p.produce(topic, key=r["key"].encode(), value=orjson.dumps(r), timestamp=r["ts"])
    for k, v in extra:
        p.produce(topic, key=k, value=v, timestamp=START_MS + ROWS * STEP_MS)
    assert p.flush(30) == 0


def write_jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    return path


def run_toml(path: Path, bootstrap: str, group: str) -> Path:
    path.write_text(f'[kafka]\nbootstrap_servers = "{bootstrap}"\ngroup_id = "{group}"\n'
                    '[input]\ntimestamp_field = "ts"\n[detection]\nwarmup = 50\n')
    return path


def cli(*argv: str, module: str = "training.cli") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=600)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fleet(kafka_bootstrap, tmp_path_factory):
    """One topic (3 partitions) with the fleet's records and two bad ones, and the same good records as a file."""
    from confluent_kafka.admin import NewTopic

    rng = np.random.default_rng(20261205)
    recs = records(rng)
    topic = f"fleet-{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    # The records carry event times of 2026-01-01; without this, the test broker's 24 h retention deletes them.
    keep = {"retention.ms": "-1"}
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1, config=keep)])[topic].result(timeout=30)
    bad = [(b"m-0", b"{not json"), (b"m-2", orjson.dumps({"ts": START_MS, "cpu": 1.0}))]
    produce(kafka_bootstrap, topic, recs, bad)
    work = tmp_path_factory.mktemp("fleet")
    yield {"topic": topic, "recs": recs, "work": work, "file": write_jsonl(work / "fleet.jsonl", recs)}
    admin.delete_topics([topic])[topic].result(timeout=30)


def test_fit_from_the_topic_is_fit_from_the_same_rows_in_a_file(fleet, kafka_bootstrap):
    work, cut = fleet["work"], START_MS + 500 * STEP_MS  # train on the first 500 ticks
    train = [r for r in fleet["recs"] if r["ts"] < cut]
    from_file = cli("fit", *TINY, "--data", str(write_jsonl(work / "train.jsonl", train)), "--out", str(work / "b-file"))
    assert from_file.returncode == 0, from_file.stderr
    toml = run_toml(work / "run.toml", kafka_bootstrap, "never-joined")
    from_topic = cli("fit", *TINY, "--config", str(toml), "--kafka-topic", fleet["topic"],
                     "--until", "2026-01-01T08:20:00Z", "--out", str(work / "b-topic"))
    assert from_topic.returncode == 0, from_topic.stderr
    assert f"read {500 * ENTITIES:,} records of {fleet['topic']}" in from_topic.stderr, from_topic.stderr
    assert sha(work / "b-file" / "model.onnx") == sha(work / "b-topic" / "model.onnx"), "a different model from the same rows"
    a, b = (orjson.loads((work / d / "bundle.json").read_bytes()) for d in ("b-file", "b-topic"))
    assert a["features"] == b["features"] == list(FEATURES)
    assert a["normaliser"] == b["normaliser"]
    assert a["calibration"] == b["calibration"]
    assert b["training"]["data_source"].endswith(f"kafka:{fleet['topic']}")
    # The reader never joined or committed to a group: the group in the run TOML does not exist.
    # (a generous bound: on a loaded 2-core CI machine the listing once took over 30 s)
    groups = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_consumer_groups(request_timeout=120).result(timeout=150)
    assert all(not g.group_id.startswith("never-joined") for g in groups.valid), [g.group_id for g in groups.valid]


@pytest.fixture(scope="module")
def fleet_bundle(fleet) -> Path:
    bundle = fleet["work"] / "b-replay"
    fitted = cli("fit", *TINY, "--data", str(fleet["file"]), "--out", str(bundle))
    assert fitted.returncode == 0, fitted.stderr
    return bundle


def test_replay_from_the_topic_equals_replay_from_the_file(fleet, fleet_bundle, kafka_bootstrap):
    work, bundle = fleet["work"], fleet_bundle
    toml = run_toml(work / "run-replay.toml", kafka_bootstrap, "replay-never-joined")
    by_file = cli("replay", "--config", str(toml), "--model", str(bundle), "--input", str(fleet["file"]),
                  "--out", str(work / "r-file"), module="stream_detector.cli")
    by_topic = cli("replay", "--config", str(toml), "--model", str(bundle), "--kafka-topic", fleet["topic"],
                   "--out", str(work / "r-topic"), module="stream_detector.cli")
    assert by_file.returncode == 0 and by_topic.returncode == 0, by_file.stderr + by_topic.stderr
    assert "2 that the service would dead-letter (" in by_topic.stderr and "undecodable-json 1" in by_topic.stderr

    def per_entity(out: Path) -> dict[str, list[tuple[str, str, str]]]:
        lines = (out / "scores.csv").read_text().splitlines()[1:]
        seq: dict[str, list[tuple[str, str, str]]] = {}
        for ln in lines:
            _, key, score, threshold, alert, _event = ln.split(",", 5)
            seq.setdefault(key, []).append((score, threshold, alert))
        return seq

    assert per_entity(work / "r-topic") == per_entity(work / "r-file")
    alerts = [[orjson.loads(x) for x in (work / d / "alerts.jsonl").read_bytes().splitlines()] for d in ("r-file", "r-topic")]
    # Ids and positions name the input (a file's rows, a topic's offsets); the detection is the same.
    same = ("state", "key", "event_time", "score", "threshold", "calibrated_score", "peak_score", "anomalous_scores")
    assert [[{k: a.get(k) for k in same} for a in run] for run in alerts][0] == [[{k: a.get(k) for k in same} for a in run] for run in alerts][1]
    assert any(a["state"] == "open" and a["key"] == "m-1" for a in alerts[1])


def test_since_and_until_cut_by_time_and_offset_and_bad_records_are_counted(fleet, kafka_bootstrap):
    settings = load_settings(None, {"kafka": {"bootstrap_servers": kafka_bootstrap}, "input": {"timestamp_field": "ts"}})
    whole = read_topic_range(settings, fleet["topic"])
    assert len(whole.keys) == ROWS * ENTITIES and whole.records == ROWS * ENTITIES + 2
    assert whole.dead_letters == {"undecodable-json": 1, "missing-feature": 1}
    assert whole.features == FEATURES, "found from the records, without the key and time fields"
    hour = read_topic_range(settings, fleet["topic"], since="2026-01-01T01:00Z", until="2026-01-01T02:00Z")
    assert len(hour.keys) == 60 * ENTITIES and hour.event_time_ms.min() == START_MS + 60 * STEP_MS
    tail = read_topic_range(settings, fleet["topic"], since="@690")
    assert tail.records == sum(max(0, n - 690) for n in partition_sizes(kafka_bootstrap, fleet["topic"]))


def partition_sizes(bootstrap: str, topic: str) -> list[int]:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "sizes"})
    try:
        return [c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(3)]
    finally:
        c.close()


def test_bounds_parse_or_say_what_they_expect():
    assert parse_bound(None, "earliest").kind == "earliest" and parse_bound("now", "earliest").kind == "latest"
    assert parse_bound("@42", "latest").value == 42
    assert parse_bound("2026-01-01T00:00Z", "latest").value == START_MS
    assert parse_bound("2026-01-01T00:00", "latest").value == START_MS, "no zone: UTC"
    assert parse_bound("6h", "latest", now_ms=START_MS).value == START_MS - 6 * 3_600_000
    for bad in ("yesterday", "@-3", "@x"):
        with pytest.raises(TopicRangeError) as e:
            parse_bound(bad, "latest")
        assert str(e.value).endswith(".") and "\n" not in str(e.value)


@pytest.mark.parametrize("case, fragment", [
    ("unreachable", "cannot reach the Kafka broker at 127.0.0.1:1"),
    ("missing-topic", "does not exist on"),
    ("empty-range", "has no record from latest to latest"),
    ("file-option", "key_field applies to a file"),
])
def test_bad_input_is_one_sentence_exit_2_nothing_written(fleet, fleet_bundle, kafka_bootstrap, tmp_path, case, fragment):
    toml = run_toml(tmp_path / "run.toml", "127.0.0.1:1" if case == "unreachable" else kafka_bootstrap, "g")
    if case == "unreachable":
        (tmp_path / "run.toml").write_text(toml.read_text().replace("[kafka]\n", "[kafka]\ntimeout_s = 2\n"))
    topic = "no-such-topic-here" if case == "missing-topic" else fleet["topic"]
    extra = ["--since", "latest"] if case == "empty-range" else ["--key-field", "key"] if case == "file-option" else []
    out = tmp_path / "b"
    done = cli("fit", *TINY, "--config", str(toml), "--kafka-topic", topic, *extra, "--out", str(out))
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0] and "Traceback" not in done.stderr, err
    assert not out.exists()
    replayed = cli("replay", "--config", str(toml), "--model", str(fleet_bundle), "--kafka-topic", topic,
                   *(extra if case != "file-option" else []), "--out", str(tmp_path / "r"), module="stream_detector.cli")
    if case != "file-option":
        assert replayed.returncode == 2 and fragment in replayed.stderr and "Traceback" not in replayed.stderr, replayed.stderr
        assert not (tmp_path / "r").exists()


def test_a_partition_whose_time_lookup_fails_is_an_error_never_an_empty_range():
    """offsets_for_times reports a failed lookup in the partition's error, with no offset: read as "no
    record after the time", the partition would be left out of the range without a word."""
    from types import SimpleNamespace

    from confluent_kafka import KafkaError, KafkaException

    class Lookup:
        def __init__(self, answer):
            self.answer = answer

        def offsets_for_times(self, tps, timeout):
            return [self.answer]

    def tp(topic, p, value):
        return (topic, p, value)

    bound = parse_bound("2026-01-01T01:00Z", "earliest")
    found = SimpleNamespace(error=None, offset=120)
    assert _resolve(Lookup(found), tp, "t", 0, bound, 0, 700, 1.0) == 120
    none_after = SimpleNamespace(error=None, offset=-1)
    assert _resolve(Lookup(none_after), tp, "t", 0, bound, 0, 700, 1.0) == 700, "no record at or after it: the end"
    failed = SimpleNamespace(error=KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION), offset=-1001)
    with pytest.raises(KafkaException):
        _resolve(Lookup(failed), tp, "t", 0, bound, 0, 700, 1.0)
