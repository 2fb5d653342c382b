"""Reading observation files into one in-memory table: shared by training and `stream-detector replay`.

Formats (`fmt`):
- `csv`: a header line; an optional timestamp column, an optional entity-key column, every other
  numeric column is a feature (non-numeric columns are ignored, and logged).
- `parquet`: the same, read with pyarrow (imported only for this format).
- `jsonl`: one JSON object per line, the event shape the service consumes (contract 2): features
  by name, the entity key in `key_field`, the timestamp in `timestamp_field`.
- `smd`: the Server Machine Dataset: headerless comma-separated floats; the columns are named
  `m00`, `m01`, ... (`m37` for SMD's 38 metrics), one row per minute, one entity (the file stem).
- `auto`: from the suffix (`.csv`, `.parquet`/`.pq`, `.jsonl`/`.ndjson`; `.txt` is read as `smd`).

Key and timestamp: when `key_field`/`timestamp_field` are not given, a column named `key` or
`entity` is the key and one named `timestamp`, `time`, `ts` or `event_time` is the timestamp, if
present. Without a key every row belongs to one entity named after the file stem. Timestamps are
epoch numbers or ISO-8601 strings; numbers above 1e11 are read as milliseconds, others as seconds.

Missing values (empty cell, NaN, inf, a JSONL feature that is absent or not a number), policy
`nan_policy`:
- `ffill` (default): forward-filled within the entity (in time order); rows still missing a value
  (before an entity's first complete value) are dropped. Counts are in `DataTable.cleaning`.
- `drop`: every row with a missing value is dropped.
- `error`: any missing value is a `DataFileError`.
`DataTable.row_index` keeps each kept row's 0-based position among the file's data rows, so
labels aligned with the file stay aligned after drops.

numpy and orjson only (pyarrow lazily); every failure is a `DataFileError` with one sentence.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

log = logging.getLogger(__name__)

FORMATS = ("auto", "csv", "parquet", "jsonl", "smd")
NAN_POLICIES = ("ffill", "drop", "error")
KEY_CANDIDATES = ("key", "entity")
TIMESTAMP_CANDIDATES = ("timestamp", "time", "ts", "event_time")
_MS_THRESHOLD = 1e11  # epoch numbers above this are milliseconds (1e11 s would be the year 5138)


class DataFileError(Exception):
    """An input file that cannot be used; the message is one sentence meant for the user."""


@dataclass(frozen=True)
class CleaningReport:
    """What the missing-value policy did."""

    policy: str
    missing_values: int  # cells that were NaN/inf/empty/absent before cleaning
    filled_values: int  # of those, forward-filled
    dropped_rows: int

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "missing_values": self.missing_values,
            "filled_values": self.filled_values,
            "dropped_rows": self.dropped_rows,
        }


@dataclass(frozen=True)
class EntitySeries:
    """One entity's rows in time order."""

    key: str
    values: np.ndarray  # float64 [n, F]
    timestamps_ms: np.ndarray | None  # int64 [n]
    row_index: np.ndarray  # int64 [n], position of each row among the file's data rows


@dataclass(frozen=True)
class DataTable:
    features: tuple[str, ...]
    values: np.ndarray  # float64 [n, F], finite
    keys: list[str]  # one per row
    timestamps_ms: np.ndarray | None  # int64 [n], or None when the file has no timestamps
    source: str
    row_index: np.ndarray  # int64 [n]
    cleaning: CleaningReport = field(default_factory=lambda: CleaningReport("ffill", 0, 0, 0))

    @property
    def n_rows(self) -> int:
        return int(self.values.shape[0])

    def by_entity(self) -> list[EntitySeries]:
        """Rows split per entity, entities in key order (so that the same rows give the same training
        plan however they were read: a file, or a topic's partitions one after another), each in time
        order (stable: file order among equal timestamps, and file order when there are no timestamps)."""
        return [
            EntitySeries(
                key=key,
                values=self.values[idx],
                timestamps_ms=None if self.timestamps_ms is None else self.timestamps_ms[idx],
                row_index=self.row_index[idx],
            )
            for key, idx in sorted(_entity_indices(self.keys, self.timestamps_ms), key=lambda kv: kv[0])
        ]


