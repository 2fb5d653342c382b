"""Alert lifecycle per entity and the alert event JSON (DESIGN.md contract 3).

Lifecycle (counted in *scored* events of the entity, so it is independent of wall-clock time and
of the scoring hop's rate):
- `open`: the first anomalous score while no alert is open and no cool-down is running;
- `update` (optional): while open, every `update_every` further anomalous scores, or when the
  score reaches `update_factor` times the last reported score;
- `resolved`: after `resolve_after` consecutive normal scores; then a cool-down of `cooldown`
  scored events starts during which new crossings open nothing (one incident, one alert).
- flapping (`resolve_backoff` N): an alert that opens within the resolve period after the previous
  one resolved (cool-down included) is the same trouble coming back; its resolve period doubles,
  up to N times (2**N x `resolve_after`). One such period without a new alert and the entity is
  back to `resolve_after`.

Incidents (core/storms.py): every `open` joins an incident; its events carry `incident_id`,
`page` (the first alert of an incident), `incident_size` and `storm`. Feedback: a false-positive
verdict on an alert sets a floor, a raw score at or below which the entity's scores are not
anomalous (`learn_false_positive`, bounded by `feedback_max_factor`), for the features that alert
named at its peak (its `top_k`): a later score is held to the floor of the feature that leads it
(`floor_for`), so a verdict on a noisy metric's burst does not hide an incident on another metric
of the same entity. On a one-feature entity that is every score.
`silenced` is null here; the service fills it in from the control topic's silences.

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
from stream_detector.core.storms import Membership

ALERT_SCHEMA = "stream-detector.alert/1"
OPEN, UPDATE, RESOLVED = "open", "update", "resolved"


@dataclass(frozen=True)
class AlertParams:
    resolve_after: int = 150  # consecutive normal scores that resolve an open alert (docs/quality.md)
    cooldown: int = 60  # scored events after a resolve during which a crossing opens nothing (docs/quality.md)
    resolve_backoff: int = 1  # a flapping entity's resolve period doubles up to this many times (0: never)
    update_every: int = 0  # while open, emit `update` every N further anomalous scores (0: never)
    update_factor: float = 0.0  # while open, emit `update` when score >= factor x last reported (0: never)
    top_k: int = 3  # features listed in top_features
    feedback_headroom: float = 1.5  # a false positive's floor: this x the episode's peak score ...
    feedback_max_factor: float = 10.0  # ... but never above this x the entity's threshold at the verdict

    def validate(self) -> None:
        if self.resolve_after < 1:
            raise ValueError(f"resolve_after must be at least 1 scored event, got {self.resolve_after}.")
        if self.cooldown < 0 or self.update_every < 0 or self.resolve_backoff < 0:
            raise ValueError("cooldown, update_every and resolve_backoff must not be negative.")
        if self.update_factor != 0 and self.update_factor <= 1.0:
            raise ValueError(f"update_factor must be 0 (off) or above 1, got {self.update_factor}.")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}.")
        if self.feedback_headroom < 1.0 or self.feedback_max_factor < 1.0:
            raise ValueError("feedback_headroom and feedback_max_factor must be at least 1.")


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
        "flaps",
        "watch_left",
        "incident_id",
        "feedback_floor",
        "feedback_floors",
        "feedback_cap",
        "peak_features",
        "recent",
    )

    _RECENT = 4  # resolved alerts remembered for feedback that comes after they ended

    def __init__(self) -> None:
        self.alert_id: str | None = None  # set while an alert is open
        self.opened_by: Source | None = None
        self.normal_run = 0
        self.since_report = 0
        self.reported_score = 0.0
        self.peak_score = 0.0
        self.n_anomalous = 0
        self.cooldown_left = 0
        self.flaps = 0  # resolve_backoff: alerts in a row that came back soon after the previous one resolved
        self.watch_left = 0  # ... scored events left after a resolve in which a new alert counts as one
        self.incident_id: str | None = None  # the incident of the open alert (core/storms.py)
        # Floors of false-positive verdicts, raw scores at or below which a score is not anomalous:
        # per feature (index -> floor), for the score that feature leads; `feedback_floor` for every
        # feature (states written before floors were per feature).
        self.feedback_floor = 0.0
        self.feedback_floors: dict[int, float] = {}
        self.feedback_cap = 0.0  # the open alert was called a false positive: its floor's bound, set on resolve
        self.peak_features: tuple[int, ...] = ()  # the open alert's top features at its peak score
        # (alert id, peak score, top features at the peak; None: every feature) of the last resolved alerts
        self.recent: list[tuple[str, float, tuple[int, ...] | None]] = []

    @property
    def is_open(self) -> bool:
        return self.alert_id is not None

    def resolve_period(self, params: AlertParams) -> int:
        """Consecutive normal scores that resolve this entity's open alert (doubled per flap)."""
        return params.resolve_after << min(self.flaps, params.resolve_backoff)

    def step(self, score: float, anomalous: bool, params: AlertParams) -> str | None:
        """Advance by one scored event; returns the event to emit ('open'/'update'/'resolved') or None.
        After 'open' the caller must call `opened(alert_id, source)`."""
        if not self.is_open:
            watching = self.watch_left > 0
            if watching:
                self.watch_left -= 1
                if self.watch_left == 0 and not anomalous:
                    self.flaps = 0  # a whole resolve period without trouble
            if self.cooldown_left > 0:
                self.cooldown_left -= 1
                return None
            if anomalous:
                self.flaps = self.flaps + 1 if watching else 0
                self.watch_left = 0
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
        if self.normal_run >= self.resolve_period(params):
            return RESOLVED
        return None

    def opened(self, alert_id: str, source: Source) -> None:
        self.alert_id = alert_id
        self.opened_by = source

    def note_peak(self, score: float, errors: np.ndarray, k: int) -> None:
        """Remember the features that lead the open alert at its peak (call after an anomalous
        `step`): a false-positive verdict excuses those."""
        if self.is_open and score >= self.peak_score:
            self.peak_features = tuple(top_indices(errors, k))

    def floor_for(self, errors: np.ndarray) -> float:
        """The verdicts' floor for a score whose per-feature errors are `errors`: the floor of the
        feature that leads it (0: no verdict covers it)."""
        if not self.feedback_floors:
            return self.feedback_floor
        return max(self.feedback_floor, self.feedback_floors.get(int(np.argmax(errors)), 0.0))

    def _raise_floors(self, features: tuple[int, ...] | None, floor: float) -> None:
        if features is None:
            self.feedback_floor = max(self.feedback_floor, floor)
            return
        for f in features:
            self.feedback_floors[f] = max(self.feedback_floors.get(f, 0.0), floor)

    def closed(self, params: AlertParams) -> None:
        if self.alert_id is not None:
            self.recent = [*self.recent, (self.alert_id, self.peak_score, self.peak_features or None)][-self._RECENT :]
        if self.feedback_cap:  # a false positive while open: the floor covers the whole episode
            self._raise_floors(
                self.peak_features or None, min(self.peak_score * params.feedback_headroom, self.feedback_cap)
            )
            self.feedback_cap = 0.0
        self.peak_features = ()
        if params.resolve_backoff:
            self.watch_left = params.cooldown + self.resolve_period(params)
        self.alert_id = None
        self.opened_by = None
        self.normal_run = 0
        self.cooldown_left = params.cooldown

    def learn_false_positive(self, alert_id: str, threshold: float, params: AlertParams) -> float | None:
        """A `false_positive` verdict on `alert_id` (open now or among the recent ones): scores up to
        `feedback_headroom` x that episode's peak, led by one of the features that led it at its
        peak, stop being anomalous for this entity, bounded by `feedback_max_factor` x its current
        `threshold`. Returns the floor, or None if the alert is not this entity's. Applying it again
        changes nothing. For an alert still open, the floor grows with the episode's peak until it
        resolves."""
        cap = threshold * params.feedback_max_factor
        if alert_id == self.alert_id:  # no features known (an alert restored from an older state): every one
            peak, features = self.peak_score, self.peak_features or None
            self.feedback_cap = max(self.feedback_cap, cap)
        else:
            found = next((r for r in self.recent if r[0] == alert_id), None)
            if found is None:
                return None
            _, peak, features = found
        floor = min(peak * params.feedback_headroom, cap)
        self._raise_floors(features, floor)
        return floor

    def knows(self, alert_id: str) -> bool:
        return alert_id == self.alert_id or any(r[0] == alert_id for r in self.recent)

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
            "flaps": self.flaps,
            "watch_left": self.watch_left,
            "incident_id": self.incident_id,
            "feedback_floor": self.feedback_floor,
            "feedback_floors": [[f, v] for f, v in sorted(self.feedback_floors.items())],
            "feedback_cap": self.feedback_cap,
            "peak_features": list(self.peak_features),
            "recent": [[a, p, None if fs is None else list(fs)] for a, p, fs in self.recent],
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
        # absent from states written before incidents and feedback existed
        s.incident_id = d.get("incident_id")
        s.flaps = int(d.get("flaps", 0))  # absent from states written before resolve_backoff
        s.watch_left = int(d.get("watch_left", 0))
        s.feedback_floor = float(d.get("feedback_floor", 0.0))
        s.feedback_cap = float(d.get("feedback_cap", 0.0))
        # absent from states written before floors were per feature: their floor and their
        # remembered alerts cover every feature, as they did
        s.feedback_floors = {int(f): float(v) for f, v in d.get("feedback_floors", [])}
        s.peak_features = tuple(int(f) for f in d.get("peak_features", []))
        s.recent = [
            (str(r[0]), float(r[1]), None if len(r) < 3 or r[2] is None else tuple(int(f) for f in r[2]))
            for r in d.get("recent", [])
        ]
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


def top_indices(errors: np.ndarray, k: int) -> list[int]:
    """The indices of the k largest per-feature errors, largest first (ties: column order)."""
    return [int(i) for i in np.argsort(-np.asarray(errors), kind="stable")[:k]]


def top_features(errors: np.ndarray, names: Sequence[str], k: int) -> list[dict[str, Any]]:
    """The k features with the largest share of the scoring error, largest first (ties: column order)."""
    errors = np.asarray(errors, dtype=np.float64)
    total = float(errors.sum())
    order = top_indices(errors, k)
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
    incident: Membership | None = None,
) -> dict[str, Any]:
    """The contract-3 alert event (a JSON-ready dict) for an event just emitted by `alert.step`.
    `calibrated` is the score's surprise (core/calibration.py) where the threshold method has one;
    `incident` its incident (core/storms.py; None: an incident of its own that pages on open)."""
    assert alert.alert_id is not None and alert.opened_by is not None
    if incident is None:
        incident = Membership(alert.incident_id or alert.alert_id, state == OPEN, 1, False)
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
        "incident_id": incident.incident_id,
        "page": incident.page,
        "incident_size": incident.size,
        "storm": incident.storm,
        "silenced": None,
    }
