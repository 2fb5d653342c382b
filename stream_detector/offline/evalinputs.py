"""Inputs of `stream-detector evaluate`: replay's scores.csv (read with `scoresfile.read_scores`,
then checked for a row-level evaluation), the labels, and the per-entity `Series` the metrics run on.

- Series: rows are grouped by `key`; each key is one series in `row` order (incidents, alert
  episodes, buffers and point adjustment never cross series).
- Unscored rows (window not yet full, or skipped by the scoring hop) have an empty `score`. For the
  threshold-free figures a series' score is forward-filled (the last score the service knew — it is
  causal), and rows before its first score get the lowest score in the file, so they rank below
  every real score. The alert column is a state and is defined on every row.
- Alerted rows: `alert == 1`, plus any row whose `event` is `open` (instantaneous alerts).

Labels (`read_labels`): either one `0`/`1` per line, aligned with the replayed file's data rows
(`row` in scores.csv), or one range per line, `start-end[:anything]`, 0-based with `end`
exclusive — the format of SMD's `interpretation_label` files.

A log replay's scores.csv (`replay --format log`, with the `kind` column) is evaluated per log line:
labels are per line of the replayed log file (0-based), each series is one entity's lines, and the
rows that are no line (session start and end, idle checks) are left out. Entity-level labels go to
`evaluate --sessions` (logeval.py) instead.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stream_detector.offline.scoresfile import LOG_COLUMNS, ScoresFileError, ScoresTable
from stream_detector.offline.scoresfile import read_scores as read_scores_file

log = logging.getLogger(__name__)

_RANGE_LINE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*(?::.*)?$")


class EvaluationError(Exception):
    """Input that cannot be evaluated; the message is one sentence meant for the user."""


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


def read_scores(path: str | Path) -> ScoresTable:
    """scores.csv for a row-level evaluation: every row number once (per key, for a log replay), none
    negative, finite scores. A log replay's scores.csv (`kind` column) is evaluated per line: its rows
    that are no line (session start and end, idle checks) are left out, and a line that names several
    entities has one row per entity (each in its entity's series)."""
    try:
        table = read_scores_file(path)
    except ScoresFileError as e:
        raise EvaluationError(str(e)) from None
    if table.n == 0:
        raise EvaluationError(f"{path} has no data rows.")
    log_rows = is_log_table(table)
    if log_rows:
        table = line_rows(table)
        if table.n == 0:
            raise EvaluationError(f"{path} has no scored log lines (only session or idle-check rows).")
    if np.any(table.row < 0):
        raise EvaluationError(
            f"{path} has negative row numbers (a log replay's session-end rows: evaluate a log replay with --sessions "
            "on its entities.csv)."
        )
    if log_rows:
        if len(set(zip(table.key, table.row.tolist()))) != table.n:
            raise EvaluationError(f"{path} lists some line of some entity more than once.")
    elif np.unique(table.row).size != table.n:
        raise EvaluationError(f"{path} lists some row numbers more than once.")
    finite = table.score[~np.isnan(table.score)]
    if not np.all(np.isfinite(finite)):
        raise EvaluationError(f"{path} has infinite scores.")
    return table


def is_log_table(table: ScoresTable) -> bool:
    """A scores.csv written by `replay --format log` (it has the log columns)."""
    return LOG_COLUMNS[0] in table.extra


def line_rows(table: ScoresTable) -> ScoresTable:
    """The rows of a log replay's scores.csv that stand for a line (kind `line`)."""
    keep = np.flatnonzero(np.asarray(table.extra[LOG_COLUMNS[0]]) == "line")
    ids = keep.tolist()
    return ScoresTable(
        row=table.row[keep],
        key=[table.key[i] for i in ids],
        score=table.score[keep],
        threshold=table.threshold[keep],
        alert=table.alert[keep],
        event=[table.event[i] for i in ids],
        extra={name: [col[i] for i in ids] for name, col in table.extra.items()},
    )


def read_labels(path: str | Path, n_rows: int, exact: bool = True) -> np.ndarray:
    """Labels for rows 0..n_rows-1 as a bool array; see the module docstring for the two formats.
    `exact=False` (a log replay, whose last lines may not have been scored): the labels may go on past
    `n_rows` (one per line of the log file), and the array is as long as they are."""
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
        if len(lines) != n_rows and (exact or len(lines) < n_rows):
            raise EvaluationError(
                f"labels file {path} has {len(lines)} rows but the scores cover {n_rows} rows (0..{n_rows - 1})."
            )
        return np.asarray([ln.startswith("1") for ln in lines], dtype=bool)
    ranges = []
    for lineno, ln in enumerate(lines, 1):
        m = _RANGE_LINE.match(ln)
        if not m:
            raise EvaluationError(
                f"labels file {path} line {lineno} is neither a 0/1 label nor a range 'start-end' ({ln[:40]!r})."
            )
        start, end = int(m.group(1)), int(m.group(2))
        if end <= start:
            raise EvaluationError(
                f"labels file {path} line {lineno}: the range {start}-{end} is empty (end is exclusive)."
            )
        if end > n_rows and exact:
            raise EvaluationError(
                f"labels file {path} line {lineno}: the range {start}-{end} goes past the {n_rows} scored rows."
            )
        ranges.append((start, end))
    labels = np.zeros(max([n_rows, *(e for _, e in ranges)]), dtype=bool)
    for start, end in ranges:
        labels[start:end] = True
    return labels


def build_series(table: ScoresTable, labels: np.ndarray) -> list[Series]:
    """Split the scores per key (in order of first appearance), each in row order."""
    if labels.shape[0] <= int(table.row.max()):
        raise EvaluationError(
            f"the labels cover {labels.shape[0]} rows but the scores go up to row {int(table.row.max())}."
        )
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
