"""Alert lifecycle per entity and the alert event JSON (DESIGN.md contract 3).

Lifecycle (counted in *scored* events of the entity, so it is independent of wall-clock time and
of the scoring hop's rate):
- `open`: the first anomalous score while no alert is open and no cool-down is running;
- `update` (optional): while open, every `update_every` further anomalous scores, or when the
  score reaches `update_factor` times the last reported score;
- `resolved`: after `resolve_after` consecutive normal scores; then a cool-down of `cooldown`
  scored events starts during which new crossings open nothing (one incident, one alert).

`alert_id` is deterministic: sha256 of the model version, the entity key and the source topic,
partition and offset of the event that opened the alert. Re-processing the same input after a
crash therefore yields the same ids, and downstream dedupes on them. Each emitted event also has
a deterministic `event_id` (alert id + state + offset of the event that emitted it).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from stream_detector.core.events import NO_TIME

ALERT_SCHEMA = "stream-detector.alert/1"
OPEN, UPDATE, RESOLVED = "open", "update", "resolved"


@dataclass(frozen=True)
class AlertParams:
    resolve_after: int = 30  # consecutive normal scores that resolve an open alert (docs/quality.md)
    cooldown: int = 60  # scored events after a resolve during which a crossing opens nothing (docs/quality.md)
    update_every: int = 0  # while open, emit `update` every N further anomalous scores (0: never)
    update_factor: float = 0.0  # while open, emit `update` when score >= factor x last reported (0: never)
    top_k: int = 3  # features listed in top_features

    def validate(self) -> None:
        if self.resolve_after < 1:
            raise ValueError(f"resolve_after must be at least 1 scored event, got {self.resolve_after}.")
        if self.cooldown < 0 or self.update_every < 0:
            raise ValueError("cooldown and update_every must not be negative.")
        if self.update_factor != 0 and self.update_factor <= 1.0:
            raise ValueError(f"update_factor must be 0 (off) or above 1, got {self.update_factor}.")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}.")


@dataclass(frozen=True)
class Source:
    topic: str
    partition: int
    offset: int

    def to_json(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


class AlertState:
    """The lifecycle of one entity's alerts. `step` is pure bookkeeping; ids and JSON are built
    by the caller only when it returns an event."""

    __slots__ = (
        "alert_id",
        "opened_by",
        "normal_run",
        "since_report",
        "reported_score",
        "peak_score",
        "n_anomalous",
        "cooldown_left",
    )

    def __init__(self) -> None:
        self.alert_id: str | None = None  # set while an alert is open
        self.opened_by: Source | None = None
        self.normal_run = 0
        self.since_report = 0
        self.reported_score = 0.0
        self.peak_score = 0.0
        self.n_anomalous = 0
        self.cooldown_left = 0

    @property
    def is_open(self) -> bool:
        return self.alert_id is not None

    def step(self, score: float, anomalous: bool, params: AlertParams) -> str | None:
        """Advance by one scored event; returns the event to emit ('open'/'update'/'resolved') or None.
        After 'open' the caller must call `opened(alert_id, source)`."""
        if not self.is_open:
            if self.cooldown_left > 0:
                self.cooldown_left -= 1
                return None
            if anomalous:
                self.normal_run = 0
                self.since_report = 0
                self.reported_score = score
                self.peak_score = score
                self.n_anomalous = 1
                return OPEN
            return None
        if anomalous:
            self.normal_run = 0
            self.since_report += 1
            self.n_anomalous += 1
            self.peak_score = max(self.peak_score, score)
            if (params.update_every and self.since_report >= params.update_every) or (
                params.update_factor and score >= self.reported_score * params.update_factor
            ):
                self.since_report = 0
                self.reported_score = score
                return UPDATE
            return None
        self.normal_run += 1
        if self.normal_run >= params.resolve_after:
            return RESOLVED
        return None

    def opened(self, alert_id: str, source: Source) -> None:
        self.alert_id = alert_id
        self.opened_by = source

    def closed(self, params: AlertParams) -> None:
        self.alert_id = None
        self.opened_by = None
        self.normal_run = 0
        self.cooldown_left = params.cooldown

    def state(self) -> dict[str, Any]:
        return {
            "alert_id": self.alert_id,
            "opened_by": None if self.opened_by is None else self.opened_by.to_json(),
            "normal_run": self.normal_run,
            "since_report": self.since_report,
            "reported_score": self.reported_score,
            "peak_score": self.peak_score,
            "n_anomalous": self.n_anomalous,
            "cooldown_left": self.cooldown_left,
        }

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> AlertState:
        s = cls()
        s.alert_id = d["alert_id"]
        ob = d.get("opened_by")
        s.opened_by = None if ob is None else Source(str(ob["topic"]), int(ob["partition"]), int(ob["offset"]))
        s.normal_run = int(d["normal_run"])
        s.since_report = int(d["since_report"])
        s.reported_score = float(d["reported_score"])
        s.peak_score = float(d["peak_score"])
        s.n_anomalous = int(d["n_anomalous"])
        s.cooldown_left = int(d["cooldown_left"])
        return s


def make_alert_id(model_version: str, key: str, source: Source) -> str:
    h = hashlib.sha256(
        "\x1f".join((model_version, key, source.topic, str(source.partition), str(source.offset))).encode()
    )
    return h.hexdigest()[:32]


def make_event_id(alert_id: str, state: str, source: Source) -> str:
    h = hashlib.sha256("\x1f".join((alert_id, state, source.topic, str(source.partition), str(source.offset))).encode())
    return h.hexdigest()[:32]


def iso_utc(ms: int | float) -> str:
    """ISO-8601 UTC with millisecond precision and a 'Z' suffix."""
    dt = datetime.fromtimestamp(ms / 1000.0, tz=UTC)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def top_features(errors: np.ndarray, names: Sequence[str], k: int) -> list[dict[str, Any]]:
    """The k features with the largest share of the scoring error, largest first (ties: column order)."""
    errors = np.asarray(errors, dtype=np.float64)
    total = float(errors.sum())
    k = min(k, errors.size)
    order = np.argsort(-errors, kind="stable")[:k]
    return [
        {"name": names[i], "share": round(float(errors[i]) / total, 4) if total > 0 else 0.0, "error": float(errors[i])}
        for i in order
    ]


def alert_event(
    *,
    state: str,
    alert: AlertState,
    key: str,
    source: Source,
    event_time_ms: int,
    detected_at_ms: float,
    score: float,
    threshold: float,
    model_version: str,
    feature_errors: np.ndarray,
    feature_names: Sequence[str],
    top_k: int,
    calibrated: float | None = None,
    calibrated_threshold: float | None = None,
) -> dict[str, Any]:
    """The contract-3 alert event (a JSON-ready dict) for an event just emitted by `alert.step`.
    `calibrated` is the score's surprise (core/calibration.py) where the threshold method has one."""
    assert alert.alert_id is not None and alert.opened_by is not None
    return {
        "schema": ALERT_SCHEMA,
        "alert_id": alert.alert_id,
        "event_id": make_event_id(alert.alert_id, state, source),
        "state": state,
        "key": key,
        "event_time": None if event_time_ms == NO_TIME else iso_utc(event_time_ms),
        "detected_at": iso_utc(detected_at_ms),
        "score": float(score),
        "threshold": float(threshold),
        "calibrated_score": None
        if calibrated is None or not math.isfinite(calibrated)
        else round(float(calibrated), 4),
        "calibrated_threshold": calibrated_threshold,
        "peak_score": float(alert.peak_score),
        "anomalous_scores": int(alert.n_anomalous),
        "model_version": model_version,
        "source": source.to_json(),
        "opened_by": alert.opened_by.to_json(),
        "top_features": top_features(feature_errors, feature_names, top_k),
    }
