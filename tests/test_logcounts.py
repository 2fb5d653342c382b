"""The count-vector log model (layout template-counts/1): stage rows (cumulative counts, start rows,
idle checks, no end rows, a pause does not start a new session), the ONNX graph against its numpy
reference, the bundle loader, and replay on a tiny synthetic log (unknown templates caught at their
line, truncated blocks at their idle check, normal blocks quiet)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from logsynth import make_log, train_tiny_bundle
from stream_detector.core.bundle import BundleError, load_bundle
from stream_detector.logs.spec import COUNTS_LAYOUT, IDLE_TOKEN, LOGS_SECTION, LogModelSpec, count_feature_names, load_log_spec
from stream_detector.logs.features import LogFeatureConfigError, make_feature_config
from stream_detector.logs.parse import make_config
from stream_detector.logs.stage import IDLE, LINE, LogStage, START
from stream_detector.logs.templates import TemplateMiner

BLK = "blk_38865049064139660"
RECV = "081109 {t} 148 INFO dfs.DataNode$DataXceiver: Receiving block " + BLK + " src: /10.250.19.102:54106 dest: /10.250.19.102:50010"
TERM = "081109 {t} 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block " + BLK + " terminating"


def _spec(idle_s: float | None = 600.0, timeout_s: float = 86_400.0) -> LogModelSpec:
    miner = TemplateMiner()
    for line in (RECV, TERM):
        miner.learn(line.format(t="203615").split(": ", 1)[1])
    feats = make_feature_config(session_timeout_s=timeout_s, idle_check_s=idle_s)
    return LogModelSpec(make_config(format="hdfs"), feats, miner.freeze(), 0, COUNTS_LAYOUT)


def test_rows_carry_cumulative_counts_and_one_idle_check_per_pause():
    spec = _spec(idle_s=600.0)
    stage = LogStage(spec)
    r = spec.templates.match(RECV.format(t="0").split(": ", 1)[1])
    p = spec.templates.match(TERM.format(t="0").split(": ", 1)[1])
    # two Receiving lines 1 s apart, then 2 h of silence, then PacketResponder: one session throughout
    batch, dead = stage.feed([RECV.format(t="203615"), RECV.format(t="203616"), TERM.format(t="223616")])
    assert not dead
    assert batch.kind.tolist() == [START, LINE, LINE, IDLE, LINE]  # the idle check comes when the pause ends
    assert batch.rows.shape[1] == spec.vocab_size + 1 and spec.feature_names() == count_feature_names(spec.vocab_size)
    np.testing.assert_array_equal(batch.rows[0], [0, 0, 0, START])
    counts = batch.rows[:, :-1]
    assert counts[2, r] == 2 and counts[3, r] == 2 and counts[4, r] == 2 and counts[4, p] == 1  # counts survive the pause
    assert batch.rows[3, -1] == IDLE and batch.token[3] == IDLE_TOKEN
    assert batch.event_time_ms[3] == batch.event_time_ms[2] + 600_000
    assert spec.token_text(IDLE_TOKEN) == "<idle check>"
    # 11 minutes later by the stage's clock (another block's line): one idle check per pause
    later = "081109 224800 1 INFO dfs.DataNode$DataXceiver: Receiving block blk_1 src: /10.0.0.1:1 dest: /10.0.0.1:50010"
    batch, _ = stage.feed([later])
    assert [k for k, kind in zip(batch.keys, batch.kind.tolist()) if kind == IDLE] == [BLK]
    batch, _ = stage.feed([later.replace("224800", "235000").replace("blk_1", "blk_2")])
    assert [k for k, kind in zip(batch.keys, batch.kind.tolist()) if kind == IDLE] == ["blk_1"]  # not BLK again


def test_no_end_rows_and_no_judgement_of_entities_still_open_at_the_end():
    spec = _spec(idle_s=600.0, timeout_s=1200.0)
    stage = LogStage(spec, record_sessions=True)
    # the session times out (> 1200 s): its idle check came first, no end row ever
    batch, _ = stage.feed([RECV.format(t="203615"), RECV.format(t="210000")])
    assert batch.kind.tolist() == [START, LINE, IDLE, START, LINE]
    assert stage.sessions[0].reason == "timeout"
    batch, _ = stage.feed([RECV.format(t="210500")])  # 5 min later: inside the pause when the input ends
    assert batch.kind.tolist() == [LINE]
    stage.flush()
    assert [s.reason for s in stage.sessions] == ["timeout", "flush"]


def test_idle_check_must_be_shorter_than_the_session_timeout():
    with pytest.raises(LogFeatureConfigError, match="idle_check_s must be positive and shorter than session_timeout_s"):
        make_feature_config(session_timeout_s=600.0, idle_check_s=600.0)


def test_onnx_graph_matches_its_numpy_reference():
    import onnxruntime as ort

    from training.logcounts import count_model_onnx, fit_count_branches, reference_errors

    rng = np.random.default_rng(7)
    n, v = 400, 6
    counts = rng.poisson([0.3, 3, 1, 3, 2, 0.1], size=(n, v)).astype(np.float32)
    kinds = rng.choice([LINE, IDLE, START], size=n, p=[0.7, 0.2, 0.1]).astype(np.int8)
    rows = np.concatenate([counts, kinds[:, None].astype(np.float32)], axis=1)
    keys = [f"e{i % 40}" for i in range(n)]
    is_val = np.array([int(k[1:]) >= 30 for k in keys])
    line, idle, info = fit_count_branches(rows, kinds, keys, is_val, 0.9, 0.2, 1.0)
    assert info["line"]["k"] >= 1 and info["idle"]["rows"] > 2 and line.q >= 1.0
    sess = ort.InferenceSession(count_model_onnx(line, idle, v), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"x": np.stack([rows, rows], axis=1)})[0]
    assert out.shape == (n, 2, v + 1)
    np.testing.assert_array_equal(out[:, 0], 0.0)
    np.testing.assert_allclose(out[:, -1], reference_errors(rows, line, idle), rtol=1e-4, atol=1e-5)
    assert np.all(out[kinds == START, -1] == 0.0) and out[kinds != START, -1].sum() > 0
    # idle rows and line rows are judged by different subspaces
    assert not np.allclose(line.residual, idle.residual)


@pytest.fixture(scope="module")
def counts_bundle(tmp_path_factory):
    return train_tiny_bundle(tmp_path_factory.mktemp("logcounts"), log_model="counts", idle_check_s=300.0)


def test_bundle_loads_and_refuses_features_of_another_layout(counts_bundle, tmp_path):
    import shutil

    bundle = load_bundle(counts_bundle)
    spec = load_log_spec(bundle)
    assert spec.counts and bundle.extra[LOGS_SECTION]["layout"] == COUNTS_LAYOUT
    assert list(bundle.features) == count_feature_names(spec.vocab_size) and bundle.model_version.startswith("logcounts-")
    assert spec.features.idle_check_s == 300.0
    tr = bundle.training  # the shared training metadata (training/meta.py), versions included
    assert {"data_source", "rows", "entities", "seed", "settings", "versions", "command_line", "created_at", "seconds"} <= set(tr)
    assert tr["model"] == "counts" and {"python", "numpy", "onnx", "onnxruntime"} <= set(tr["versions"])
    assert bundle.calibration.tail is None and "session_1.0" in bundle.calibration.quantiles
    dst = tmp_path / "b"
    shutil.copytree(counts_bundle, dst)
    meta = orjson.loads((dst / "bundle.json").read_bytes())
    meta[LOGS_SECTION]["layout"] = "template-context/1"
    (dst / "bundle.json").write_bytes(orjson.dumps(meta))
    with pytest.raises(BundleError, match="do not follow the log layout template-context/1") as e:
        load_log_spec(load_bundle(dst))
    assert "\n" not in str(e.value)


def test_replay_catches_unknown_at_the_line_and_truncated_at_the_idle_check(counts_bundle, tmp_path):
    from stream_detector.offline.logreplay import replay_log
    from stream_detector.core.pipeline import DetectionSettings
    from stream_detector.core.scorer import Scorer
    from stream_detector.core.thresholds import ThresholdParams

    lines, kinds = make_log(11, 40, {"unknown": 4, "truncated": 4}, spacing=30)
    data = tmp_path / "stream.log"
    data.write_text("\n".join(lines) + "\n")
    bundle = load_bundle(counts_bundle)
    spec = load_log_spec(bundle)
    settings = DetectionSettings(idle_timeout_ms=None, threshold=ThresholdParams(warmup=1000, history=1000))
    replay_log(bundle, spec, Scorer(bundle, provider="cpu", intra_op_threads=1), settings, data, tmp_path / "out", batch_lines=64)
    # scores.csv: the common six columns (scoresfile.py), then kind and template_id
    from stream_detector.offline.scoresfile import read_scores

    table = read_scores(tmp_path / "out" / "scores.csv")
    assert list(table.extra) == ["kind", "template_id"] and {"line", "idle-check"} <= set(table.extra["kind"])
    assert all((r >= 0) == (k == "line") for r, k in zip(table.row.tolist(), table.extra["kind"]))
    opened = {}
    for a in (orjson.loads(x) for x in (tmp_path / "out" / "alerts.jsonl").read_bytes().splitlines()):
        if a["state"] == "open":
            opened.setdefault(a["key"], a)
    for b in (b for b, k in kinds.items() if k == "unknown"):
        a = opened[b]
        assert a["log"]["row"] == "line" and a["log"]["template"] == "<unknown template>" and "writeBlock" in a["log"]["line"]
        assert a["top_features"][0]["name"] == "count:unknown"
    # a truncated block is judged once it has rested 300 s by the stream's clock; one whose pause
    # is still shorter when the input ends is not judged (nothing is known about it yet)
    from stream_detector.logs.parse import LineParser

    parser = LineParser(spec.parser)
    last: dict[str, int] = {}
    for line in lines:
        p = parser.parse(line)
        last[p.entities[0]] = p.timestamp_ms
    end = max(last.values())
    truncated = {b for b, k in kinds.items() if k == "truncated"}
    due = {b for b in truncated if end - last[b] > 300_000}
    assert len(due) >= 2
    caught = truncated & set(opened)
    assert caught == due
    for b in caught:
        assert opened[b]["log"]["row"] == "idle-check" and opened[b]["log"]["template"] == "<idle check>"
    false = {b for b in opened if kinds[b] == "normal"}
    assert not false, f"normal blocks alerted: {false}"


# ---------------------------------------------------------------- counts per time bucket (layout template-bucket-counts/1)


def _bucket_spec(bucket_s: float = 600.0, idle_s: float | None = None) -> LogModelSpec:
    from stream_detector.logs.spec import BUCKET_COUNTS_LAYOUT

    base = _spec()
    feats = make_feature_config(session_timeout_s=86_400.0, idle_check_s=idle_s, bucket_s=bucket_s)
    return LogModelSpec(base.parser, feats, base.templates, 0, BUCKET_COUNTS_LAYOUT)


def test_bucketed_rows_count_the_current_bucket_only():
    spec = _bucket_spec(600.0)
    assert spec.counts and spec.bucketed
    stage = LogStage(spec)
    r = spec.templates.match(RECV.format(t="0").split(": ", 1)[1])
    p = spec.templates.match(TERM.format(t="0").split(": ", 1)[1])
    # 20:36:15 and 20:38:00 share the bucket 20:30-20:40 (epoch-aligned); 20:41:00 starts the next
    batch, dead = stage.feed([RECV.format(t="203615"), TERM.format(t="203800"), RECV.format(t="204100"), RECV.format(t="204900")])
    assert not dead and batch.kind.tolist() == [START, LINE, LINE, LINE, LINE]  # one session, no idle checks
    counts = batch.rows[:, :-1]
    assert counts[1, r] == 1 and counts[2, r] == 1 and counts[2, p] == 1
    assert counts[3, r] == 1 and counts[3, p] == 0  # a new bucket counts afresh
    assert counts[4, r] == 2
    # a late line (older than its entity's bucket) counts in the current one
    batch, _ = stage.feed([TERM.format(t="203000")])
    assert batch.rows[0, p] == 1 and batch.rows[0, r] == 2


def test_a_resumed_bucketed_session_carries_on_its_bucket():
    from stream_detector.logs.stage import SavedSession

    spec = _bucket_spec(600.0)
    first = LogStage(spec)
    batch, _ = first.feed([RECV.format(t="203615"), RECV.format(t="203700")])
    saved = SavedSession(start_ms=int(batch.event_time_ms[0]), events=2, line="x", line_ms=int(batch.event_time_ms[-1]), topic="t", offset=1)
    moved = LogStage(spec)
    moved.resume(BLK, 0, saved, batch.rows[-1])
    r = spec.templates.match(RECV.format(t="0").split(": ", 1)[1])
    same, _ = moved.feed([RECV.format(t="203800")], topic="t", offset=[2])
    assert same.kind.tolist() == [LINE] and same.rows[0, r] == 3  # same bucket: counts carry on
    nxt, _ = moved.feed([RECV.format(t="204000")], topic="t", offset=[3])
    assert nxt.rows[0, r] == 1  # 20:40:00 opens the next bucket


def test_bucketed_graph_scores_are_zero_below_the_floor():
    import onnxruntime as ort

    from training.logcounts import count_model_onnx, fit_count_branches, reference_errors

    rng = np.random.default_rng(3)
    n, v = 300, 5
    counts = rng.poisson([0.2, 3, 1, 2, 1], size=(n, v)).astype(np.float32)
    kinds = rng.choice([LINE, START], size=n, p=[0.9, 0.1]).astype(np.int8)
    rows = np.concatenate([counts, kinds[:, None].astype(np.float32)], axis=1)
    keys = [f"e{i % 30}" for i in range(n)]
    line, idle, _ = fit_count_branches(rows, kinds, keys, np.array([int(k[1:]) >= 24 for k in keys]), 0.8, 0.2, 1.0)
    plain = reference_errors(rows, line, idle).sum(axis=1)
    floor = float(np.quantile(plain[plain > 0], 0.5))
    sess = ort.InferenceSession(count_model_onnx(line, idle, v, floor), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": np.stack([rows, rows], axis=1)})[0][:, -1].sum(axis=1)
    want = reference_errors(rows, line, idle, floor).sum(axis=1)
    clear = np.abs(plain - floor) > 1e-4 * (1 + floor)
    np.testing.assert_allclose(got[clear], want[clear], rtol=1e-4, atol=1e-5)
    assert np.all((got == 0) | (got >= floor * (1 - 1e-5))) and (got == 0).sum() > (plain == 0).sum()


def test_loader_refuses_a_bucketed_layout_without_a_bucket(counts_bundle, tmp_path):
    import shutil

    dst = tmp_path / "b"
    shutil.copytree(counts_bundle, dst)
    meta = orjson.loads((dst / "bundle.json").read_bytes())
    meta[LOGS_SECTION]["layout"] = "template-bucket-counts/1"
    (dst / "bundle.json").write_bytes(orjson.dumps(meta))
    with pytest.raises(BundleError, match="needs a bucket length") as e:
        load_log_spec(load_bundle(dst))
    assert "\n" not in str(e.value)
