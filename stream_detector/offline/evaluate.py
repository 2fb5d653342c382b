"""`stream-detector evaluate`: detection quality of replay's online scores and alerts against labels.

Everything is computed on what the service itself produced (`scores.csv` from `replay`, see
docs/architecture.md): causal scores and its own alerting decisions, never scores that saw the
future. How the figures are counted (DESIGN.md contract 4, docs/quality.md):

- Per series (one entity, evalinputs.py: unscored rows, forward fill, alerted rows, labels);
  incidents, alert episodes, buffers and point adjustment never cross series; pooled figures sum
  over series.
- Threshold-free: AUC-PR = average precision of the raw score (sum over thresholds of
  (R_k - R_{k-1}) * P_k, the non-interpolated estimator; tied scores form one threshold);
  VUS-PR = range-AUC-PR averaged over buffer lengths l = 0..L (Paparrizos et al., VLDB 2022).
- At the alerting decisions: point-wise precision/recall/F1 of the alerted rows; event recall =
  incidents overlapped by an alert episode / incidents; alert precision = incidents alerted /
  (incidents alerted + false episodes), a false episode overlapping no incident; "overlap" allows
  `tolerance` rows either side. Detection delay = rows from an incident's start to the first alerted
  row of an episode overlapping it (0 when an episode was already open).
- For comparison with papers only: point-adjusted F1 (one alerted row credits its whole incident)
  and PA%K (Kim et al., AAAI 2022: adjust an incident only when more than K% of its rows were
  alerted), always reported next to the plain figures.

The measures themselves are in measures.py (shared with logeval.py), reading the inputs in
evalinputs.py, the plots in plots.py; this module runs them over the series, summarises, and is the
command line. The names below that come from those modules stay importable from here.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from stream_detector.offline.evalinputs import (
    EvaluationError,
    Series,
    build_series,
    forward_fill,
    is_log_table,
    read_labels,
    read_scores,
)
from stream_detector.offline.measures import (
    average_precision,
    buffered_labels,
    event_metrics,
    point_adjust,
    point_metrics,
    range_pr_auc,
    segments,
    summarise_events,
    vus_pr,
)
from stream_detector.offline.plots import load_signals, top_features_from_alerts, write_plots
from stream_detector.offline.scoresfile import ScoresTable

__all__ = [
    "PA_K_PERCENTS",
    "EvaluationError",
    "EvaluationSettings",
    "Evaluation",
    "ScoresTable",
    "Series",
    "read_scores",
    "read_labels",
    "build_series",
    "forward_fill",
    "segments",
    "average_precision",
    "buffered_labels",
    "range_pr_auc",
    "vus_pr",
    "point_metrics",
    "point_adjust",
    "event_metrics",
    "summarise_events",
    "evaluate_series",
    "evaluate_files",
    "format_summary",
    "top_features_from_alerts",
    "write_plots",
    "load_signals",
    "register",
    "run",
]

PA_K_PERCENTS = (20, 50)


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


@dataclass
class Evaluation:
    overall: dict[str, Any]
    per_series: dict[str, dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**self.info, "overall": self.overall, "per_series": self.per_series}


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
            "unscored_rows_policy": (
                "score forward-filled per series; before its first score, the lowest score in the file"
            ),
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
    log_lines = is_log_table(table)
    labels = read_labels(labels_path, int(table.row.max()) + 1, exact=not log_lines)
    series = build_series(table, labels)
    ev = evaluate_series(series, settings or EvaluationSettings())
    if log_lines:
        ev.info["rows_are"] = "log lines: one series per entity, rows = line numbers; session and idle rows left out"
    return ev, series


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
        help=(
            "labels: one 0/1 per data row of the replayed file, or one range 'start-end' per line (0-based, end "
            "exclusive); for a log replay's scores.csv, per line of the log file (each entity's lines are a series)"
        ),
    )
    p.add_argument(
        "--out", type=Path, default=None, help="where metrics.json and plots go (default: the scores file's directory)"
    )
    p.add_argument(
        "--tolerance",
        type=int,
        default=EvaluationSettings.tolerance,
        help=(
            "rows either side of an incident within which an alert episode still counts as overlapping it (default "
            "%(default)s)"
        ),
    )
    p.add_argument(
        "--vus-max-buffer",
        type=int,
        default=EvaluationSettings.vus_max_buffer,
        help="VUS-PR averages range-AUC-PR over buffers 0..L rows (default %(default)s)",
    )
    p.add_argument(
        "--vus-thresholds",
        type=int,
        default=None,
        help="score thresholds for VUS-PR (default: every distinct score; 250 matches the VUS reference code)",
    )
    p.add_argument(
        "--input", type=Path, default=None, help="the replayed data file, to plot the top features' signal (optional)"
    )
    p.add_argument("--format", default="auto", help="format of --input: auto, csv, parquet, jsonl, smd (default auto)")
    p.add_argument("--no-plots", action="store_true", help="write metrics.json only")
    p.add_argument(
        "--sessions",
        action="store_true",
        help=(
            "logs: --scores is `replay --format log`'s entities.csv and --labels an entity,label CSV; report "
            "session-level precision/recall/F1 and time-to-detect (logeval.py)"
        ),
    )
    p.add_argument(
        "--start-after-ms",
        type=int,
        default=None,
        help=(
            "with --sessions: evaluate only entities whose first line is after this epoch-ms time (e.g. the end of the "
            "training period)"
        ),
    )
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
