"""`scores.csv`: the per-row scores file. One writer (`write_scores`), used by `replay` (sensor rows)
and `replay --format log` (log rows), and one reader (`read_scores`), which `evaluate` builds on.

Schema (docs/architecture.md, "Scores file"): a header, then one line per row, comma-separated,
quoted by the csv module where a cell needs it (a key with a comma, a quote or a line break):

    row,key,score,threshold,alert,event[,extra columns]

- `row`: the row's 0-based position in the replayed input (log rows: the line number, -1 for a row
  that is no line: a session-end row);
- `key`: the entity key;
- `score`, `threshold`: `%.7g`, empty where the row was not scored;
- `alert`: 1 while the entity is in an open alert after this row, else 0;
- `event`: the alert event emitted at this row (`open`, `update`, `resolved`) or empty;
- extra columns after these six, named by the writer: log rows add `LOG_COLUMNS` = `kind`
  (`line`, `session-end`, `idle-check`, ...) and `template_id`.

The file is written atomically: into a temporary file in the same directory, flushed to disk, then
renamed over the destination (`os.replace`), so a reader (or a crash) never sees a half-written
file and a failed write leaves an existing file as it was.
"""

from __future__ import annotations

import csv
import math
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

SCORES_FILE = "scores.csv"
COLUMNS = ("row", "key", "score", "threshold", "alert", "event")
LOG_COLUMNS = ("kind", "template_id")


class ScoresFileError(Exception):
    """A scores file that cannot be read; the message is one sentence meant for the user."""


@dataclass(frozen=True)
class ScoresTable:
    """scores.csv as columns, in file order."""

    row: np.ndarray  # int64 [n]
    key: list[str]
    score: np.ndarray  # float64 [n], NaN where not scored
    threshold: np.ndarray  # float64 [n], NaN where not scored
    alert: np.ndarray  # bool [n]
    event: list[str]
    extra: dict[str, list[str]] = field(default_factory=dict)  # columns after the six, as text

    @property
    def n(self) -> int:
        return int(self.row.shape[0])


def write_scores(
    path: str | Path,
    row: Sequence[int] | np.ndarray,
    key: Sequence[str],
    score: Sequence[float] | np.ndarray,
    threshold: Sequence[float] | np.ndarray,
    alert: Sequence[bool] | np.ndarray,
    event: Sequence[str | None],
    extra: Mapping[str, Sequence[object]] | None = None,
) -> None:
    """Write scores.csv atomically, one line per element of the (equally long) columns, in the order
    given. NaN score/threshold = not scored (empty cell); `event` None or "" = no event; `extra`:
    further columns by name, written after the six (log rows: `LOG_COLUMNS`)."""
    extra = dict(extra or {})
    clash = set(extra) & set(COLUMNS)
    if clash:
        raise ValueError(f"extra scores.csv columns may not reuse the names {sorted(clash)}.")
    n = len(key)
    columns = [row, score, threshold, alert, event, *extra.values()]
    if any(len(c) != n for c in columns):
        raise ValueError("the scores.csv columns do not all have the same length.")
    rows_txt = np.asarray(row, dtype=np.int64).tolist()
    alert_txt = np.where(np.asarray(alert, dtype=bool), "1", "0").tolist()
    event_txt = ["" if e is None else e for e in event]
    cells = zip(rows_txt, key, _numbers(score), _numbers(threshold), alert_txt, event_txt, *extra.values())
    with atomic_text_file(path) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow((*COLUMNS, *extra))
        w.writerows(cells)


def _numbers(values: Sequence[float] | np.ndarray) -> list[str]:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return []
    return np.where(np.isnan(v), "", np.char.mod("%.7g", v)).tolist()


@contextmanager
def atomic_text_file(path: str | Path) -> Iterator[TextIO]:
    """`with atomic_text_file(path) as f:` — a UTF-8 text file (newline="") that appears at `path`
    only when the block ends without an exception (a temporary file in the same directory, fsync,
    `os.replace`); otherwise the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8", newline="") as f:  # "x": a new file, mode from the umask
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_scores(path: str | Path) -> ScoresTable:
    """Read a scores.csv written by `write_scores` (either kind: extra columns are kept as text in
    `extra`). Checks the header and that row/score/threshold/alert are numbers; what an evaluation
    further needs of the rows (unique, non-negative) is the caller's to check."""
    path = Path(path)
    if not path.is_file():
        raise ScoresFileError(f"scores file {path} does not exist.")
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
            if header is None or tuple(h.strip() for h in header[: len(COLUMNS)]) != COLUMNS:
                raise ScoresFileError(
                    f"{path} does not start with the header {','.join(COLUMNS)} (is it replay's scores.csv?)."
                )
            extra_names = [h.strip() for h in header[len(COLUMNS) :]]
            extra: dict[str, list[str]] = {name: [] for name in extra_names}
            for rec in reader:
                if not rec:
                    continue
                if len(rec) < len(header):
                    raise ScoresFileError(
                        f"{path} line {reader.line_num} has {len(rec)} cells, expected {len(header)}."
                    )
                try:
                    rows.append(int(rec[0]))
                    scores.append(float(rec[2]) if rec[2].strip() else math.nan)
                    thresholds.append(float(rec[3]) if rec[3].strip() else math.nan)
                    alerts.append(int(rec[4]) == 1 if rec[4].strip() else False)
                except ValueError:
                    raise ScoresFileError(
                        f"{path} line {reader.line_num} has a row, score, threshold or alert that is not a number."
                    ) from None
                keys.append(rec[1])
                events.append(rec[5].strip())
                for j, name in enumerate(extra_names, len(COLUMNS)):
                    extra[name].append(rec[j])
    except UnicodeDecodeError:
        raise ScoresFileError(f"{path} is not a UTF-8 text file.") from None
    except csv.Error as e:
        raise ScoresFileError(f"{path} is not a well-formed CSV file ({e}).") from None
    return ScoresTable(
        row=np.asarray(rows, dtype=np.int64),
        key=keys,
        score=np.asarray(scores, dtype=np.float64),
        threshold=np.asarray(thresholds, dtype=np.float64),
        alert=np.asarray(alerts, dtype=bool),
        event=events,
        extra=extra,
    )
