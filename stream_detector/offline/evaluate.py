"""`stream-detector evaluate`: detection quality of replay's online scores and alerts against labels.

Everything is computed on what the service itself produced (`scores.csv` from `replay`, see
docs/architecture.md): causal scores and its own alerting decisions, never scores that saw the
future. How the figures are counted (DESIGN.md contract 4, docs/quality.md):

- Series: rows are grouped by `key`; each key is one series in `row` order. Incidents, alert
  episodes, buffers and point adjustment never cross series; pooled figures sum over series.
- Unscored rows (window not yet full, or skipped by the scoring hop) have an empty `score`. For the
  threshold-free figures a series' score is forward-filled (the last score the service knew — it is
  causal), and rows before its first score get the lowest score in the file, so they rank below
  every real score. The alert column is a state and is defined on every row.
- Alerted rows: `alert == 1`, plus any row whose `event` is `open` (instantaneous alerts).
- Threshold-free: AUC-PR = average precision of the raw score (sum over thresholds of
  (R_k - R_{k-1}) * P_k, the non-interpolated estimator); VUS-PR = range-AUC-PR averaged over
  buffer lengths l = 0..L (Paparrizos et al., VLDB 2022), see `vus_pr`.
- At the alerting decisions: point-wise precision/recall/F1 of the alerted rows; event recall =
  incidents overlapped by an alert episode / incidents; alert precision = incidents alerted /
  (incidents alerted + false episodes), a false episode overlapping no incident; "overlap" allows
  `tolerance` rows either side. Detection delay = rows from an incident's start to the first alerted
  row of an episode overlapping it (0 when an episode was already open).
- For comparison with papers only: point-adjusted F1 (one alerted row credits its whole incident)
  and PA%K (Kim et al., AAAI 2022: adjust an incident only when more than K% of its rows were
  alerted), always reported next to the plain figures.

Labels (`read_labels`): either one `0`/`1` per line, aligned with the replayed file's data rows
(`row` in scores.csv), or one range per line, `start-end[:anything]`, 0-based with `end`
exclusive — the format of SMD's `interpretation_label` files.

numpy only; matplotlib is imported lazily for the plots.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import orjson

log = logging.getLogger(__name__)

SCORES_HEADER = ("row", "key", "score", "threshold", "alert", "event")
PA_K_PERCENTS = (20, 50)
_RANGE_LINE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*(?::.*)?$")


class EvaluationError(Exception):
    """Input that cannot be evaluated; the message is one sentence meant for the user."""


@dataclass(frozen=True)
class EvaluationSettings:
    tolerance: int = 5  # rows either side of an incident within which an episode still overlaps it
    vus_max_buffer: int = 100  # L: VUS-PR averages range-AUC-PR over buffers l = 0..L rows
    vus_thresholds: int | None = None  # None: every distinct score; N: N sampled ranks like the VUS reference code

    def __post_init__(self) -> None:
        if self.tolerance < 0:
            raise EvaluationError(f"the tolerance must be 0 or more rows, got {self.tolerance}.")
        if self.vus_max_buffer < 0:
            raise EvaluationError(f"the VUS maximum buffer must be 0 or more rows, got {self.vus_max_buffer}.")
        if self.vus_thresholds is not None and self.vus_thresholds < 2:
            raise EvaluationError(f"the number of VUS thresholds must be at least 2, got {self.vus_thresholds}.")


@dataclass(frozen=True)
class ScoresTable:
    """scores.csv as columns, in file order."""

    row: np.ndarray  # int64 [n]
    key: list[str]
    score: np.ndarray  # float64 [n], NaN where not scored
    threshold: np.ndarray  # float64 [n], NaN where not scored
    alert: np.ndarray  # bool [n]
    event: list[str]

    @property
    def n(self) -> int:
        return int(self.row.shape[0])


@dataclass(frozen=True)
class Series:
    """One entity's rows in `row` order, ready for the metrics."""

    key: str
    rows: np.ndarray  # int64 [m], row numbers in the replayed file
    labels: np.ndarray  # bool [m]
    score: np.ndarray  # float64 [m], NaN where not scored
    filled_score: np.ndarray  # float64 [m], forward-filled (see module docstring)
    threshold: np.ndarray  # float64 [m], NaN where not scored
    alerted: np.ndarray  # bool [m]


