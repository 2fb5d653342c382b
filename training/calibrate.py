"""Calibration: score the validation windows with the exported ONNX model exactly as the service
will (bundle.ScoringRule on ONNX Runtime output), then describe their distribution for the
calibrated thresholds (core/calibration.py: quantiles and Pareto tail of each score and of runs of
consecutive scores) and keep a suggested threshold (the `threshold_quantile` quantile)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stream_detector.core.bundle import INPUT_NAME, OUTPUT_NAME, Calibration, ScoringRule
from stream_detector.core.calibration import calibrate_scores
from training.export import ort_session


@dataclass(frozen=True)
class ValidationScores:
    scores: np.ndarray  # float32 [n]
    feature_errors: np.ndarray  # float32 [n, F]


def score_windows(
    onnx_bytes: bytes, data: np.ndarray, starts: np.ndarray, window: int, scoring: ScoringRule, chunk: int = 1024
) -> ValidationScores:
    """Scores of the windows starting at `starts` in normalised `data` [N, F], through ONNX Runtime."""
    session = ort_session(onnx_bytes)
    offsets = np.arange(window)
    scores, errors = [], []
    for i in range(0, len(starts), chunk):
        x = np.ascontiguousarray(data[starts[i : i + chunk, None] + offsets], dtype=np.float32)
        recon = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        s, fe = scoring.scores(x, recon)
        scores.append(s)
        errors.append(fe)
    return ValidationScores(np.concatenate(scores), np.concatenate(errors))


def calibrate(
    scores: np.ndarray,
    threshold_quantile: float,
    starts: np.ndarray | None = None,
    entities: Sequence[str] | None = None,
) -> Calibration:
    """Calibration of validation scores given in window-start order; `starts` (the windows' start
    rows) tells where one uninterrupted stretch ends, so runs of scores never cross a gap, and
    `entities` (each window's entity) puts every entity's scores in its own frame."""
    if scores.size == 0:
        raise ValueError("no validation scores to calibrate on.")
    segments = None
    if starts is not None:
        starts = np.asarray(starts, dtype=np.int64)
        segments = np.concatenate([[0], np.flatnonzero(np.diff(starts) != 1) + 1])
    return calibrate_scores(scores, threshold_quantile, segments, entities=entities)


def score_histogram(scores: np.ndarray, bins: int = 60) -> dict[str, list[float]]:
    """Log-spaced histogram of positive scores (for report.png without keeping every score)."""
    lo = max(float(np.min(scores)), 1e-12)
    hi = max(float(np.max(scores)), lo * 1.0001)
    edges = np.geomspace(lo, hi, bins + 1)
    counts, _ = np.histogram(np.clip(scores, lo, hi), bins=edges)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
