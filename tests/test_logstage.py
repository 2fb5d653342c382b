"""Log stage (raw lines -> context rows with session start/end rows), replay --format log with
per-entity decisions and annotated alerts, and the session-level evaluation."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from logsynth import make_log, train_tiny_bundle
from stream_detector.core.bundle import load_bundle
from stream_detector.logs.spec import LogModelSpec, load_log_spec
from stream_detector.offline.logeval import EntityDecisions, read_entities, read_entity_labels, session_metrics
from stream_detector.logs.features import make_feature_config
from stream_detector.logs.parse import make_config
from stream_detector.logs.stage import END, LINE, LogStage, START
from stream_detector.logs.templates import TemplateMiner

L1 = "081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_38865049064139660 terminating"
L2 = "081109 203807 222 INFO dfs.DataNode$PacketResponder: PacketResponder 0 for block blk_-6952295868487656571 terminating"
L3 = "081109 204005 35 INFO dfs.FSNamesystem: BLOCK* NameSystem.addStoredBlock: blockMap updated: 10.251.73.220:50010 is added to blk_38865049064139660 size 67108864"


def _spec(context: int = 4, timeout_s: float = 60.0) -> LogModelSpec:
    miner = TemplateMiner()
    for line in (L1, L2, L3):
        miner.learn(line.split(": ", 1)[1])
    return LogModelSpec(make_config(format="hdfs"), make_feature_config(session_timeout_s=timeout_s), miner.freeze(), context)


def test_rows_carry_start_token_context_and_gaps():
    spec = _spec(context=4, timeout_s=600.0)
    stage = LogStage(spec)
    batch, dead = stage.feed([L1, L3], topic="f", offset=[10, 11])
    assert not dead
    # block blk_388...: start row, line row (t=203615), then 230 s later the addStoredBlock line
    assert batch.kind.tolist() == [START, LINE, LINE]
    assert batch.keys == ["blk_38865049064139660"] * 3
    pad, bos = float(spec.pad_id), float(spec.bos_id)
    t1, t3 = spec.templates.match(L1.split(": ", 1)[1]), spec.templates.match(L3.split(": ", 1)[1])
    assert t1 > 0 and t3 > 0 and t1 != t3
    np.testing.assert_array_equal(batch.rows[0, :4], [pad, pad, pad, bos])
    np.testing.assert_array_equal(batch.rows[2, :4], [pad, bos, t1, t3])
    np.testing.assert_allclose(batch.rows[2, 4:], [0, 0, 0, math.log1p(230.0)], rtol=1e-6)
    assert batch.offset.tolist() == [10, 10, 11] and batch.topic == ["f"] * 3
    assert batch.event_time_ms[1] == 1226262975000  # 2008-11-09 20:36:15 UTC


def test_unknown_template_and_unparseable_lines():
    stage = LogStage(_spec())
    odd = "081109 203615 148 WARN dfs.DataNode: writeBlock blk_5 received exception java.io.IOException"
    batch, dead = stage.feed([odd, "not a log line", b"\xff\xfe", "081109 203615 1 INFO x: no block named here"])
    assert batch.token[batch.kind == LINE].tolist() == [0]  # unknown template: token 0, the vocabulary does not grow
    assert stage.templates.vocab_size == 3
    assert [i for i, _ in dead] == [1, 2, 3]
    assert "does not match the hdfs line format" in dead[0][1]
    assert "not valid UTF-8" in dead[1][1]
    assert "names no entity" in dead[2][1]


def test_session_end_row_after_timeout_and_none_at_flush():
    spec = _spec(context=4, timeout_s=60.0)
    stage = LogStage(spec, record_sessions=True)
    b1, _ = stage.feed([L1])  # blk_388 at 20:36:15
    b2, _ = stage.feed([L2])  # another block at 20:38:07: blk_388 has been idle 112 s > 60 s
    assert b1.kind.tolist() == [START, LINE]
    assert b2.kind.tolist() == [START, LINE, END]
    end = np.flatnonzero(b2.kind == END)[0]
    assert b2.keys[end] == "blk_38865049064139660" and b2.token[end] == spec.end_id
    assert b2.rows[end, :4].tolist() == [spec.pad_id, spec.bos_id, spec.templates.match(L1.split(": ", 1)[1]), spec.end_id]
    assert b2.event_time_ms[end] == 1226262975000 + 60_000  # when the timeout was reached
    assert b2.line[end] == L1  # the session's last line is the sample
    stage.flush()  # blk_-695... is still open: incomplete, no end row
    assert [(s.entity, s.reason, s.complete) for s in stage.sessions] == [
        ("blk_38865049064139660", "timeout", True),
        ("blk_-6952295868487656571", "flush", False),
    ]


def test_multi_entity_line_counts_for_each():
    stage = LogStage(_spec())
    line = "081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_1 terminating blk_2"
    batch, _ = stage.feed([line])
    assert sorted(batch.keys[i] for i in np.flatnonzero(batch.kind == LINE)) == ["blk_1", "blk_2"]


def test_context_keeps_only_the_newest_tokens():
    spec = _spec(context=3)
    stage = LogStage(spec)
    batch, _ = stage.feed([L1, L1, L1, L1])
    t1 = spec.templates.match(L1.split(": ", 1)[1])
    assert batch.rows[-1, :3].tolist() == [t1, t1, t1]  # the start token has slid out


# ---------------------------------------------------------------------- replay + evaluation, tiny model
@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return train_tiny_bundle(tmp_path_factory.mktemp("logstage"), epochs=8)


def test_replay_flags_anomalous_blocks_with_annotated_alerts(tiny_bundle, tmp_path):
    from stream_detector.core.alerts import AlertParams
    from stream_detector.offline.logreplay import replay_log
    from stream_detector.core.pipeline import DetectionSettings
    from stream_detector.core.scorer import Scorer
    from stream_detector.core.thresholds import ThresholdParams

    lines, kinds = make_log(11, 40, {"unknown": 4, "truncated": 4}, spacing=30)
    lines.insert(5, "garbage that no parser reads")
    data = tmp_path / "stream.log"
    data.write_text("\n".join(lines) + "\n")
    bundle = load_bundle(tiny_bundle)
    spec = load_log_spec(bundle)
    settings = DetectionSettings(idle_timeout_ms=None, threshold=ThresholdParams(warmup=1000, history=1000), alerts=AlertParams())
    s = replay_log(bundle, spec, Scorer(bundle, provider="cpu", intra_op_threads=1), settings, data, tmp_path / "out", batch_lines=64)
    assert s.dead == 1 and s.entities == 48
    dead = [orjson.loads(x) for x in (tmp_path / "out" / "dead_letters.jsonl").read_bytes().splitlines()]
    assert dead == [{"row": 5, "reason": dead[0]["reason"]}] and "does not match" in dead[0]["reason"]
    alerts = [orjson.loads(x) for x in (tmp_path / "out" / "alerts.jsonl").read_bytes().splitlines()]
    opened = {a["key"]: a for a in alerts if a["state"] == "open"}
    unknown = {b for b, k in kinds.items() if k == "unknown"}
    assert unknown <= set(opened)
    for b in unknown:
        a = opened[b]
        assert a["log"]["template"] == "<unknown template>" and a["log"]["template_id"] == 0
        assert "writeBlock" in a["log"]["line"] and b in a["log"]["line"]
        assert a["schema"] == "stream-detector.alert/1" and a["top_features"][0]["name"] == "template@t"
    truncated = {b for b, k in kinds.items() if k == "truncated"}
    # a truncated block is judged when its session times out (600 s): by its end row, not a line
    ended = {b for b in truncated if b in opened and opened[b]["log"]["row"] == "session-end"}
    assert ended, "no truncated block was caught by its session-end row"
    # session-level figures from entities.csv
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("BlockId,Label\n" + "".join(f"{b},{'Normal' if k == 'normal' else 'Anomaly'}\n" for b, k in kinds.items()))
    m = session_metrics(read_entities(tmp_path / "out" / "entities.csv"), read_entity_labels(labels_csv))
    assert m["entities"] == 48 and m["anomalous"] == 8
    assert m["tp"] >= 4 + len(ended)
    assert m["time_to_detect_s"]["at_first_line"] >= 0


def test_session_metrics_by_hand():
    dec = EntityDecisions(
        keys=["a", "b", "c", "d", "e"],
        first_ms=np.array([0, 1000, 2000, 3000, 9000]),
        alerted=np.array([True, True, False, True, True]),
        first_alert_ms=np.array([4000, 1000, -1, 13000, 9500]),
        max_score=np.array([9.0, 5.0, 1.0, 7.0, 8.0]),
    )
    labels = {"a": True, "b": False, "c": True, "d": True, "e": False}
    m = session_metrics(dec, labels)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 2, 1)
    assert m["precision"] == 0.5 and m["recall"] == round(2 / 3, 4) and m["f1"] == round(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3), 4)
    assert m["time_to_detect_s"]["median"] == 7.0  # a: 4 s, d: 10 s
    # ranked by max score: a(+) e(-) d(+) b(-) c(+): AP = (1/1 + 2/3 + 3/5) / 3
    assert m["average_precision"] == round((1 + 2 / 3 + 3 / 5) / 3, 4)
    only_late = session_metrics(dec, labels, start_after_ms=2500)
    assert only_late["entities"] == 2 and (only_late["tp"], only_late["fp"]) == (1, 1)


def test_evaluate_sessions_cli(tmp_path, capsys):
    from stream_detector.cli import main

    ent = tmp_path / "entities.csv"
    ent.write_text("key,first_ms,last_ms,lines,alerted,first_alert_ms,first_alert_template,max_score\n"
                   'a,0,5,3,1,2000,"<unknown template>",9\nb,0,5,3,0,,"",1\nc,0,5,3,1,0,"x",8\n')
    labels = tmp_path / "labels.csv"
    labels.write_text("BlockId,Label\na,Anomaly\nb,Anomaly\nc,Normal\n")
    assert main(["evaluate", "--sessions", "--scores", str(ent), "--labels", str(labels)]) == 0
    m = orjson.loads((tmp_path / "session_metrics.json").read_bytes())
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 1) and m["time_to_detect_s"]["median"] == 2.0
    labels.write_text("BlockId,Label\na,Anomaly\n")  # b and c have no label
    assert main(["evaluate", "--sessions", "--scores", str(ent), "--labels", str(labels)]) == 2
    assert "2 evaluated entities have no label" in capsys.readouterr().err