def read_table(
    path: str | Path,
    fmt: str = "auto",
    features: Sequence[str] | None = None,
    key_field: str | None = None,
    timestamp_field: str | None = None,
    nan_policy: str = "ffill",
) -> DataTable:
    """Read a csv/parquet/jsonl/smd file into a `DataTable` (see the module docstring)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise DataFileError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}.")
    if nan_policy not in NAN_POLICIES:
        raise DataFileError(f"unknown missing-value policy {nan_policy!r}; expected one of {', '.join(NAN_POLICIES)}.")
    if not path.exists():
        raise DataFileError(f"data file {path} does not exist.")
    if not path.is_file():
        raise DataFileError(f"data file {path} is not a regular file.")
    if fmt == "auto":
        fmt = _format_from_suffix(path)
    try:
        if fmt == "smd":
            columns = _read_smd(path)
        elif fmt == "csv":
            columns = _read_csv(path)
        elif fmt == "parquet":
            columns = _read_parquet(path)
        else:
            columns = _read_jsonl(path, features)
    except UnicodeDecodeError:
        raise DataFileError(f"{path} is not a text file in UTF-8 (is the format {fmt!r} right?).") from None
    return _build_table(path, fmt, columns, features, key_field, timestamp_field, nan_policy)


def _format_from_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".txt":
        return "smd"
    raise DataFileError(
        f"cannot tell the format of {path.name} from its suffix; pass the format (csv, parquet, jsonl or smd)."
    )


# Column readers: each returns {name: 1-D array}; numeric columns float64 (NaN for missing),
# other columns object arrays of str.


def _read_smd(path: Path) -> dict[str, np.ndarray]:
    rows: list[list[str]] = []
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            cells = line.split(",")
            if rows and len(cells) != len(rows[0]):
                raise DataFileError(f"{path} line {lineno} has {len(cells)} values, the first line has {len(rows[0])}.")
            rows.append(cells)
    if not rows:
        raise DataFileError(f"{path} has no data rows.")
    try:
        values = _to_float(np.array(rows, dtype=object))
    except ValueError:
        raise DataFileError(f"{path} is not an SMD file: it holds values that are not numbers.") from None
    width = max(2, len(str(values.shape[1] - 1)))
    return {f"m{i:0{width}d}": values[:, i] for i in range(values.shape[1])}


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise DataFileError(f"{path} is empty; a CSV file needs a header line.")
        header = [h.strip() for h in header]
        if len(set(header)) != len(header):
            raise DataFileError(f"{path} has duplicate column names in its header.")
        rows = []
        for lineno, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) != len(header):
                raise DataFileError(f"{path} line {lineno} has {len(row)} cells, the header has {len(header)}.")
            rows.append(row)
    if not rows:
        raise DataFileError(f"{path} has a header but no data rows.")
    table = np.array(rows, dtype=object)
    columns: dict[str, np.ndarray] = {}
    for i, name in enumerate(header):
        col = table[:, i]
        try:
            columns[name] = _to_float(col)
        except ValueError:
            columns[name] = col.astype(str)
    return columns


def _read_parquet(path: Path) -> dict[str, np.ndarray]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataFileError(
            "reading Parquet needs pyarrow; install it (pip install 'stream-detector[train]')."
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataFileError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0]}).") from None
    if table.num_rows == 0:
        raise DataFileError(f"{path} has no data rows.")
    columns: dict[str, np.ndarray] = {}
    import pyarrow as pa

    for name, col in zip(table.column_names, table.columns):
        t = col.type
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            columns[name] = np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
        elif pa.types.is_timestamp(t):
            columns[name] = np.asarray(
                col.cast(pa.timestamp("ms")).cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.float64
            )
        else:
            columns[name] = np.array([None if v is None else str(v) for v in col.to_pylist()], dtype=object).astype(str)
    return columns


def _read_jsonl(path: Path, features: Sequence[str] | None) -> dict[str, np.ndarray]:
    records: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                raise DataFileError(f"{path} line {lineno} is not valid JSON.") from None
            if not isinstance(obj, dict):
                raise DataFileError(f"{path} line {lineno} is not a JSON object.")
            records.append(obj)
    if not records:
        raise DataFileError(f"{path} has no data rows.")
    names: list[str] = []
    seen: set[str] = set()
    for rec in records:  # union of field names, in order of first appearance
        for k in rec:
            if k not in seen:
                seen.add(k)
                names.append(k)
    columns: dict[str, np.ndarray] = {}
    for name in names:
        vals = [rec.get(name) for rec in records]
        numeric = [v for v in vals if v is not None]
        if numeric and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numeric):
            columns[name] = np.array([np.nan if v is None else v for v in vals], dtype=np.float64)
        elif features is not None and name in features:
            # A named feature with some non-numeric values: those count as missing values.
            columns[name] = np.array(
                [v if isinstance(v, (int, float)) and not isinstance(v, bool) else np.nan for v in vals],
                dtype=np.float64,
            )
        else:
            columns[name] = np.array(["" if v is None else str(v) for v in vals], dtype=object).astype(str)
    return columns


def _to_float(cells: np.ndarray) -> np.ndarray:
    """Strings to float64; empty cells become NaN. Raises ValueError for any non-number."""
    cells = np.where(np.char.strip(cells.astype(str)) == "", "nan", cells)
    return cells.astype(np.float64)


def _build_table(
    path: Path,
    fmt: str,
    columns: dict[str, np.ndarray],
    features: Sequence[str] | None,
    key_field: str | None,
    timestamp_field: str | None,
    nan_policy: str,
) -> DataTable:
    n = len(next(iter(columns.values())))
    key_col = _pick_column(path, columns, key_field, KEY_CANDIDATES, "key")
    ts_col = _pick_column(path, columns, timestamp_field, TIMESTAMP_CANDIDATES, "timestamp")
    if features is not None:
        features = list(features)
        if not features:
            raise DataFileError("the list of features to read is empty.")
        if len(set(features)) != len(features):
            raise DataFileError("the list of features to read names a feature twice.")
        for name in features:
            if name not in columns:
                raise DataFileError(f"{path} has no feature column {name!r}.")
            if columns[name].dtype != np.float64:
                raise DataFileError(f"{path} column {name!r} is not numeric.")
    else:
        features = [c for c, v in columns.items() if c not in (key_col, ts_col) and v.dtype == np.float64]
        ignored = [c for c, v in columns.items() if c not in (key_col, ts_col) and v.dtype != np.float64]
        if ignored:
            log.warning("%s: ignoring non-numeric columns %s", path.name, ", ".join(ignored))
        if not features:
            raise DataFileError(f"{path} has no numeric feature columns.")
    values = np.column_stack([columns[c] for c in features]).astype(np.float64, copy=False)
    if key_col is None:
        keys = [path.stem] * n
    else:
        raw = columns[key_col]
        keys = [_key_str(v) for v in raw.tolist()]
    timestamps = None if ts_col is None else _timestamps_ms(path, ts_col, columns[ts_col])
    row_index = np.arange(n, dtype=np.int64)
    values, keys, timestamps, row_index, report = _clean(path, values, keys, timestamps, row_index, nan_policy)
    if values.shape[0] == 0:
        raise DataFileError(f"{path} has no row left after removing rows with missing values.")
    if report.missing_values:
        log.warning(
            "%s: %d missing/non-finite values (%d forward-filled), %d rows dropped (policy %s)",
            path.name,
            report.missing_values,
            report.filled_values,
            report.dropped_rows,
            nan_policy,
        )
    return DataTable(
        features=tuple(features),
        values=values,
        keys=keys,
        timestamps_ms=timestamps,
        source=str(path),
        row_index=row_index,
        cleaning=report,
    )


def _pick_column(
    path: Path, columns: dict[str, np.ndarray], given: str | None, candidates: Iterable[str], what: str
) -> str | None:
    if given is not None:
        if given not in columns:
            raise DataFileError(f"{path} has no {what} column {given!r}.")
        return given
    return next((c for c in candidates if c in columns), None)


def _key_str(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))  # a numeric key column: "3", not "3.0"
    return str(v)


def _timestamps_ms(path: Path, name: str, col: np.ndarray) -> np.ndarray:
    if col.dtype == np.float64:
        if not np.all(np.isfinite(col)):
            raise DataFileError(f"{path} has empty or non-finite values in its timestamp column {name!r}.")
        scale = 1.0 if np.all(np.abs(col) > _MS_THRESHOLD) else 1000.0
        return np.round(col * scale).astype(np.int64)
    try:
        stamps = np.array([np.datetime64(s.rstrip("Z").replace(" ", "T"), "ms") for s in col.tolist()])
    except ValueError:
        raise DataFileError(
            f"{path} timestamp column {name!r} holds values that are neither epoch numbers nor ISO-8601 times."
        ) from None
    return stamps.astype(np.int64)


def _entity_indices(keys: Sequence[str], timestamps_ms: np.ndarray | None) -> list[tuple[str, np.ndarray]]:
    order: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        order.setdefault(k, []).append(i)
    out = []
    for k, idx_list in order.items():
        idx = np.asarray(idx_list, dtype=np.int64)
        if timestamps_ms is not None:
            idx = idx[np.argsort(timestamps_ms[idx], kind="stable")]
        out.append((k, idx))
    return out


def _clean(
    path: Path,
    values: np.ndarray,
    keys: list[str],
    timestamps: np.ndarray | None,
    row_index: np.ndarray,
    policy: str,
) -> tuple[np.ndarray, list[str], np.ndarray | None, np.ndarray, CleaningReport]:
    bad = ~np.isfinite(values)
    missing = int(bad.sum())
    if missing == 0:
        return values, keys, timestamps, row_index, CleaningReport(policy, 0, 0, 0)
    if policy == "error":
        row = int(np.nonzero(bad.any(axis=1))[0][0])
        raise DataFileError(
            f"{path} has {missing} missing or non-finite values (the first in data row {row + 1}) and the policy is "
            "'error'."
        )
    values = values.copy()
    values[bad] = np.nan
    filled = 0
    if policy == "ffill":
        for _, idx in _entity_indices(keys, timestamps):
            block = values[idx]
            before = int(np.isnan(block).sum())
            _ffill_rows(block)
            filled += before - int(np.isnan(block).sum())
            values[idx] = block
    keep = ~np.isnan(values).any(axis=1)
    dropped = int((~keep).sum())
    report = CleaningReport(policy, missing, filled, dropped)
    return (
        values[keep],
        [k for k, ok in zip(keys, keep) if ok],
        None if timestamps is None else timestamps[keep],
        row_index[keep],
        report,
    )


def _ffill_rows(block: np.ndarray) -> None:
    """Forward-fill NaNs down each column of a [n, F] block in place."""
    n = block.shape[0]
    mask = np.isnan(block)
    idx = np.where(mask, 0, np.arange(n)[:, None])
    np.maximum.accumulate(idx, axis=0, out=idx)
    filled = block[idx, np.arange(block.shape[1])]
    # Rows before a column's first valid value stay NaN (idx points at row 0, which is NaN there).
    block[:] = filled
