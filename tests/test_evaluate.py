"""`stream-detector evaluate`: every metric on small hand-made cases whose values are worked out
by hand in the comments, plus the file formats, unscored rows, series separation and the CLI."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from stream_detector.offline import evaluate as ev
from stream_detector.cli import main


def _mask(n: int, *ranges: tuple[int, int]) -> np.ndarray:
    """Inclusive (start, end) ranges to a bool mask."""
    m = np.zeros(n, dtype=bool)
    for s, e in ranges:
        m[s : e + 1] = True
    return m


# ---------------------------------------------------------------------------------- AUC-PR


def test_average_precision_by_hand():
    labels = np.array([0, 1, 1, 0, 0, 1], dtype=bool)
    scores = np.array([0.1, 0.9, 0.4, 0.5, 0.2, 0.8])
    # descending: .9(+) .8(+) .5(-) .4(+) ...; P=3
    # (R, P): (1/3, 1) (2/3, 1) (2/3, 2/3) (1, 3/4)  ->  AP = 1/3 + 1/3 + 0 + 1/3 * 3/4 = 11/12
    assert ev.average_precision(labels, scores) == pytest.approx(11 / 12)


def test_average_precision_ties_and_no_positives():
    # one threshold 0.5 predicts the two tied rows: P = 1/2, R = 1
    assert ev.average_precision(np.array([1, 0, 0], bool), np.array([0.5, 0.5, 0.1])) == pytest.approx(0.5)
    assert ev.average_precision(np.zeros(4, bool), np.arange(4.0)) is None


# ---------------------------------------------------------------------------------- VUS-PR

# incident at rows 1..2 of 6
B_LABELS = np.array([0, 1, 1, 0, 0, 0], dtype=bool)
B_SCORES = np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.0])
# buffer 0: soft labels = labels, P_new = 2, one range, existence 1 once row 1 is predicted.
# thresholds .9 .8 .3 .2 .1 .0 -> TPR .5 .5 .5 1 1 1; precision 1 1/2 1/3 1/2 2/5 1/3
# trapezoid from (0, 1): .5 * (1 + 1)/2 + .5 * (1/3 + 1/2)/2 = 1/2 + 5/24 = 17/24
B_L0 = 17 / 24
# buffer 2: floor(2/2) = 1 row each side gets sqrt(1 - 1/2) = s: soft = [s, 1, 1, s, 0, 0]
S = math.sqrt(0.5)
P_NEW = (2 + (2 + 2 * S)) / 2  # (P + sum(soft)) / 2
# thresholds: .9 -> TP 1; .8 -> TP 1+s (row 3); .3 -> same; .2 -> TP 2+s (capped recall 1); ...
_R1, _R2 = 1 / P_NEW, (1 + S) / P_NEW
_P1, _P2, _P3, _P4 = 1.0, (1 + S) / 2, (1 + S) / 3, (2 + S) / 4
B_L2 = _R1 * (1 + _P1) / 2 + (_R2 - _R1) * (_P1 + _P2) / 2 + (1 - _R2) * (_P3 + _P4) / 2


def test_buffered_labels_by_hand():
    soft = ev.buffered_labels(B_LABELS, 2)
    np.testing.assert_allclose(soft, [S, 1, 1, S, 0, 0])
    # l = 5: floor(5/2) = 2 rows each side, sqrt(1 - 1/5), sqrt(1 - 2/5); clipped at the series' ends
    soft = ev.buffered_labels(np.array([0, 0, 0, 1, 0, 0, 0, 0], bool), 5)
    a, b = math.sqrt(0.8), math.sqrt(0.6)
    np.testing.assert_allclose(soft, [0, b, a, 1, a, b, 0, 0])
    # buffers that overlap add up and are capped at 1
    soft = ev.buffered_labels(np.array([1, 0, 1], bool), 2)
    np.testing.assert_allclose(soft, [1, 1, 1])


def test_range_pr_auc_by_hand():
    assert ev.range_pr_auc(B_LABELS, B_SCORES, 0) == pytest.approx(B_L0)
    assert ev.range_pr_auc(B_LABELS, B_SCORES, 1) == pytest.approx(B_L0)  # floor(1/2) = 0: no buffer
    assert ev.range_pr_auc(B_LABELS, B_SCORES, 2) == pytest.approx(B_L2)
    # l = 0 is not average precision: trapezoid instead of steps (AP here is .5 + .5 * .5 = .75)
    assert ev.average_precision(B_LABELS, B_SCORES) == pytest.approx(0.75)


def test_vus_pr_is_the_mean_over_buffers():
    assert ev.vus_pr(B_LABELS, B_SCORES, 2) == pytest.approx((B_L0 + B_L0 + B_L2) / 3)
    assert ev.vus_pr(np.zeros(6, bool), B_SCORES, 2) is None


def test_range_pr_auc_existence_factor_by_hand():
    # incidents 0..1 and 4..4; P = 3; buffer 0
    labels = np.array([1, 1, 0, 0, 1, 0], bool)
    scores = np.array([0.9, 0.1, 0.2, 0.3, 0.05, 0.0])
    # .9: TP1 recall 1/3, 1 of 2 ranges -> TPR 1/6, prec 1
    # .3, .2: precision 1/2, 1/3
    # .1: TP2 recall 2/3 * 1/2 = 1/3, prec 1/2
    # .05: TP3 recall 1 * 1 = 1, prec 3/5; .0: prec 1/2
    # area: 1/6 * 1 + 1/6 * (1/3 + 1/2)/2 + 2/3 * (1/2 + 3/5)/2 = 217/360
    assert ev.range_pr_auc(labels, scores, 0) == pytest.approx(217 / 360)


def _reference_range_pr_auc(labels, scores, buffer, n_thresholds):
    """Straight from the definition, one threshold at a time (as the published reference code)."""
    soft = ev.buffered_labels(labels, buffer)
    ranges = ev.segments(soft > 0)
    p_new = (labels.sum() + soft.sum()) / 2
    desc = -np.sort(-scores)
    tpr, prec = [0.0], [1.0]
    for i in np.linspace(0, len(scores) - 1, n_thresholds).astype(int):
        pred = scores >= desc[i]
        product = soft * pred
        tp = product.sum()
        exist = sum(product[s : e + 1].sum() > 0 for s, e in ranges) / len(ranges)
        tpr.append(min(tp / p_new, 1) * exist)
        prec.append(tp / pred.sum())
    tpr, prec = np.array(tpr), np.array(prec)
    return float(np.sum(np.diff(tpr) * (prec[1:] + prec[:-1]) / 2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_range_pr_auc_matches_a_per_threshold_loop(seed):
    rng = np.random.default_rng(seed)
    n = 400
    labels = np.zeros(n, bool)
    for s in rng.choice(n - 30, size=4, replace=False):
        labels[s : s + rng.integers(1, 25)] = True
    scores = rng.random(n) + 0.8 * labels + rng.integers(0, 3, n) * 0.1  # ties included
    scores = np.round(scores, 2)
    for buffer in (0, 3, 10, 40):
        fast = ev.range_pr_auc(labels, scores, buffer, n_thresholds=250)
        assert fast == pytest.approx(_reference_range_pr_auc(labels, scores, buffer, 250), rel=1e-12), (seed, buffer)
    # every distinct score as a threshold is the same curve sampled everywhere: close to 250 samples
    assert ev.vus_pr(labels, scores, 20) == pytest.approx(ev.vus_pr(labels, scores, 20, 250), abs=0.03)


def test_vus_pools_series_without_crossing_them():
    # one incident at the end of series a, one at the start of series b; a false row (score .5) between
    a = np.array([0, 0, 0, 1], bool)
    b = np.array([1, 0, 0, 0], bool)
    sa = np.array([0.5, 0.2, 0.3, 0.9])
    sb = np.array([0.4, 0.3, 0.2, 0.1])
    # pooled, buffer 0: P_new = 2, two ranges. .9: TP1 recall 1/2 * existence 1/2 = 1/4, prec 1;
    # .5: prec 1/2; .4: TP2, TPR 1, prec 2/3  ->  1/4 + 3/4 * (1/2 + 2/3)/2 = 11/16
    assert ev.range_pr_auc([a, b], [sa, sb], 0) == pytest.approx(11 / 16)
    # concatenated, the two incidents would merge into one range: existence 1 at once -> 19/24
    assert ev.range_pr_auc(np.r_[a, b], np.r_[sa, sb], 0) == pytest.approx(19 / 24)
    # buffer 4: floor(4/2) = 2 rows each side, sqrt(1 - 1/4) then sqrt(1 - 2/4); nothing past a series' end
    np.testing.assert_allclose(ev.buffered_labels(a, 4), [0, math.sqrt(0.5), math.sqrt(0.75), 1])


# ---------------------------------------------------------------------------------- events

D_N = 100
D_LABELS = _mask(D_N, (10, 19), (40, 44), (70, 72))
# a fragmented true alert inside incident 1, one just after incident 2, two false episodes
D_ALERTS = _mask(D_N, (12, 15), (17, 18), (47, 48), (60, 61), (90, 90))


def test_event_metrics_by_hand():
    c = ev.summarise_events(ev.event_metrics(D_LABELS, D_ALERTS, tolerance=3))
    # incident 1 alerted twice (counts once), incident 2 within 3 rows (44 + 3 >= 47), incident 3 missed
    assert (c["incidents"], c["incidents_alerted"], c["episodes"], c["false_episodes"]) == (3, 2, 5, 2)
    assert c["recall"] == pytest.approx(2 / 3)
    assert c["alert_precision"] == pytest.approx(2 / 4)  # alerted / (alerted + false episodes)
    assert c["f1"] == pytest.approx(4 / 7)
    # delays: 12 - 10 = 2 and 47 - 40 = 7
    assert c["delay_mean"] == pytest.approx(4.5) and c["delay_median"] == pytest.approx(4.5)

    strict = ev.summarise_events(ev.event_metrics(D_LABELS, D_ALERTS, tolerance=0))
    assert (strict["incidents_alerted"], strict["false_episodes"]) == (1, 3)
    assert strict["alert_precision"] == pytest.approx(1 / 4) and strict["delay_median"] == pytest.approx(2)


def test_fragmenting_a_true_alert_neither_helps_nor_hurts():
    one = ev.summarise_events(ev.event_metrics(D_LABELS, _mask(D_N, (12, 18)), 0))
    many = ev.summarise_events(ev.event_metrics(D_LABELS, _mask(D_N, (12, 12), (14, 14), (16, 18)), 0))
    assert one["alert_precision"] == many["alert_precision"] == 1.0
    assert one["recall"] == many["recall"] == pytest.approx(1 / 3)


def test_alert_already_open_at_the_start_has_zero_delay_and_no_alerts_is_zero_f1():
    c = ev.summarise_events(ev.event_metrics(_mask(20, (5, 9)), _mask(20, (3, 6)), 0))
    assert c["delay_median"] == 0 and c["false_episodes"] == 0
    c = ev.summarise_events(ev.event_metrics(_mask(20, (5, 9)), np.zeros(20, bool), 0))
    assert c["recall"] == 0 and c["alert_precision"] is None and c["f1"] == 0


# ---------------------------------------------------------------------------------- point-wise, PA


def test_point_metrics_by_hand():
    m = ev.point_metrics(D_LABELS, D_ALERTS)
    # alerted rows 4+2+2+2+1 = 11, of which 6 labelled; 18 labelled rows
    assert (m["tp"], m["fp"], m["fn"]) == (6, 5, 12)
    assert m["precision"] == pytest.approx(6 / 11) and m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(12 / 29)  # 2TP / (2TP + FP + FN)


def test_point_adjustment_inflates_f1_where_plain_metrics_do_not():
    n = 1000
    labels = _mask(n, (100, 199))
    alerts = _mask(n, (150, 150), (500, 504))  # one row hits a 100-row incident, five false rows
    scores = alerts.astype(float)
    plain = ev.point_metrics(labels, alerts)
    assert plain["f1"] == pytest.approx(2 / 106)  # TP 1, FP 5, FN 99
    pa = ev.point_metrics(labels, ev.point_adjust(labels, alerts))
    assert pa["f1"] == pytest.approx(200 / 205)  # TP 100, FP 5, FN 0
    # PA%20 does not adjust: 1% of the incident was alerted
    assert ev.point_metrics(labels, ev.point_adjust(labels, alerts, 20))["f1"] == pytest.approx(2 / 106)
    # threshold-free: (R, P) = (.01, 1/6) then (1, .1): AP = .01/6 + .99 * .1
    assert ev.average_precision(labels, scores) == pytest.approx(0.01 / 6 + 0.99 * 0.1)
    # the event view: caught (recall 1) but one false page out of two episodes
    c = ev.summarise_events(ev.event_metrics(labels, alerts, 0))
    assert c["recall"] == 1 and c["alert_precision"] == pytest.approx(0.5)


def test_pa_percent_k_by_hand():
    labels = _mask(20, (0, 9))
    alerts = _mask(20, (2, 4))  # 30% of the incident
    f1 = lambda k: ev.point_metrics(labels, ev.point_adjust(labels, alerts, k))["f1"]  # noqa: E731
    assert f1(0) == pytest.approx(1.0)
    assert f1(20) == pytest.approx(1.0)  # 30% > 20%
    assert f1(50) == pytest.approx(6 / 13)  # not adjusted: TP 3, FN 7
    # exactly 20% is not "more than 20%"
    assert ev.point_metrics(labels, ev.point_adjust(labels, _mask(20, (2, 3)), 20))["f1"] == pytest.approx(4 / 12)


# ---------------------------------------------------------------------------------- files and series


def _write_scores(path, rows):
    lines = ["row,key,score,threshold,alert,event"]
    lines += [",".join(str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def test_unscored_rows_are_forward_filled_per_series(tmp_path):
    # two interleaved entities; rows 2, 4 (entity a) and 3 (entity b) labelled
    _write_scores(
        tmp_path / "scores.csv",
        [
            (0, "a", "", "", 0, ""),
            (1, "b", "", "", 0, ""),
            (2, "a", 0.5, 0.4, 1, "open"),
            (3, "b", 0.2, 0.4, 0, ""),
            (4, "a", "", "", 1, ""),
            (5, "b", 0.9, 0.4, 0, "open"),  # an instantaneous alert: alert column 0, event open
            (6, "a", 0.1, 0.4, 0, "resolved"),
            (7, "b", "", "", 0, ""),
        ],
    )
    (tmp_path / "labels.txt").write_text("0\n0\n1\n1\n1\n0\n0\n0\n")
    table = ev.read_scores(tmp_path / "scores.csv")
    series = ev.build_series(table, ev.read_labels(tmp_path / "labels.txt", 8))
    a, b = series
    assert a.key == "a" and b.key == "b"
    np.testing.assert_allclose(a.filled_score, [0.1, 0.5, 0.5, 0.1])  # lowest score in the file before the first
    np.testing.assert_allclose(b.filled_score, [0.1, 0.2, 0.9, 0.9])
    assert a.alerted.tolist() == [False, True, True, False]
    assert b.alerted.tolist() == [False, False, True, False]
    result = ev.evaluate_series(series, ev.EvaluationSettings(tolerance=0))
    e = result.overall["event"]
    # rows 2,3,4 would be one incident if the entities were not separated: here a has one, b has one
    assert e["incidents"] == 2 and e["incidents_alerted"] == 1 and e["false_episodes"] == 1
    assert result.info["unscored_rows"] == 4


def test_range_labels_match_per_row_labels(tmp_path):
    (tmp_path / "ranges.txt").write_text("2-5\n8-9:1,2,7\n")
    (tmp_path / "rows.txt").write_text("\n".join("1" if i in (2, 3, 4, 8) else "0" for i in range(12)) + "\n")
    np.testing.assert_array_equal(ev.read_labels(tmp_path / "ranges.txt", 12), ev.read_labels(tmp_path / "rows.txt", 12))


@pytest.mark.parametrize(
    "content, message",
    [
        ("0\n1\n", "has 2 rows but the scores cover 12"),
        ("3-2\n", "is empty"),
        ("5-40\n", "goes past"),
        ("hello\n", "neither a 0/1 label nor a range"),
    ],
)
def test_bad_labels_are_one_sentence(tmp_path, content, message):
    (tmp_path / "l.txt").write_text(content)
    with pytest.raises(ev.EvaluationError, match=message):
        ev.read_labels(tmp_path / "l.txt", 12)


def test_cli_writes_metrics_and_plots(tmp_path, capsys):
    rng = np.random.default_rng(7)
    n = 300
    labels = _mask(n, (100, 119), (200, 204))
    score = rng.random(n) * 0.2 + labels * rng.random(n)
    alert = _mask(n, (105, 112), (250, 251))
    rows = []
    for i in range(n):
        event = "open" if i in (105, 250) else ""
        rows.append((i, "m", "" if i < 10 else f"{score[i]:.6f}", "" if i < 10 else "0.5", int(alert[i]), event))
    _write_scores(tmp_path / "scores.csv", rows)
    (tmp_path / "labels.txt").write_text("\n".join(str(int(v)) for v in labels) + "\n")
    out = tmp_path / "out"
    rc = main(["evaluate", "--scores", str(tmp_path / "scores.csv"), "--labels", str(tmp_path / "labels.txt"), "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "VUS-PR" in text and "point-adjusted F1" in text
    metrics = orjson.loads((out / "metrics.json").read_bytes())
    e = metrics["overall"]["event"]
    assert (e["incidents"], e["incidents_alerted"], e["false_episodes"]) == (2, 1, 1)
    assert e["delay_median"] == 5
    assert metrics["unscored_rows"] == 10
    assert 0 < metrics["overall"]["vus_pr"] <= 1 and 0 < metrics["overall"]["auc_pr"] <= 1
    assert metrics["overall"]["point_adjusted"]["f1"] > metrics["overall"]["point"]["f1"]
    assert (out / "m.png").stat().st_size > 1000


def test_cli_bad_input_exit_2_one_sentence(tmp_path, capsys):
    (tmp_path / "scores.csv").write_text("a,b,c\n1,2,3\n")
    (tmp_path / "labels.txt").write_text("0\n")
    rc = main(["evaluate", "--scores", str(tmp_path / "scores.csv"), "--labels", str(tmp_path / "labels.txt")])
    captured = capsys.readouterr()
    assert rc == 2
    assert "does not start with the header" in captured.err and "Traceback" not in captured.err + captured.out
    rc = main(["evaluate", "--scores", str(tmp_path / "missing.csv"), "--labels", str(tmp_path / "labels.txt")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