@dataclass
class Evaluation:
    overall: dict[str, Any]
    per_series: dict[str, dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**self.info, "overall": self.overall, "per_series": self.per_series}


# ---------------------------------------------------------------------------------------------
# Reading inputs


def read_scores(path: str | Path) -> ScoresTable:
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"scores file {path} does not exist.")
    rows: list[int] = []
    keys: list[str] = []
    scores: list[float] = []
    thresholds: list[float] = []
    alerts: list[bool] = []
    events: list[str] = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or tuple(h.strip() for h in header[: len(SCORES_HEADER)]) != SCORES_HEADER:
                raise EvaluationError(f"{path} does not start with the header {','.join(SCORES_HEADER)} (is it replay's scores.csv?).")
            for lineno, rec in enumerate(reader, 2):
                if not rec:
                    continue
                if len(rec) < len(SCORES_HEADER):
                    raise EvaluationError(f"{path} line {lineno} has {len(rec)} cells, expected {len(SCORES_HEADER)}.")
                try:
                    rows.append(int(rec[0]))
                    scores.append(float(rec[2]) if rec[2].strip() else math.nan)
                    thresholds.append(float(rec[3]) if rec[3].strip() else math.nan)
                    alerts.append(int(rec[4]) == 1 if rec[4].strip() else False)
                except ValueError:
                    raise EvaluationError(f"{path} line {lineno} has a row, score, threshold or alert that is not a number.") from None
                keys.append(rec[1])
                events.append(rec[5].strip())
    except UnicodeDecodeError:
        raise EvaluationError(f"{path} is not a UTF-8 text file.") from None
    if not rows:
        raise EvaluationError(f"{path} has no data rows.")
    table = ScoresTable(
        row=np.asarray(rows, dtype=np.int64),
        key=keys,
        score=np.asarray(scores, dtype=np.float64),
        threshold=np.asarray(thresholds, dtype=np.float64),
        alert=np.asarray(alerts, dtype=bool),
        event=events,
    )
    if np.any(table.row < 0):
        raise EvaluationError(f"{path} has negative row numbers.")
    if np.unique(table.row).size != table.n:
        raise EvaluationError(f"{path} lists some row numbers more than once.")
    finite = table.score[~np.isnan(table.score)]
    if not np.all(np.isfinite(finite)):
        raise EvaluationError(f"{path} has infinite scores.")
    return table


