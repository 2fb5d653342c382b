"""scoresfile.py: the one scores.csv writer (replay and the log replay) and reader (evaluate) —
awkward keys round-trip, the log rows' extra columns come after the common six (and evaluate reads a
log replay per line), and a write is atomic: a failure half way leaves the existing file as it was
and no temporary file behind."""

from __future__ import annotations

import csv
import math

import numpy as np
import orjson
import pytest

from bundle_factory import make_bundle
from stream_detector.cli import main
from stream_detector.offline import evaluate as ev
from stream_detector.offline.scoresfile import COLUMNS, LOG_COLUMNS, read_scores, write_scores

AWKWARD = ["plain", "comma,key", 'quote"key', "line\nbreak", "cr\r\nlf", ' "all, three"\n ']


def test_awkward_keys_round_trip_through_the_writer_and_evaluates_reader(tmp_path):
    n = len(AWKWARD)
    score = np.array([0.5, np.nan, 1.25, 3e-9, 7.0, 123456.789], dtype=np.float32)
    threshold = np.where(np.isnan(score), np.nan, 1.0)
    alert = np.array([0, 0, 1, 1, 0, 1], dtype=bool)
    event = ["", None, "open", "", "resolved", "update"]
    write_scores(tmp_path / "scores.csv", np.arange(n), AWKWARD, score, threshold, alert, event)

    table = ev.read_scores(tmp_path / "scores.csv")
    assert table.key == AWKWARD
    assert table.row.tolist() == list(range(n))
    np.testing.assert_allclose(table.score, score.astype(np.float64), rtol=1e-6)  # %.7g of a float32
    assert math.isnan(table.score[1]) and math.isnan(table.threshold[1])
    assert table.alert.tolist() == alert.tolist() and table.event == ["", "", "open", "", "resolved", "update"]
    # any CSV reader agrees; the header is the documented one
    with open(tmp_path / "scores.csv", newline="", encoding="utf-8") as f:
        recs = list(csv.reader(f))
    assert tuple(recs[0]) == COLUMNS == ("row", "key", "score", "threshold", "alert", "event")
    assert [r[1] for r in recs[1:]] == AWKWARD
    # and evaluate keeps them apart as series
    (tmp_path / "labels.txt").write_text("0\n0\n1\n1\n0\n0\n")
    series = ev.build_series(table, ev.read_labels(tmp_path / "labels.txt", n))
    assert [s.key for s in series] == AWKWARD


def test_log_rows_put_their_extra_columns_after_the_common_six(tmp_path):
    path = tmp_path / "scores.csv"
    keys = ["blk,1", "blk,1", 'blk"2']
    write_scores(path, [0, -1, 1], keys, [0.25, 2.0, 0.5], [1.0, 1.0, 1.0], [False, True, False], [None, "open", None],
                 extra=dict(zip(LOG_COLUMNS, (["line", "session-end", "line"], [3, 7, 0]))))
    with open(path, newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == [*COLUMNS, "kind", "template_id"]
    table = read_scores(path)
    assert table.key == keys and table.row.tolist() == [0, -1, 1] and table.event == ["", "open", ""]
    assert table.extra == {"kind": ["line", "session-end", "line"], "template_id": ["3", "7", "0"]}
    # a row-level evaluation of a log replay is per line: the session-end row is left out
    lines = ev.read_scores(path)
    assert lines.row.tolist() == [0, 1] and lines.key == ["blk,1", 'blk"2'] and lines.extra["kind"] == ["line", "line"]
    # the same rows without the log columns are no log replay: the negative row is refused in one sentence
    write_scores(path, [0, -1, 1], keys, [0.25, 2.0, 0.5], [1.0, 1.0, 1.0], [False, True, False], [None, "open", None])
    with pytest.raises(ev.EvaluationError, match="negative row numbers") as e:
        ev.read_scores(path)
    assert "\n" not in str(e.value)


def test_writer_refuses_mismatched_columns(tmp_path):
    with pytest.raises(ValueError, match="same length"):
        write_scores(tmp_path / "s.csv", [0, 1], ["a"], [0.1, 0.2], [1, 1], [0, 0], ["", ""])
    with pytest.raises(ValueError, match="reuse"):
        write_scores(tmp_path / "s.csv", [0], ["a"], [0.1], [1], [0], [""], extra={"score": [1]})
    assert list(tmp_path.iterdir()) == []


class _Boom:
    """A key that fails when written: checks, at that moment, that the destination is untouched."""

    def __init__(self, path, before):
        self.path, self.before = path, before

    def __str__(self):
        assert self.path.read_bytes() == self.before, "the destination was written before the end"
        raise RuntimeError("disk on fire")


def test_a_failed_write_leaves_the_existing_file_as_it_was(tmp_path):
    path = tmp_path / "scores.csv"
    n = 50_000  # well past the file buffer: part of the new file is on disk when the write fails
    write_scores(path, np.arange(n), [f"k{i % 7}" for i in range(n)], np.linspace(0, 1, n), np.ones(n), np.zeros(n, bool), [""] * n)
    before = path.read_bytes()
    keys: list[object] = [f"new{i}" for i in range(n)]
    keys[n - 10] = _Boom(path, before)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_scores(path, np.arange(n), keys, np.zeros(n), np.ones(n), np.ones(n, bool), ["open"] * n)  # type: ignore[arg-type]
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv"]  # no temporary file left behind
    # a write that succeeds replaces the file whole, again without leftovers
    write_scores(path, [0], ["only"], [0.5], [1.0], [True], ["open"])
    assert path.read_text() == "row,key,score,threshold,alert,event\n0,only,0.5,1,1,open\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv"]


