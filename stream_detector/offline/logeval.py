"""Session-level detection quality for logs: an entity (e.g. an HDFS block) is flagged if it had an
alert; labels are per entity. Reads `replay --format log`'s entities.csv and a label file
(`entity,label` with a header, label Anomaly/Normal or 1/0) — `stream-detector evaluate --sessions`.

Figures: precision, recall, F1 over the entities evaluated (optionally only those whose first
line comes after `start_after_ms`, e.g. after the training period), average precision of the
entity's largest score (threshold-free; entities with equal scores form one threshold, see
measures.py, which both evaluations share), and time-to-detect (seconds from an anomalous
entity's first line to its first alert: median, p90, max).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stream_detector.offline.measures import average_precision, point_metrics

ANOMALY_WORDS = frozenset(("anomaly", "anomalous", "abnormal", "1", "true"))


class LogEvalError(Exception):
    """Evaluation cannot run; one sentence."""


@dataclass(frozen=True)
class EntityDecisions:
    keys: list[str]
    first_ms: np.ndarray
    alerted: np.ndarray  # bool
    first_alert_ms: np.ndarray  # int64, -1 = none
    max_score: np.ndarray


def read_entities(path: Path) -> EntityDecisions:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise LogEvalError(f"entity decisions file {path} does not exist.") from None
    if rows and not {"key", "first_ms", "alerted", "first_alert_ms", "max_score"} <= set(rows[0]):
        raise LogEvalError(f"{path} is not an entities.csv written by 'replay --format log'.")
    return EntityDecisions(
        [r["key"] for r in rows],
        np.array([int(r["first_ms"]) for r in rows], dtype=np.int64),
        np.array([r["alerted"] == "1" for r in rows], dtype=bool),
        np.array([int(r["first_alert_ms"]) if r["first_alert_ms"] else -1 for r in rows], dtype=np.int64),
        np.array([float(r["max_score"]) for r in rows], dtype=np.float64),
    )


def read_entity_labels(path: Path) -> dict[str, bool]:
    """entity -> anomalous, from a CSV whose first column is the entity and which has a 'Label' column."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise LogEvalError(f"label file {path} does not exist.") from None
    if not rows:
        raise LogEvalError(f"label file {path} is empty.")
    header = [h.strip().lower() for h in rows[0]]
    if "label" not in header:
        raise LogEvalError(f"label file {path} needs a header with a 'Label' column (entity first).")
    li = header.index("label")
    return {r[0].strip(): r[li].strip().lower() in ANOMALY_WORDS for r in rows[1:] if len(r) > li}


def prf(flag: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """`measures.point_metrics` over entities (flagged vs anomalous), rounded to 4 digits; an
    undefined precision or recall (nothing flagged, nothing anomalous) is reported as 0."""
    m = point_metrics(truth, flag)
    return {
        "precision": _round(m["precision"]),
        "recall": _round(m["recall"]),
        "f1": _round(m["f1"]),
        "tp": m["tp"],
        "fp": m["fp"],
        "fn": m["fn"],
    }


def _round(v: float | None) -> float:
    return 0.0 if v is None else round(v, 4)


def session_metrics(dec: EntityDecisions, labels: dict[str, bool], start_after_ms: int | None = None) -> dict[str, Any]:
    keep = np.ones(len(dec.keys), dtype=bool)
    if start_after_ms is not None:
        keep &= dec.first_ms > start_after_ms
    missing = [k for k, ok in zip(dec.keys, keep.tolist()) if ok and k not in labels]
    if missing:
        raise LogEvalError(f"{len(missing)} evaluated entities have no label (e.g. {missing[0]!r}).")
    idx = np.flatnonzero(keep)
    truth = np.array([labels[dec.keys[i]] for i in idx.tolist()], dtype=bool)
    flag = dec.alerted[idx]
    ap = average_precision(truth, dec.max_score[idx])  # entities with equal max scores count together
    out = {
        "entities": int(idx.size),
        "anomalous": int(truth.sum()),
        **prf(flag, truth),
        "average_precision": float("nan") if ap is None else round(ap, 4),
    }
    det = idx[flag & truth]
    if det.size:
        ttd = (dec.first_alert_ms[det] - dec.first_ms[det]) / 1000.0
        out["time_to_detect_s"] = {
            "median": round(float(np.median(ttd)), 1),
            "p90": round(float(np.quantile(ttd, 0.9)), 1),
            "max": round(float(ttd.max()), 1),
            "at_first_line": int((ttd <= 0).sum()),
        }
    return out


def format_session_summary(m: dict[str, Any]) -> str:
    s = (
        f"{m['entities']} entities ({m['anomalous']} anomalous): precision {m['precision']:.3f}, "
        f"recall {m['recall']:.3f}, "
        f"F1 {m['f1']:.3f} (tp {m['tp']}, fp {m['fp']}, fn {m['fn']}); average precision {m['average_precision']}"
    )
    if "time_to_detect_s" in m:
        t = m["time_to_detect_s"]
        s += f"; time to detect median {t['median']} s, p90 {t['p90']} s ({t['at_first_line']} at their first line)"
    return s


def run_sessions_cli(args: Any) -> int:
    """`stream-detector evaluate --sessions` (called by evaluate.run)."""
    import sys

    import orjson

    try:
        m = session_metrics(read_entities(args.scores), read_entity_labels(args.labels), args.start_after_ms)
        out_dir = args.out or args.scores.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        m["entities_file"], m["labels"] = str(args.scores), str(args.labels)
        (out_dir / "session_metrics.json").write_bytes(orjson.dumps(m, option=orjson.OPT_INDENT_2))
    except LogEvalError as e:
        print(f"stream-detector evaluate: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError) as e:
        print(f"stream-detector evaluate: cannot read the entity decisions or labels ({e}).", file=sys.stderr)
        return 2
    print(format_session_summary(m))
    print(f"wrote {out_dir / 'session_metrics.json'}")
    return 0