def read_labels(path: str | Path, n_rows: int) -> np.ndarray:
    """Labels for rows 0..n_rows-1 as a bool array; see the module docstring for the two formats."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"labels file {path} does not exist.")
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise EvaluationError(f"labels file {path} is not a UTF-8 text file.") from None
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        log.warning("labels file %s is empty: evaluating as if no row were anomalous", path)
        return np.zeros(n_rows, dtype=bool)
    if all(ln in ("0", "1", "0.0", "1.0") for ln in lines):
        if len(lines) != n_rows:
            raise EvaluationError(f"labels file {path} has {len(lines)} rows but the scores cover {n_rows} rows (0..{n_rows - 1}).")
        return np.asarray([ln.startswith("1") for ln in lines], dtype=bool)
    labels = np.zeros(n_rows, dtype=bool)
    for lineno, ln in enumerate(lines, 1):
        m = _RANGE_LINE.match(ln)
        if not m:
            raise EvaluationError(
                f"labels file {path} line {lineno} is neither a 0/1 label nor a range 'start-end' ({ln[:40]!r})."
            )
        start, end = int(m.group(1)), int(m.group(2))
        if end <= start:
            raise EvaluationError(f"labels file {path} line {lineno}: the range {start}-{end} is empty (end is exclusive).")
        if end > n_rows:
            raise EvaluationError(f"labels file {path} line {lineno}: the range {start}-{end} goes past the {n_rows} scored rows.")
        labels[start:end] = True
    return labels


def build_series(table: ScoresTable, labels: np.ndarray) -> list[Series]:
    """Split the scores per key (in order of first appearance), each in row order."""
    if labels.shape[0] <= int(table.row.max()):
        raise EvaluationError(f"the labels cover {labels.shape[0]} rows but the scores go up to row {int(table.row.max())}.")
    scored = table.score[~np.isnan(table.score)]
    floor = float(scored.min()) if scored.size else 0.0
    opens = np.asarray([e == "open" for e in table.event], dtype=bool)
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(table.key):
        groups.setdefault(k, []).append(i)
    out = []
    for key, idx_list in groups.items():
        idx = np.asarray(idx_list, dtype=np.int64)
        idx = idx[np.argsort(table.row[idx], kind="stable")]
        score = table.score[idx]
        out.append(
            Series(
                key=key,
                rows=table.row[idx],
                labels=labels[table.row[idx]],
                score=score,
                filled_score=forward_fill(score, floor),
                threshold=table.threshold[idx],
                alerted=table.alert[idx] | opens[idx],
            )
        )
    return out


def forward_fill(values: np.ndarray, before_first: float) -> np.ndarray:
    """NaNs replaced by the last non-NaN value; leading NaNs by `before_first`."""
    ok = ~np.isnan(values)
    idx = np.where(ok, np.arange(values.size), -1)
    np.maximum.accumulate(idx, out=idx)
    out = np.where(idx >= 0, values[np.maximum(idx, 0)], before_first)
    return out.astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Metrics on plain arrays (one series, or several passed as lists and pooled)


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


def average_precision(labels: Sequence[np.ndarray] | np.ndarray, scores: Sequence[np.ndarray] | np.ndarray) -> float | None:
    """Non-interpolated average precision: sum_k (R_k - R_{k-1}) * P_k over the distinct score
    thresholds, highest first (predicted anomalous: score >= threshold). None without positives."""
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


def range_pr_auc(
    labels: Sequence[np.ndarray] | np.ndarray,
    scores: Sequence[np.ndarray] | np.ndarray,
    buffer: int,
    n_thresholds: int | None = None,
) -> float | None:
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


def vus_pr(
    labels: Sequence[np.ndarray] | np.ndarray,
    scores: Sequence[np.ndarray] | np.ndarray,
    max_buffer: int,
    n_thresholds: int | None = None,
) -> float | None:
    """VUS-PR: the mean of `range_pr_auc` over buffer lengths l = 0, 1, ..., max_buffer."""
    values = [range_pr_auc(labels, scores, buffer, n_thresholds) for buffer in range(max_buffer + 1)]
    if values[0] is None:
        return None
    return float(np.mean(values))


def point_metrics(labels: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    y = np.asarray(labels, dtype=bool)
    p = np.asarray(predicted, dtype=bool)
    tp = int(np.sum(y & p))
    fp = int(np.sum(~y & p))
    fn = int(np.sum(y & ~p))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall), "tp": tp, "fp": fp, "fn": fn}


def point_adjust(labels: np.ndarray, predicted: np.ndarray, k_percent: float = 0.0) -> np.ndarray:
    """Point adjustment: every row of an incident counts as predicted when more than k_percent %
    of its rows were predicted (k = 0: classic PA, any one row; PA%K of Kim et al. 2022)."""
    y = np.asarray(labels, dtype=bool)
    out = np.asarray(predicted, dtype=bool).copy()
    for s, e in segments(y):
        if out[s : e + 1].mean() > k_percent / 100.0:
            out[s : e + 1] = True
    return out


def event_metrics(labels: np.ndarray, alerted: np.ndarray, tolerance: int) -> dict[str, Any]:
    """Contract-4 counts for one series (see the module docstring)."""
    incidents = segments(labels)
    episodes = segments(alerted)
    if len(incidents) and len(episodes):
        overlap = (episodes[:, 0][:, None] <= incidents[:, 1][None, :] + tolerance) & (
            episodes[:, 1][:, None] >= incidents[:, 0][None, :] - tolerance
        )
    else:
        overlap = np.zeros((len(episodes), len(incidents)), dtype=bool)
    detected = overlap.any(axis=0)
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


def _as_list(v: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
    if isinstance(v, np.ndarray) and v.ndim == 1:
        return [v]
    return list(v)


# ---------------------------------------------------------------------------------------------
# The whole evaluation


def evaluate_series(series: list[Series], settings: EvaluationSettings) -> Evaluation:
    per_series = {s.key: _metrics([s], settings) for s in series}
    overall = _metrics(series, settings) if len(series) > 1 else next(iter(per_series.values()))
    n_rows = sum(s.rows.size for s in series)
    unscored = sum(int(np.isnan(s.score).sum()) for s in series)
    info = {
        "rows": n_rows,
        "series": len(series),
        "unscored_rows": unscored,
        "anomalous_rows": int(sum(int(s.labels.sum()) for s in series)),
        "settings": {
            "tolerance_rows": settings.tolerance,
            "vus_max_buffer": settings.vus_max_buffer,
            "vus_thresholds": settings.vus_thresholds or "all distinct scores",
            "pa_k_percents": list(PA_K_PERCENTS),
            "unscored_rows_policy": "score forward-filled per series; before its first score, the lowest score in the file",
        },
    }
    return Evaluation(overall=overall, per_series=per_series, info=info)


def _metrics(series: list[Series], settings: EvaluationSettings) -> dict[str, Any]:
    labels = [s.labels for s in series]
    scores = [s.filled_score for s in series]
    y = np.concatenate(labels)
    alerted = np.concatenate([s.alerted for s in series])
    counts = {"incidents": 0, "incidents_alerted": 0, "episodes": 0, "false_episodes": 0, "delays": []}
    missed: list[list[int]] = []
    for s in series:
        c = event_metrics(s.labels, s.alerted, settings.tolerance)
        for k in ("incidents", "incidents_alerted", "episodes", "false_episodes"):
            counts[k] += c[k]
        counts["delays"] += c["delays"]
        missed += [[int(s.rows[a]), int(s.rows[b])] for a, b in c["missed"]]
    adjusted = {
        "f1": point_metrics(y, np.concatenate([point_adjust(s.labels, s.alerted) for s in series]))["f1"],
        **{
            f"pa{k}_f1": point_metrics(y, np.concatenate([point_adjust(s.labels, s.alerted, k) for s in series]))["f1"]
            for k in PA_K_PERCENTS
        },
    }
    return {
        "anomaly_ratio": float(y.mean()) if y.size else None,
        "auc_pr": average_precision(labels, scores),
        "vus_pr": vus_pr(labels, scores, settings.vus_max_buffer, settings.vus_thresholds),
        "point": point_metrics(y, alerted),
        "event": summarise_events(counts),
        "delays": counts["delays"],
        "missed_incidents_rows": missed,
        "point_adjusted": adjusted,
    }


def evaluate_files(
    scores_path: str | Path,
    labels_path: str | Path,
    settings: EvaluationSettings | None = None,
) -> tuple[Evaluation, list[Series]]:
    table = read_scores(scores_path)
    labels = read_labels(labels_path, int(table.row.max()) + 1)
    series = build_series(table, labels)
    return evaluate_series(series, settings or EvaluationSettings()), series


def format_summary(ev: Evaluation) -> str:
    """A few lines for a person: plain figures first, point-adjusted ones beside them."""
    o = ev.overall
    e, p, a = o["event"], o["point"], o["point_adjusted"]
    lines = [
        f"rows {ev.info['rows']} in {ev.info['series']} series, {ev.info['unscored_rows']} unscored, "
        f"{ev.info['anomalous_rows']} anomalous ({_fmt(o['anomaly_ratio'])})",
        f"threshold-free   AUC-PR {_fmt(o['auc_pr'])}   VUS-PR {_fmt(o['vus_pr'])}",
        f"events           recall {_fmt(e['recall'])} ({e['incidents_alerted']}/{e['incidents']} incidents)   "
        f"alert precision {_fmt(e['alert_precision'])} ({e['false_episodes']} false of {e['episodes']} episodes)   "
        f"F1 {_fmt(e['f1'])}",
        f"delay (rows)     mean {_fmt(e['delay_mean'], 1)}   median {_fmt(e['delay_median'], 1)}",
        f"point-wise       P {_fmt(p['precision'])} R {_fmt(p['recall'])} F1 {_fmt(p['f1'])}   |   "
        f"point-adjusted F1 {_fmt(a['f1'])}  PA%20 F1 {_fmt(a['pa20_f1'])}  PA%50 F1 {_fmt(a['pa50_f1'])}",
    ]
    return "\n".join(lines)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# Plots


def top_features_from_alerts(alerts_path: Path, limit: int = 3) -> dict[str, list[str]]:
    """Per key, the features most often named in its alerts' `top_features` (contract 3)."""
    if not alerts_path.is_file():
        return {}
    counts: dict[str, dict[str, int]] = {}
    for line in alerts_path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            alert = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        names = []
        for item in alert.get("top_features") or []:
            if isinstance(item, str):
                names.append(item)
            elif isinstance(item, dict):
                name = item.get("feature", item.get("name"))
                if name is not None:
                    names.append(str(name))
        per_key = counts.setdefault(str(alert.get("key")), {})
        for n in names:
            per_key[n] = per_key.get(n, 0) + 1
    return {k: [n for n, _ in sorted(c.items(), key=lambda kv: -kv[1])[:limit]] for k, c in counts.items()}