def test_replay_then_evaluate_with_a_comma_and_a_quote_in_the_keys(tmp_path, rng):
    b = make_bundle(tmp_path, features=["a", "b", "c"], window=6, threshold=12.0)
    names = ["m,0", 'm"1']
    with open(tmp_path / "in.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["entity", "a", "b", "c"])
        for t in range(60):
            for name in names:
                w.writerow([name, *rng.normal(size=3)])
    out = tmp_path / "out"
    assert main(["replay", "--model", str(b.path), "--input", str(tmp_path / "in.csv"), "--out", str(out), "--model.provider", "cpu"]) == 0
    (tmp_path / "labels.txt").write_text("0\n" * 120)
    table = ev.read_scores(out / "scores.csv")
    assert table.key == names * 60 and table.row.tolist() == list(range(120))
    assert main(["evaluate", "--scores", str(out / "scores.csv"), "--labels", str(tmp_path / "labels.txt"), "--no-plots"]) == 0
    metrics = orjson.loads((out / "metrics.json").read_bytes())
    assert sorted(metrics["per_series"]) == sorted(names)


def test_evaluate_scores_a_log_replay_per_line(tmp_path):
    """Per-line labels of the log file: a line naming two entities is a row in each entity's series;
    start and idle-check rows are left out; the labels may run past the last scored line (its last
    lines did not parse)."""
    path = tmp_path / "scores.csv"
    rows = [-1, 0, 1, -1, 1, 2, 3, -1, 4]
    keys = ["a", "a", "a", "b", "b", "b", "a", "b", "b"]
    kinds = ["session-start", "line", "line", "session-start", "line", "line", "line", "idle-check", "line"]
    score = [0, 0.1, 9.0, 0, 9.0, 0.2, 0.1, 5.0, 0.1]
    alert = [0, 0, 1, 0, 1, 0, 0, 1, 0]
    event = [None, None, "open", None, "open", "resolved", "resolved", "open", None]
    write_scores(path, rows, keys, score, [1.0] * 9, alert, event, extra=dict(zip(LOG_COLUMNS, (kinds, [0] * 9))))
    (tmp_path / "labels.txt").write_text("0\n1\n0\n0\n0\n0\n0\n")  # 7 lines in the log, line 1 (both a and b) anomalous
    evaluation, series = ev.evaluate_files(path, tmp_path / "labels.txt")
    assert evaluation.info["rows"] == 6 and evaluation.info["anomalous_rows"] == 2 and "log lines" in evaluation.info["rows_are"]
    assert {s.key: s.rows.tolist() for s in series} == {"a": [0, 1, 3], "b": [1, 2, 4]}
    e = evaluation.overall["event"]
    assert e["incidents"] == 2 and e["incidents_alerted"] == 2 and e["false_episodes"] == 0  # the idle-check alert is no line
    (tmp_path / "ranges.txt").write_text("1-2\n9-12\n")  # ranges may go past the scored lines too
    assert ev.evaluate_files(path, tmp_path / "ranges.txt")[0].info["anomalous_rows"] == 2
    (tmp_path / "short.txt").write_text("0\n1\n")
    with pytest.raises(ev.EvaluationError, match="has 2 rows but the scores cover 5 rows"):
        ev.evaluate_files(path, tmp_path / "short.txt")
