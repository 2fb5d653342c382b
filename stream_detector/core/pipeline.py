"""`DetectorCore`: windows -> scorer -> thresholds -> alerts for one `EventBatch`.

The one detection path, shared by the Kafka service (`stream-detector run`) and by `replay`, so
backtests and production cannot drift apart. It holds all per-entity state: the window store's
ring buffers and, by the same slot, each entity's threshold object and alert lifecycle.

Per batch: normalise all rows at once with the bundle's normaliser, append them to the window
store (which gathers the windows of the events due for scoring, each ending at its event), score
those windows in micro-batches, then walk the scored events in batch order through their
entity's threshold (judge, then learn if normal) and alert lifecycle.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream_detector.core.alerts import OPEN, RESOLVED, AlertParams, AlertState, Source, alert_event, make_alert_id
from stream_detector.core.bundle import Bundle
from stream_detector.core.calibration import ScoreReference
from stream_detector.core.device_windows import DeviceWindows
from stream_detector.core.events import NO_TIME, EventBatch
from stream_detector.core.scorer import Scorer
from stream_detector.core.storms import StormGrouper, StormParams
from stream_detector.core.thresholds import (
    Threshold,
    ThresholdParams,
    make_threshold,
    resolve_method,
    threshold_from_state,
)
from stream_detector.core.windows import WindowStore

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass(frozen=True)
class DetectionSettings:
    """Detection knobs; the service's `Settings` and `replay`'s flags build one of these."""

    hop: int = 1  # score every k-th event of an entity (once its window is full)
    max_entities: int = 100_000  # tracked (partition, entity) pairs; beyond it the least recently seen go
    idle_timeout_ms: int | None = 24 * 3600 * 1000  # evict entities silent this long (event time); None: never
    restart_after_gap: bool = True  # a time gap (as training defined it) starts the entity's window again
    threshold: ThresholdParams = field(default_factory=ThresholdParams)
    alerts: AlertParams = field(default_factory=AlertParams)
    storms: StormParams = field(default_factory=StormParams)

    def validate(self) -> None:
        """Raise ValueError with one sentence if a value is unusable."""
        if self.hop < 1:
            raise ValueError(f"the scoring hop must be at least 1, got {self.hop}.")
        if self.max_entities < 1:
            raise ValueError(f"max_entities must be at least 1, got {self.max_entities}.")
        if self.idle_timeout_ms is not None and self.idle_timeout_ms <= 0:
            raise ValueError(f"idle_timeout_ms must be positive or unset, got {self.idle_timeout_ms}.")
        self.threshold.validate()
        self.alerts.validate()
        self.storms.validate()


@dataclass(frozen=True)
class BatchResult:
    """Outcome of one batch. Arrays indexed by scored event (m of them), in batch order."""

    n_events: int
    index: np.ndarray  # int64 [m]: index in the batch of each scored event
    score: np.ndarray  # float32 [m]
    threshold: np.ndarray  # float32 [m]: the threshold the score was judged against
    anomalous: np.ndarray  # bool [m]: score above threshold
    alert_open: np.ndarray  # bool [m]: the entity is in an open alert after this event
    alert_event: list[str | None]  # [m]: 'open' / 'update' / 'resolved' emitted at this event, or None
    alerts: list[dict[str, Any]]  # contract-3 events, in emission order, ready to serialise
    open_after: np.ndarray | None = None  # bool [n]: entity in an open alert after each batch event (on request)
    evicted: int = 0  # entities evicted by the window store during this batch
    gap_restarts: int = 0  # entity windows started again after a time gap during this batch

    @property
    def n_scored(self) -> int:
        return int(self.index.size)


class DetectorCore:
    def __init__(
        self,
        bundle: Bundle,
        scorer: Scorer,
        settings: DetectionSettings | None = None,
        clock: Callable[[], float] = time.time,
        device_windows: bool | None = None,
    ) -> None:
        settings = settings or DetectionSettings()
        settings.validate()
        if scorer.bundle is not bundle and scorer.bundle.model_sha256 != bundle.model_sha256:
            raise ValueError("the scorer was built for a different model bundle than the detector.")
        self.bundle = bundle
        self.scorer = scorer
        self.settings = settings
        self._clock = clock
        self.store = WindowStore(
            bundle.window,
            bundle.n_features,
            max_entities=settings.max_entities,
            idle_timeout_ms=settings.idle_timeout_ms,
            hop=settings.hop,
            gap_factor=self._gap_factor(bundle),
        )
        self._thresholds: list[Threshold | None] = []
        self._alerts: list[AlertState | None] = []
        self.storms = StormGrouper(settings.storms)
        self._features = list(bundle.features)
        self._use_calibration(bundle)
        # Device-resident windows (device_windows.py): None = on when the scorer runs on CUDA.
        self._device_mode = device_windows
        self.device = self._device_for(bundle, scorer)

    def _use_calibration(self, bundle: Bundle) -> None:
        """The bundle's calibrated threshold, score distribution and the threshold method they allow
        (ValueError with one sentence for a method the bundle cannot support)."""
        reference = ScoreReference.from_calibration(bundle.calibration, bundle.training.get("entities"))
        self.threshold_method = resolve_method(self.settings.threshold, reference)  # raises before anything changed
        self._initial_threshold = float(bundle.calibration.threshold)
        self._reference = reference
        self._calibrated_level = self.settings.threshold.alert_level if self.threshold_method == "calibrated" else None

    def _gap_factor(self, bundle: Bundle) -> float | None:
        """A window restarts after a silence longer than a window (W steps), and never after a shorter
        one than training split its windows at (the bundle's gap_factor). Training splits at every
        gap, but a restart leaves the entity unscored for W - 1 events: after a shorter silence that
        would blind it for longer than it was silent, and a window with a few readings missing is
        close to what training saw. None (no restarts) when the bundle records no gap rule, or
        `restart_after_gap` is off."""
        if not self.settings.restart_after_gap or bundle.gap_factor is None:
            return None
        return max(bundle.gap_factor, float(bundle.window))

    def _device_for(self, bundle: Bundle, scorer: Scorer) -> DeviceWindows | None:
        mode = self._device_mode
        if mode or (mode is None and scorer.on_cuda):
            return DeviceWindows(bundle, scorer)  # fills its ring from the host store at the first batch
        return None

    # ------------------------------------------------------------------ the batch path
    def process(self, batch: EventBatch, row_alert_state: bool = False) -> BatchResult:
        """Run one batch through windows, scorer, thresholds and alerts. With `row_alert_state`,
        the result also says for every batch event whether its entity is in an open alert after it
        (what `replay` writes for rows that were not scored)."""
        if batch.n_features != self.bundle.n_features:
            raise ValueError(
                f"the batch has {batch.n_features} features per event; the model expects {self.bundle.n_features}."
            )
        cap = self.settings.max_entities
        if batch.n > cap:  # a sub-batch of <= cap events never holds more entities than the store may track
            parts = [
                self.process(batch.slice(i, min(batch.n, i + cap)), row_alert_state) for i in range(0, batch.n, cap)
            ]
            return _concat_results(parts)

        rows = self.bundle.normaliser.apply(batch.rows)
        if self.device is not None:
            self.device.before_ingest(self.store)
        ing = self.store.ingest(batch.partition, batch.keys, rows, batch.event_time_ms, gather=self.device is None)
        self._ensure_capacity()
        for s in ing.reset_slots.tolist():
            self._thresholds[s] = None
            self._alerts[s] = None
        start_open: dict[int, bool] = {}
        if row_alert_state:
            for s in set(ing.slots.tolist()):
                a = self._alerts[s]
                start_open[s] = a is not None and a.is_open

        if self.device is None:
            scores, errors = self.scorer.score(ing.windows)
        else:  # rows to the device ring, windows gathered and scored there (device_windows.py)
            scores, errors = self.device.process(self.store, ing, rows)
        m = ing.due.size
        thresholds = np.empty(m, dtype=np.float32)
        anomalous = np.zeros(m, dtype=bool)
        alert_open = np.zeros(m, dtype=bool)
        emitted: list[str | None] = [None] * m
        alerts: list[dict[str, Any]] = []
        detected_at_ms = self._clock() * 1000.0
        params = self.settings.alerts
        model_version = self.bundle.model_version
        thr_by_slot, alert_by_slot = self._thresholds, self._alerts
        thr_params, initial, method, reference = (
            self.settings.threshold,
            self._initial_threshold,
            self.threshold_method,
            self._reference,
        )
        calibrated = method == "calibrated"
        due_list = ing.due.tolist()
        thr_values = [0.0] * m
        # The hot loop: every scored event is judged (and learned from) by its entity's threshold;
        # only events that are anomalous, or whose entity has an alert open, cooling down or watched for
        # flapping, go through the alert lifecycle (for the others `AlertState.step` changes nothing).
        # They go through it at once, not after the batch: what an alert does to its entity's threshold
        # (`alert_opened`) and floor (`closed`) holds from the entity's next event on, however the
        # stream is cut into batches.
        for j, (s, score) in enumerate(zip(ing.slots[ing.due].tolist(), scores.tolist())):
            thr = thr_by_slot[s]
            if thr is None:
                thr = thr_by_slot[s] = make_threshold(method, thr_params, initial, reference, batch.keys[due_list[j]])
            a = alert_by_slot[s]
            if a is None:
                a = alert_by_slot[s] = AlertState()
            t, anom = thr.observe(score)
            if a.feedback_floor or a.feedback_floors:  # false-positive verdicts (AlertState.learn_false_positive)
                floor = a.floor_for(errors[j])
                anom = anom and score > floor
                t = max(t, floor)
            thr_values[j] = t
            if anom:
                anomalous[j] = True  # the threshold's judgement (a calibrated run can be anomalous below t)
            if anom or a.alert_id is not None or a.cooldown_left or a.watch_left:
                ev = a.step(score, anom, params)
                if ev is not None:
                    i = due_list[j]
                    key = batch.keys[i]
                    source = Source(batch.topic[i], int(batch.partition[i]), int(batch.offset[i]))
                    event_time_ms = int(batch.event_time_ms[i])
                    if ev == OPEN:
                        alert_id = make_alert_id(model_version, key, source)
                        a.opened(alert_id, source)
                        thr.alert_opened()
                        incident = self.storms.join(
                            alert_id, key, detected_at_ms if event_time_ms == NO_TIME else event_time_ms
                        )
                        a.incident_id = incident.incident_id
                    else:
                        incident = self.storms.member(a.incident_id or a.alert_id or "")
                    alerts.append(
                        alert_event(
                            state=ev,
                            alert=a,
                            key=key,
                            source=source,
                            event_time_ms=event_time_ms,
                            detected_at_ms=detected_at_ms,
                            score=score,
                            threshold=t,
                            model_version=model_version,
                            feature_errors=errors[j],
                            feature_names=self._features,
                            top_k=params.top_k,
                            # its calibrated value as of this event (the run moves on with later ones)
                            calibrated=thr.surprise(score) if calibrated else None,
                            calibrated_threshold=self._calibrated_level,
                            incident=incident,
                        )
                    )
                    if ev == RESOLVED:
                        a.closed(params)
                    emitted[j] = ev
                if anom:
                    a.note_peak(score, errors[j], params.top_k)
                alert_open[j] = a.is_open
        thresholds[:] = thr_values

        open_after = None
        if row_alert_state:
            open_after = _row_open_state(ing.slots, ing.due, alert_open, start_open)
        return BatchResult(
            batch.n,
            ing.due,
            scores,
            thresholds,
            anomalous,
            alert_open,
            emitted,
            alerts,
            open_after,
            ing.evicted,
            ing.gap_restarts,
        )

    def _ensure_capacity(self) -> None:
        extra = self.store.capacity - len(self._thresholds)
        if extra > 0:
            self._thresholds.extend([None] * extra)
            self._alerts.extend([None] * extra)

    # ------------------------------------------------------------------ model hot reload
    def swap_model(self, bundle: Bundle, scorer: Scorer) -> None:
        """Replace the model between two batches (reload.py checked that features and window are
        the same). Windows keep their rows, re-normalised with the new bundle's normaliser; open
        alerts keep their id; per-entity thresholds were learned on the old model's score scale, so
        they restart from the new bundle's calibration."""
        if tuple(bundle.features) != tuple(self.bundle.features) or bundle.window != self.bundle.window:
            raise ValueError("the new model reads other features or another window length; it needs a restart.")
        self._use_calibration(bundle)  # first: it refuses a bundle whose calibration the method cannot use
        self.store.renormalise(self.bundle.normaliser, bundle.normaliser)
        self.store.gap_factor = self._gap_factor(bundle)
        self.bundle = bundle
        self.scorer = scorer
        self._features = list(bundle.features)
        self._thresholds = [None] * len(self._thresholds)
        for a in self._alerts:  # feedback floors are raw scores of the old model
            if a is not None:
                a.feedback_floor, a.feedback_floors = 0.0, {}
        self.device = self._device_for(bundle, scorer)  # the new model's graphs; the ring is re-sent

    # ------------------------------------------------------------------ feedback (control topic)
    def learn_false_positive(self, alert_id: str, key: str | None = None) -> tuple[int, str, float] | None:
        """A `false_positive` verdict: the entity whose open or recent alert is `alert_id` stops
        alerting on scores like that episode's (AlertState.learn_false_positive). Returns
        (partition, key, floor), or None when no entity held here knows the alert (another
        instance of the group may hold it). Call it only between batches."""
        for partition, k in self.store.entities():
            slot = None if key is not None and k != key else self.store.slot_of(partition, k)
            a = None if slot is None else self._alerts[slot]
            if slot is None or a is None or not a.knows(alert_id):
                continue
            thr = self._thresholds[slot]
            threshold = thr.threshold() if thr is not None else self._initial_threshold
            floor = a.learn_false_positive(alert_id, threshold, self.settings.alerts)
            return None if floor is None else (partition, k, floor)
        return None

    # ------------------------------------------------------------------ rebalance, changelog
    def drop_partitions(self, partitions: Iterable[int]) -> int:
        """Forget all state of entities on these partitions (revoked or lost); returns how many."""
        freed = self.store.drop_partitions(partitions)
        for s in freed:
            if s < len(self._thresholds):
                self._thresholds[s] = None
                self._alerts[s] = None
        return len(freed)

    def entities(self) -> list[tuple[int, str]]:
        return self.store.entities()

    def summary(self, max_thresholds: int = 10_000) -> tuple[int, int, np.ndarray]:
        """(tracked entities, entities in an open alert, current thresholds of up to
        `max_thresholds` entities) for the metrics; call it only between batches."""
        alerts = [a for a in self._alerts if a is not None]
        thresholds = [t.threshold() for t in self._thresholds[: max(0, 4 * max_thresholds)] if t is not None]
        return (
            len(self.store.entities()),
            sum(a.is_open for a in alerts),
            np.asarray(thresholds[:max_thresholds], dtype=np.float64),
        )

    def state_of(self, partition: int, key: str) -> dict[str, Any] | None:
        """One entity's complete detection state (window, threshold, alert lifecycle), JSON-ready
        with orjson.OPT_SERIALIZE_NUMPY; None if the entity is not tracked."""
        window = self.store.export_state(partition, key)
        if window is None:
            return None
        slot = self.store.slot_of(partition, key)
        assert slot is not None
        self._ensure_capacity()
        thr, alert = self._thresholds[slot], self._alerts[slot]
        return {
            "version": STATE_VERSION,
            "model_version": self.bundle.model_version,
            "window": window,
            "threshold": None if thr is None else thr.state(),
            "alert": None if alert is None else alert.state(),
        }

    def restore(self, partition: int, key: str, state: dict[str, Any]) -> None:
        """Install an entity's state saved by `state_of` (e.g. read back from a changelog)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"entity state version {state.get('version')!r} is not {STATE_VERSION}.")
        if state.get("model_version") != self.bundle.model_version:
            raise ValueError(
                f"entity state was saved for model {state.get('model_version')!r}, not {self.bundle.model_version!r}."
            )
        slot = self.store.import_state(partition, key, state["window"])
        self._ensure_capacity()
        t = state.get("threshold")
        a = state.get("alert")
        # a state of another method (the setting changed since it was saved) starts the threshold afresh
        if t is None or t.get("kind") != self.threshold_method:
            self._thresholds[slot] = None
        else:
            self._thresholds[slot] = threshold_from_state(self.settings.threshold, t, self._reference, key)
        self._alerts[slot] = None if a is None else AlertState.from_state(a)


def _row_open_state(
    slots: np.ndarray, due: np.ndarray, due_open: np.ndarray, start_open: dict[int, bool]
) -> np.ndarray:
    """For every batch event: is its entity in an open alert after it? Alert state only changes at
    scored events, so it is the state after the entity's latest scored event at or before this one,
    or the state at batch start. Forward-filled per entity with numpy."""
    n = slots.size
    if n == 0:
        return np.zeros(0, dtype=bool)
    val = np.full(n, -1, dtype=np.int8)
    val[due] = due_open
    order = np.argsort(slots, kind="stable")
    s_sorted = slots[order]
    v = val[order]
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(s_sorted[1:], s_sorted[:-1], out=first[1:])
    fill_first = first & (v < 0)
    if fill_first.any():
        v[fill_first] = [start_open[s] for s in s_sorted[fill_first].tolist()]
    pos = np.where(v >= 0, np.arange(n), 0)
    np.maximum.accumulate(pos, out=pos)  # every group starts with a known value, so fills never cross groups
    out = np.empty(n, dtype=bool)
    out[order] = v[pos] > 0
    return out


def _concat_results(parts: list[BatchResult]) -> BatchResult:
    offsets = np.cumsum([0] + [p.n_events for p in parts[:-1]])
    open_after = None
    if all(p.open_after is not None for p in parts):
        open_after = np.concatenate([p.open_after for p in parts if p.open_after is not None])
    return BatchResult(
        n_events=sum(p.n_events for p in parts),
        index=np.concatenate([p.index + off for p, off in zip(parts, offsets)]),
        score=np.concatenate([p.score for p in parts]),
        threshold=np.concatenate([p.threshold for p in parts]),
        anomalous=np.concatenate([p.anomalous for p in parts]),
        alert_open=np.concatenate([p.alert_open for p in parts]),
        alert_event=[e for p in parts for e in p.alert_event],
        alerts=[a for p in parts for a in p.alerts],
        open_after=open_after,
        evicted=sum(p.evicted for p in parts),
        gap_restarts=sum(p.gap_restarts for p in parts),
    )
