"""measures.py: the one average precision (and P/R/F1) both evaluations use — its tie rule and
argument order pinned on hand-worked examples, and logeval getting the same figure as evaluate."""

from __future__ import annotations

import numpy as np
import pytest

from stream_detector.offline import evaluate, logeval, measures
from stream_detector.offline.logeval import EntityDecisions, session_metrics

# six rows, three anomalous; three rows tie at 0.7 and two at 0.3
TIE_LABELS = np.array([1, 0, 1, 0, 1, 0], dtype=bool)
TIE_SCORES = np.array([0.9, 0.7, 0.7, 0.7, 0.3, 0.3])
# Worked by hand, one threshold per distinct score, all tied rows predicted together:
#   t = 0.9: predicted {0}          TP 1  P = 1/1  R = 1/3
#   t = 0.7: predicted {0,1,2,3}    TP 2  P = 2/4  R = 2/3
#   t = 0.3: predicted all six      TP 3  P = 3/6  R = 3/3
#   AP = (1/3 - 0) * 1 + (2/3 - 1/3) * 1/2 + (1 - 2/3) * 1/2 = 1/3 + 1/6 + 1/6 = 2/3
# (Ranking row by row in file order instead — the old logeval rule — would give
#  (1/1 + 2/3 + 3/5) / 3 = 34/45 here, and 1 or less depending on where the tied positives sit.)
TIE_AP = 2 / 3


def test_average_precision_counts_tied_scores_as_one_threshold():
    assert measures.average_precision(TIE_LABELS, TIE_SCORES) == pytest.approx(TIE_AP)


def test_average_precision_does_not_depend_on_the_order_of_tied_rows():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = rng.permutation(TIE_LABELS.size)
        assert measures.average_precision(TIE_LABELS[p], TIE_SCORES[p]) == pytest.approx(TIE_AP)


def test_average_precision_smallest_tie_by_hand():
    # two rows tie at 0.5, one of them anomalous: one threshold, P = 1/2, R = 1 -> AP = 1/2,
    # whichever of the two comes first (the old logeval gave 1 for [1, 0] and 1/2 for [0, 1])
    assert measures.average_precision(np.array([1, 0, 0], bool), np.array([0.5, 0.5, 0.1])) == pytest.approx(0.5)
    assert measures.average_precision(np.array([0, 1, 0], bool), np.array([0.5, 0.5, 0.1])) == pytest.approx(0.5)


def test_average_precision_argument_order_and_undefined():
    # labels first, then scores; a list of series is pooled
    assert measures.average_precision([TIE_LABELS[:3], TIE_LABELS[3:]], [TIE_SCORES[:3], TIE_SCORES[3:]]) == pytest.approx(TIE_AP)
    assert measures.average_precision(np.zeros(3, bool), np.array([0.1, 0.2, 0.3])) is None


def test_evaluate_and_logeval_share_one_implementation():
    assert evaluate.average_precision is measures.average_precision
    assert logeval.average_precision is measures.average_precision
    assert evaluate.point_metrics is measures.point_metrics


def test_session_average_precision_uses_the_tie_rule():
    # the tie example as six entities (max score = the score above): same figure, rounded to 4 digits
    keys = list("abcdef")
    dec = EntityDecisions(
        keys=keys,
        first_ms=np.zeros(6, dtype=np.int64),
        alerted=TIE_SCORES >= 0.7,
        first_alert_ms=np.where(TIE_SCORES >= 0.7, 0, -1),
        max_score=TIE_SCORES,
    )
    m = session_metrics(dec, {k: bool(v) for k, v in zip(keys, TIE_LABELS)})
    assert m["average_precision"] == round(TIE_AP, 4)
    # alerted a..d: TP 2 (a, c), FP 2 (b, d), FN 1 (e)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 2, 1)
    assert m["precision"] == 0.5 and m["recall"] == round(2 / 3, 4) and m["f1"] == round(4 / 7, 4)
    # no anomalous entity: AP undefined (NaN in session_metrics.json, as before)
    m = session_metrics(dec, {k: False for k in keys})
    assert np.isnan(m["average_precision"]) and m["recall"] == 0.0 and m["f1"] == 0.0


def test_prf_reports_undefined_figures_as_zero_like_before():
    nothing_flagged = logeval.prf(np.zeros(3, bool), np.array([1, 0, 0], bool))
    assert nothing_flagged == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": 1}
    # the same counts through the shared measure: precision undefined (None), F1 0
    m = measures.point_metrics(np.array([1, 0, 0], bool), np.zeros(3, bool))
    assert m["precision"] is None and m["recall"] == 0.0 and m["f1"] == 0.0
