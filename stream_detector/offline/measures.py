"""Detection-quality measures on plain arrays, shared by `evaluate` (rows of scores.csv) and
`logeval` (one entity per element). Pure functions of numpy arrays: no files, no settings.

Conventions, the same for every function here:
- Argument order: labels (ground truth, bool) first, then the scores or the predictions, as in
  scikit-learn's `average_precision_score(y_true, y_score)`.
- A figure that is undefined (no positive labels; no predicted rows for a precision) is None, never
  0 or NaN; F1 is None when recall is undefined and 0 when only precision is (nothing predicted).
- Where a function takes `labels`/`scores` as "one array or a list of arrays", a list is several
  series pooled into one figure; runs (incidents, VUS buffers) never cross from one series to the
  next.

Threshold-free figures rank by score with ONE tie rule: every distinct score value is one threshold
and all rows with that score are predicted together (`score >= threshold`), so rows with equal
scores never count in a favourable or unfavourable order and the result does not depend on the
order of the input. This is scikit-learn's rule for `average_precision_score` and
`precision_recall_curve`; the VUS-PR helpers use the same thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

Arrays = Sequence[np.ndarray] | np.ndarray


def segments(mask: np.ndarray) -> np.ndarray:
    """Maximal runs of True as an int64 array [k, 2] of inclusive (start, end)."""
    m = np.asarray(mask, dtype=bool)
    d = np.diff(np.concatenate(([0], m.view(np.int8), [0])))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1) - 1
    return np.stack([starts, ends], axis=1).astype(np.int64)


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den > 0 else None


def _f1(precision: float | None, recall: float | None) -> float | None:
    """Harmonic mean; with no positives it is undefined (None), with no predictions it is 0."""
    if recall is None:
        return None
    if precision is None or precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def point_metrics(labels: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """Precision, recall and F1 of boolean predictions against boolean labels, element by element,
    with the counts: {precision, recall, f1, tp, fp, fn} (undefined figures None, see above)."""
    y = np.asarray(labels, dtype=bool)
    p = np.asarray(predicted, dtype=bool)
    tp = int(np.sum(y & p))
    fp = int(np.sum(~y & p))
    fn = int(np.sum(y & ~p))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall), "tp": tp, "fp": fp, "fn": fn}


def average_precision(labels: Arrays, scores: Arrays) -> float | None:
    """Average precision (AUC-PR, non-interpolated): sum over the distinct score values t, highest
    first, of (R(t) - R(t_prev)) * P(t), where the rows predicted at t are those with score >= t
    (all tied rows together: the module's tie rule, scikit-learn's `average_precision_score`).
    Labels first, then scores; None without positives."""
    y = np.concatenate([np.asarray(v, dtype=bool) for v in _as_list(labels)])
    s = np.concatenate([np.asarray(v, dtype=np.float64) for v in _as_list(scores)])
    n_pos = int(y.sum())
    if n_pos == 0:
        return None
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last_of_tie = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    tp = np.cumsum(y_sorted)[last_of_tie]
    n_pred = last_of_tie + 1
    precision = tp / n_pred
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


# ---------------------------------------------------------------------------------------------
# VUS-PR (Paparrizos et al., VLDB 2022)


def buffered_labels(labels: np.ndarray, buffer: int) -> np.ndarray:
    """Range-aware labels of VUS (Paparrizos et al. 2022): 1 inside an incident; within
    floor(l/2) rows before its start or after its end, at distance d, sqrt(1 - d/l); 0 elsewhere
    (overlapping buffers add up, capped at 1)."""
    soft = np.asarray(labels, dtype=np.float64).copy()
    half = buffer // 2
    if half == 0:
        return soft
    n = soft.size
    d = np.arange(1, half + 1)
    w = np.sqrt(1.0 - d / buffer)
    for s, e in segments(labels):
        after = e + d
        ok = after < n
        soft[after[ok]] += w[ok]
        before = s - d
        ok = before >= 0
        soft[before[ok]] += w[ok]
    return np.minimum(soft, 1.0)


def range_pr_auc(labels: Arrays, scores: Arrays, buffer: int, n_thresholds: int | None = None) -> float | None:
    """Range-AUC-PR for one buffer length l (Paparrizos et al. 2022, as in their reference code):
    with soft labels b (`buffered_labels`) and P the number of anomalous rows, at threshold t
    TP = sum b[score >= t], precision = TP / #(score >= t), recall = min(1, TP / ((P + sum b) / 2))
    times the fraction of buffered ranges (maximal runs of b > 0) holding at least one predicted row;
    the area is the trapezoid rule over thresholds from (recall 0, precision 1). Several series are
    buffered separately and pooled. Thresholds: every distinct score, or `n_thresholds` scores at
    evenly spaced ranks like the reference code. None without positives."""
    ys = [np.asarray(v, dtype=bool) for v in _as_list(labels)]
    ss = [np.asarray(v, dtype=np.float64) for v in _as_list(scores)]
    n_pos = sum(int(y.sum()) for y in ys)
    if n_pos == 0:
        return None
    soft_parts, range_ids, offset = [], [], 0
    for y in ys:
        b = buffered_labels(y, buffer)
        ids = np.full(y.size, -1, dtype=np.int64)
        runs = segments(b > 0)
        for j, (s, e) in enumerate(runs):
            ids[s : e + 1] = offset + j
        offset += len(runs)
        soft_parts.append(b)
        range_ids.append(ids)
    soft = np.concatenate(soft_parts)
    ids = np.concatenate(range_ids)
    score = np.concatenate(ss)
    n_ranges = offset

    order = np.argsort(-score, kind="stable")
    s_sorted = score[order]
    if n_thresholds is None:
        thresholds = s_sorted[np.r_[True, s_sorted[1:] != s_sorted[:-1]]]
    else:
        thresholds = s_sorted[np.linspace(0, score.size - 1, n_thresholds).astype(int)]
    # rows predicted at threshold t: all with score >= t, i.e. a prefix of the sorted order
    n_pred = np.searchsorted(-s_sorted, -thresholds, side="right")
    tp = np.cumsum(soft[order])[n_pred - 1]
    p_new = (n_pos + soft.sum()) / 2.0
    recall = np.minimum(tp / p_new, 1.0)
    range_max = np.full(n_ranges, -np.inf)
    inside = ids >= 0
    np.maximum.at(range_max, ids[inside], score[inside])
    range_max.sort()
    existence = (n_ranges - np.searchsorted(range_max, thresholds, side="left")) / n_ranges
    tpr = np.r_[0.0, recall * existence]
    precision = np.r_[1.0, tp / n_pred]
    return float(np.sum(np.diff(tpr) * (precision[1:] + precision[:-1]) / 2.0))


def vus_pr(labels: Arrays, scores: Arrays, max_buffer: int, n_thresholds: int | None = None) -> float | None:
    """VUS-PR: the mean of `range_pr_auc` over buffer lengths l = 0, 1, ..., max_buffer."""
    values: list[float] = []
    for buffer in range(max_buffer + 1):
        value = range_pr_auc(labels, scores, buffer, n_thresholds)
        if value is None:  # no positives: the same for every buffer
            return None
        values.append(value)
    return float(np.mean(values))


# ---------------------------------------------------------------------------------------------
# Incidents and alert episodes (DESIGN.md contract 4)


def point_adjust(labels: np.ndarray, predicted: np.ndarray, k_percent: float = 0.0) -> np.ndarray:
    """Point adjustment: every row of an incident counts as predicted when more than k_percent %
    of its rows were predicted (k = 0: classic PA, any one row; PA%K of Kim et al. 2022)."""
    y = np.asarray(labels, dtype=bool)
    out = np.asarray(predicted, dtype=bool).copy()
    for s, e in segments(y):
        if out[s : e + 1].mean() > k_percent / 100.0:
            out[s : e + 1] = True
    return out


def episode_overlap(incidents: np.ndarray, episodes: np.ndarray, tolerance: int) -> np.ndarray:
    """[episodes, incidents] bool: the episode (start, end) comes within `tolerance` rows of the
    incident (both from `segments`)."""
    if not (len(incidents) and len(episodes)):
        return np.zeros((len(episodes), len(incidents)), dtype=bool)
    overlap: np.ndarray = (episodes[:, 0][:, None] <= incidents[:, 1][None, :] + tolerance) & (
        episodes[:, 1][:, None] >= incidents[:, 0][None, :] - tolerance
    )
    return overlap


def event_metrics(labels: np.ndarray, alerted: np.ndarray, tolerance: int) -> dict[str, Any]:
    """Contract-4 counts for one series: incidents (label runs), alert episodes (alerted runs), an
    episode overlapping an incident when it comes within `tolerance` rows of it; incidents alerted,
    false episodes (overlapping none), delays (rows from an incident's start to the first row of an
    overlapping episode, 0 when one was already open) and the missed incidents' (start, end)."""
    incidents = segments(labels)
    episodes = segments(alerted)
    overlap = episode_overlap(incidents, episodes, tolerance)
    detected: np.ndarray = np.any(overlap, axis=0)  # (numpy's stubs type the method form as maybe a scalar)
    false_episodes = int(np.sum(~overlap.any(axis=1)))
    delays = []
    for i in np.flatnonzero(detected):
        first = episodes[overlap[:, i], 0].min()
        delays.append(int(max(0, first - incidents[i, 0])))
    return {
        "incidents": int(len(incidents)),
        "incidents_alerted": int(detected.sum()),
        "episodes": int(len(episodes)),
        "false_episodes": false_episodes,
        "delays": delays,
        "missed": [[int(s), int(e)] for (s, e), hit in zip(incidents, detected) if not hit],
    }


def summarise_events(counts: dict[str, Any]) -> dict[str, Any]:
    """Event recall = incidents alerted / incidents; alert precision = incidents alerted /
    (incidents alerted + false episodes); their F1; mean and median delay."""
    alerted, incidents, false_eps = counts["incidents_alerted"], counts["incidents"], counts["false_episodes"]
    recall = _ratio(alerted, incidents)
    precision = _ratio(alerted, alerted + false_eps)
    delays = counts["delays"]
    return {
        "incidents": incidents,
        "incidents_alerted": alerted,
        "episodes": counts["episodes"],
        "false_episodes": false_eps,
        "recall": recall,
        "alert_precision": precision,
        "f1": _f1(precision, recall),
        "delay_mean": float(np.mean(delays)) if delays else None,
        "delay_median": float(np.median(delays)) if delays else None,
    }


def _as_list(v: Arrays) -> list[np.ndarray]:
    if isinstance(v, np.ndarray) and v.ndim == 1:
        return [v]
    return list(v)