def write_plots(
    series: list[Series],
    out_dir: Path,
    signals: dict[str, tuple[list[str], np.ndarray]] | None = None,
    title: str = "",
) -> list[Path]:
    """One PNG per series: top features' signal (when given: key -> (names, values [m, k]) aligned
    with the series' rows), score and threshold (log scale), label ranges, alert episodes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install 'stream-detector[train]')")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for s in series:
        sig = (signals or {}).get(s.key)
        n_panels = 2 if sig is not None else 1
        fig, axes = plt.subplots(n_panels, 1, figsize=(14, 2.6 * n_panels + 0.6), sharex=True, squeeze=False)
        axes = axes[:, 0]
        x = s.rows
        if sig is not None:
            names, values = sig
            for j, name in enumerate(names):
                axes[0].plot(x, values[:, j], lw=0.6, label=name)
            axes[0].set_ylabel("top features")
            axes[0].legend(loc="upper right", fontsize=7)
        ax = axes[-1]
        positive = s.score[np.isfinite(s.score) & (s.score > 0)]
        floor = float(positive.min()) if positive.size else 1e-6
        ax.plot(x, np.maximum(s.score, floor), lw=0.5, color="tab:blue", label="score")
        ax.plot(x, np.maximum(s.threshold, floor), lw=0.8, color="tab:orange", label="threshold")
        ax.set_yscale("log")
        ax.set_ylabel("score")
        for axis in axes:
            for a, b in segments(s.labels):
                axis.axvspan(x[a], x[b] + 1, color="tab:red", alpha=0.18, lw=0)
        ymin, ymax = ax.get_ylim()
        for a, b in segments(s.alerted):
            ax.hlines(ymax * 0.8, x[a], x[b] + 1, color="black", lw=3)
        ax.plot([], [], color="tab:red", alpha=0.3, lw=6, label="labelled anomaly")
        ax.plot([], [], color="black", lw=3, label="alert episode")
        ax.legend(loc="upper left", fontsize=7, ncol=4)
        ax.set_xlabel("row")
        fig.suptitle(f"{title} {s.key}".strip(), fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{_safe_name(s.key)}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:80] or "series"


def load_signals(
    input_path: str | Path, fmt: str, series: list[Series], top: dict[str, list[str]], default_count: int = 3
) -> dict[str, tuple[list[str], np.ndarray]]:
    """Feature values of the replayed file for each series' top features (those named most often in
    its alerts; else the features with the largest spread inside its labelled ranges)."""
    from stream_detector.offline.datafiles import DataFileError, read_table

    try:
        table = read_table(input_path, fmt)
    except DataFileError as e:
        raise EvaluationError(str(e)) from None
    by_key = {e.key: e for e in table.by_entity()}
    out = {}
    for s in series:
        ent = by_key.get(s.key)
        if ent is None:
            continue
        pos = {int(r): i for i, r in enumerate(ent.row_index)}
        take = np.asarray([pos.get(int(r), -1) for r in s.rows])
        if np.any(take < 0):
            continue
        values = ent.values[take]
        names = [n for n in top.get(s.key, []) if n in table.features]
        if not names:
            inside = values[s.labels] if s.labels.any() else values
            spread = inside.std(axis=0) / (values.std(axis=0) + 1e-9)
            names = [table.features[j] for j in np.argsort(-spread)[:default_count]]
        cols = [table.features.index(n) for n in names]
        out[s.key] = (names, values[:, cols])
    return out


# ---------------------------------------------------------------------------------------------
# Command line


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="detection quality of replay's scores.csv against labels (metrics.json + plots)",
        description="Detection quality (DESIGN.md contract 4) of the online scores and alerts written by "
        "`stream-detector replay`, against labels: AUC-PR, VUS-PR, point-wise and event-wise precision/recall, "
        "alert precision, detection delay, and point-adjusted F1 / PA%%K beside the plain figures.",
    )
    p.add_argument("--scores", required=True, type=Path, help="replay's scores.csv")
    p.add_argument(
        "--labels",
        required=True,
        type=Path,
        help="labels: one 0/1 per data row of the replayed file, or one range 'start-end' per line (0-based, end exclusive)",
    )
    p.add_argument("--out", type=Path, default=None, help="where metrics.json and plots go (default: the scores file's directory)")
    p.add_argument("--tolerance", type=int, default=EvaluationSettings.tolerance, help="rows either side of an incident within which an alert episode still counts as overlapping it (default %(default)s)")
    p.add_argument("--vus-max-buffer", type=int, default=EvaluationSettings.vus_max_buffer, help="VUS-PR averages range-AUC-PR over buffers 0..L rows (default %(default)s)")
    p.add_argument("--vus-thresholds", type=int, default=None, help="score thresholds for VUS-PR (default: every distinct score; 250 matches the VUS reference code)")
    p.add_argument("--input", type=Path, default=None, help="the replayed data file, to plot the top features' signal (optional)")
    p.add_argument("--format", default="auto", help="format of --input: auto, csv, parquet, jsonl, smd (default auto)")
    p.add_argument("--no-plots", action="store_true", help="write metrics.json only")
    p.add_argument("--sessions", action="store_true", help="logs: --scores is `replay --format log`'s entities.csv and --labels an entity,label CSV; report session-level precision/recall/F1 and time-to-detect (logeval.py)")
    p.add_argument("--start-after-ms", type=int, default=None, help="with --sessions: evaluate only entities whose first line is after this epoch-ms time (e.g. the end of the training period)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "sessions", False):
        from stream_detector.offline.logeval import run_sessions_cli

        return run_sessions_cli(args)
    try:
        settings = EvaluationSettings(args.tolerance, args.vus_max_buffer, args.vus_thresholds)
        ev, series = evaluate_files(args.scores, args.labels, settings)
        out_dir = args.out or args.scores.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        ev.info["scores"] = str(args.scores)
        ev.info["labels"] = str(args.labels)
        (out_dir / "metrics.json").write_bytes(orjson.dumps(ev.to_json(), option=orjson.OPT_INDENT_2))
        print(format_summary(ev))
        print(f"wrote {out_dir / 'metrics.json'}")
        if not args.no_plots:
            signals = None
            if args.input is not None:
                top = top_features_from_alerts(args.scores.parent / "alerts.jsonl")
                signals = load_signals(args.input, args.format, series, top)
            for path in write_plots(series, out_dir, signals, title=args.scores.parent.name):
                print(f"wrote {path}")
    except EvaluationError as e:
        print(f"stream-detector evaluate: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"stream-detector evaluate: cannot write the results ({e.strerror}: {e.filename}).", file=sys.stderr)
        return 2
    return 0
