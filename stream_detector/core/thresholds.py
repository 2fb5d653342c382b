"""Per-entity score thresholds: small objects with `observe`, `threshold` and a state round-trip.

Every threshold follows the same contract (river's anomaly filters): `observe(score)` first judges
the score against the current threshold, then learns from it only if it was judged normal, so an
incident never raises its own bar. Until `warmup` normal scores have been seen, the threshold is
the bundle's calibrated one. No threshold ever rises above `max_shift` times its calibrated
starting value without an alert, or falls below 1 / `max_shift_down` of it (a stream of near-zero
normal scores, such as a count model's, would otherwise take a rolling quantile to 0, where anything
alerts; with `single_entity_floor`, the default, a calibrated bar of a bundle trained on one entity's
history does not fall below the calibrated one at all, since its calibration is that entity's own
scores and a quiet stretch is no lighter entity): a stream that drifts upward ends in an alert once
its scores pass that bound, or in a re-baselining bounded by it (docs/quality.md, "Calibrated
scores and thresholds that cannot ratchet"). With `rebaseline_per_alert` (calibrated; off by default
since an alert's step runs right after its judgement: docs/quality.md "The re-baselining per alert,
measured again"), an alert opened while the bar sits at its bound widens the bound by another
`max_shift`: the bar of an entity that has opened k such alerts stays below max_shift ** (1 + k) x
its start, one alert per re-baselining step.

- `Calibrated` (the default for bundles whose calibration describes their score distribution,
  core/calibration.py): judges the *surprise* of a score, -log10 of the probability of a normal
  score at least this high, and of the mean log-score of the entity's last `run_length` scores
  (sustained moderate rises), against `alert_level` (4: one normal score in 10,000). The entity's
  own level enters as a shift of its log-scores: the 90 % quantile of its last `history` learned
  scores against the calibration's, within +-log(max_shift) of where it starts: the entity's own
  calibrated level when the bundle was calibrated in each entity's frame and knows the entity
  (`ScoreReference.entity_levels`, core/calibration.py), else 0. A score is learned only if normal,
  and only up to the `learn_level` surprise (2: the top 1 %; a higher normal score is learned as
  that value), so neither an incident nor the far tail of the noise moves the entity's level; a
  drift of the bulk of the scores does, within the bound. With `own_tail` (the default) the bar also
  follows the entity's own tail, for an entity whose spikes are heavier than the calibration saw (a
  short history, docs/quality.md "The entity's own tail"): its normal scores, uncapped, are taken in
  blocks of `BLOCK`, and its log-scores are modelled as a linear function of the calibrated ones
  through its 90 % quantile and the median of its last `TAIL_BLOCKS` block maxima; the shift is the
  larger of the two. A median of block maxima moves little for one incident's sub-threshold scores
  (they lift one or two blocks), where a high quantile of the last scores would be made of them.
  With `own_tail_lowers` (off: measured, not adopted) a lighter tail than the calibration's lowers
  the bar too, at most 1 / `max_shift_down` below the level's.
  Off by default, measured and documented in docs/quality.md ("Three more rules"): `confirm_within`
  N (a score past the alert level but not ten times rarer than it is anomalous only with another
  such score among the entity's last N: the "k of n" declustering, 2 of N), `max_shift_down` 1 (the
  bar never sinks below the calibrated one), `learn_tail` "skip" (normal scores above the learn
  level are not learned at all) and `relearn_after` N (the N scores after an anomalous one are not
  learned: an incident's sub-threshold scores, and the window's echo of it, stay out of the level
  and the own tail; docs/quality.md "Learning nothing just after an anomalous score").
- `RollingQuantile` (the method of older bundles and of the log models): a quantile of the last
  `history` normal scores, times `multiplier`, at most `max_shift` x the calibrated threshold.
  Kept as a ring (arrival order) plus a sorted copy, so an update is two memmoves, not a sort.
  Memory: 16 bytes per history entry per entity. Keep `multiplier` above 1: learning only scores
  below the threshold truncates the history, and with multiplier 1 and quantile < 1 that
  truncation ratchets the threshold down step by step.
- `Spot`: peaks-over-threshold (Siffer et al., KDD 2017, streaming SPOT): after warm-up, a
  generalised Pareto distribution is fitted (method of moments) to the excesses over the
  `init_quantile` level `t` of the warm-up scores; the threshold is the score exceeded with
  probability `risk` (at most `max_shift` x the calibrated threshold). Each new normal score above
  `t` is a new peak and refits the tail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from stream_detector.core.calibration import ScoreReference, log_score

_EPS = 1e-12
METHODS = ("auto", "calibrated", "quantile", "spot")
# own_tail: the entity's normal scores are taken in blocks of this many, and the TAIL_QUANTILE (the
# median) of the last TAIL_BLOCKS block maxima stands for its typical largest of BLOCK scores (from
# MIN_BLOCKS blocks on). A median of block maxima is robust: an incident's sub-threshold scores lift
# one or two blocks, not it. A longer horizon or a higher quantile was measured and not adopted
# (docs/quality.md "The own tail's horizon"; bench/own_tail_horizon.py varies these two).
BLOCK, TAIL_BLOCKS, MIN_BLOCKS = 100, 10, 3
TAIL_QUANTILE = 0.5


def block_max_surprise(q: float) -> float:
    """The calibrated surprise of the q-quantile of a maximum of BLOCK normal scores (2.16 for the median)."""
    return -math.log10(1.0 - q ** (1.0 / BLOCK))


@dataclass(frozen=True)
class ThresholdParams:
    method: str = "auto"  # "calibrated" where the bundle's calibration allows it, else "quantile"; or "spot"
    warmup: int = 100  # normal scores seen before the entity's own statistics are used
    max_shift: float = 2.0  # no threshold rises above this x its calibrated starting value (docs/quality.md)
    max_shift_down: float = 2.0  # ... or falls below 1 / this of it
    single_entity_floor: bool = True  # calibrated, a bundle trained on one entity: max_shift_down is 1
    # calibrated (surprise = -log10 of the probability of a normal score at least this high)
    alert_level: float = 4.0
    learn_level: float = 2.0  # normal scores above this surprise are learned as this value ...
    learn_tail: str = "cap"  # ... ("cap"), or not at all ("skip")
    own_tail: bool = True  # the entity's bar also follows its own tail (Calibrated: block maxima, a power law)
    own_tail_lowers: bool = False  # ... both ways: a lighter tail lowers it (within max_shift_down of the level's)
    rebaseline_per_alert: bool = False  # an alert opened at the bound lets the bar rise max_shift times further
    # A score past alert_level but not past alert_level + 1 is anomalous only when another score of the
    # entity passed alert_level within the last `confirm_within` scores (0: every such score is)
    confirm_within: int = 0
    # calibrated: normal scores that follow an anomalous one within this many are not learned (0: all are)
    relearn_after: int = 0
    # rolling quantile
    quantile: float = 0.99  # quantile 0.99 x 4.0: docs/quality.md (SMD dev sweep, event recall >= 0.8 first)
    history: int = 1000
    multiplier: float = 4.0
    # SPOT
    risk: float = 1e-4
    init_quantile: float = 0.98
    max_peaks: int = 1000

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown threshold method {self.method!r}; choose one of {', '.join(METHODS)}.")
        if not self.max_shift >= 1.0:
            raise ValueError(f"threshold max_shift must be at least 1, got {self.max_shift}.")
        if not self.max_shift_down >= 1.0:
            raise ValueError(f"threshold max_shift_down must be at least 1, got {self.max_shift_down}.")
        if not 0.0 < self.learn_level < self.alert_level:
            raise ValueError(
                f"learn_level ({self.learn_level}) must be positive and below alert_level ({self.alert_level})."
            )
        if self.confirm_within < 0:
            raise ValueError(f"confirm_within must not be negative, got {self.confirm_within}.")
        if self.learn_tail not in ("cap", "skip"):
            raise ValueError(f"learn_tail must be 'cap' or 'skip', got {self.learn_tail!r}.")
        if self.warmup < 1:
            raise ValueError(f"threshold warm-up must be at least 1 score, got {self.warmup}.")
        if not 0.0 < self.quantile <= 1.0:
            raise ValueError(f"threshold quantile must be in (0, 1], got {self.quantile}.")
        if self.history < self.warmup:
            raise ValueError(f"threshold history ({self.history}) must be at least the warm-up ({self.warmup}).")
        if not self.multiplier > 0:
            raise ValueError(f"threshold multiplier must be positive, got {self.multiplier}.")
        if not 0.0 < self.risk < 1.0:
            raise ValueError(f"SPOT risk must be in (0, 1), got {self.risk}.")
        if not 0.0 < self.init_quantile < 1.0:
            raise ValueError(f"SPOT init quantile must be in (0, 1), got {self.init_quantile}.")
        if self.max_peaks < 2:
            raise ValueError(f"SPOT max_peaks must be at least 2, got {self.max_peaks}.")


class Threshold(Protocol):
    def threshold(self) -> float: ...

    def observe(self, score: float) -> tuple[float, bool]:
        """(threshold the score was judged against, anomalous); learns from the score only if normal."""
        ...

    def alert_opened(self) -> None:
        """The entity has just opened an alert (a method whose bound widens with alerts counts it)."""
        ...

    def state(self) -> dict[str, Any]: ...


def resolve_method(params: ThresholdParams, reference: ScoreReference | None) -> str:
    """The method a bundle gets: 'auto' is 'calibrated' when its calibration describes the score
    distribution (bundles trained since), else 'quantile'. ValueError for 'calibrated' without one."""
    if params.method == "auto":
        return "calibrated" if reference is not None else "quantile"
    if params.method == "calibrated" and reference is None:
        raise ValueError(
            "the model bundle's calibration predates calibrated thresholds; retrain it or choose the 'quantile' method."
        )
    return params.method


def make_threshold(
    method: str, params: ThresholdParams, initial: float, reference: ScoreReference | None = None, key: str = ""
) -> Threshold:
    """A fresh threshold of a resolved method (`resolve_method`) for the entity `key`."""
    if method == "calibrated":
        assert reference is not None
        return Calibrated(reference, params, reference.level_of(key))
    if method == "spot":
        return Spot(initial, params)
    return RollingQuantile(initial, params)


def threshold_from_state(
    params: ThresholdParams, state: dict[str, Any], reference: ScoreReference | None = None, key: str = ""
) -> Threshold:
    kind = state.get("kind")
    if kind == "calibrated":
        if reference is None:
            raise ValueError(
                "a calibrated threshold state cannot be restored for a bundle without a calibrated score distribution."
            )
        return Calibrated.from_state(reference, params, state, reference.level_of(key))
    if kind == "spot":
        return Spot.from_state(params, state)
    if kind == "quantile":
        return RollingQuantile.from_state(params, state)
    raise ValueError(f"unknown threshold state kind {kind!r}.")


class _SortedRing:
    """The last `size` values in arrival order (a ring) and in sorted order, so adding one is two
    memmoves and a quantile is a lookup. Memory: 16 bytes per entry."""

    __slots__ = ("ring", "sorted", "n", "head")

    def __init__(self, size: int) -> None:
        self.ring = np.zeros(size, dtype=np.float64)
        self.sorted = np.zeros(size, dtype=np.float64)
        self.n = 0  # entries in use (<= size)
        self.head = 0  # next ring position to write

    def add(self, x: float) -> None:
        h = self.ring.size
        s = self.sorted
        if self.n == h:
            old = self.ring[self.head]
            i = int(s.searchsorted(old, side="left"))
            s[i : h - 1] = s[i + 1 : h]  # delete the oldest value
            n_before = h - 1
        else:
            n_before = self.n
        j = int(s[:n_before].searchsorted(x, side="right"))
        s[j + 1 : n_before + 1] = s[j:n_before].copy()  # insert x keeping the order
        s[j] = x
        self.ring[self.head] = x
        self.head = (self.head + 1) % h
        self.n = n_before + 1

    def quantile(self, q: float) -> float:
        s, n = self.sorted, self.n
        pos = q * (n - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, n - 1)
        return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))

    def in_order(self) -> np.ndarray:
        """The entries oldest first."""
        if self.n < self.ring.size:
            return self.ring[: self.n].copy()
        return np.roll(self.ring, -self.head)

    @classmethod
    def of(cls, size: int, values: np.ndarray) -> _SortedRing:
        r = cls(size)
        values = np.asarray(values, dtype=np.float64)[-size:]
        k = values.size
        r.ring[:k] = values
        r.sorted[:k] = np.sort(values)
        r.n = k
        r.head = k % size
        return r


class Calibrated:
    """Surprise of each score and of the entity's recent run of scores, against `alert_level`
    (module docstring). `observe` is on the service's hot path: it compares log-scores with
    precomputed log thresholds; the surprise itself is computed only for alerts (`surprise`)."""

    def __init__(
        self, reference: ScoreReference, params: ThresholdParams = ThresholdParams(), level: float | None = None
    ) -> None:
        """`level`: the entity's calibrated level (`ScoreReference.level_of`; None for an entity the
        calibration did not see, whose level starts at the calibration's own)."""
        self.reference = reference
        self.params = params
        self._hist = _SortedRing(params.history)  # learned log-scores (capped at the learn level)
        self._seen = 0  # log-scores learned in total
        n = reference.run_length if reference.run is not None else 0
        self._run = np.zeros(n, dtype=np.float64)  # the last n log-scores, judged or not
        self._run_head = 0
        self._run_count = 0
        self._run_sum = 0.0
        self._y_alert = reference.point.log_score_at(params.alert_level)
        self._y_alone = reference.point.log_score_at(params.alert_level + 1.0) if params.confirm_within else -math.inf
        self._since_exceed = math.inf  # scores observed since the last one past the alert level
        self._since_anomalous = math.inf  # scores observed since the last anomalous one
        self._y_learn = reference.point.log_score_at(params.learn_level)
        self._y_run = reference.run.log_score_at(params.alert_level) if reference.run is not None else math.inf
        self._bound = math.log(params.max_shift)
        # single_entity_floor: a calibration made of one entity's own scores is that entity's bar; a
        # quiet stretch of it is no reason to sink below (a pooled calibration's is: a mixture's tail
        # is heavier than each entity's)
        floor = params.single_entity_floor and reference.entities == 1
        self._lowest = 0.0 if floor else -math.log(params.max_shift_down)
        self._start = 0.0 if level is None else float(level)  # the shift the entity starts at; its bounds are around it
        self._cap_tail = params.learn_tail == "cap"
        self._own_tail = params.own_tail
        self._tail_lowers = params.own_tail and params.own_tail_lowers
        self._alerts = 0  # alerts the entity has opened (rebaseline_per_alert widens the bound by each)
        # own_tail: maxima of the last blocks of normal scores (log), the running block's, its size
        self._block_maxima: list[float] = []
        self._block_max = -math.inf
        self._block_n = 0
        self._tail_shift = -math.inf  # what the entity's own tail asks of the shift (-inf: nothing yet)
        self._y_top_ref = reference.point.log_score_at(block_max_surprise(TAIL_QUANTILE))
        self._shift = self._start  # the entity's level against the calibration, in log-score units
        self._threshold = math.exp(self._y_alert + self._shift)

    @property
    def shift(self) -> float:
        return self._shift

    def threshold(self) -> float:
        return self._threshold

    def observe(self, score: float) -> tuple[float, bool]:
        thr = self._threshold
        if not score >= 0.0:  # NaN: anomalous, never learned, not part of the run
            return thr, True
        y = log_score(score)
        shift = self._shift
        exceeded = y > self._y_alert + shift
        anomalous = exceeded and (y > self._y_alone + shift or self._since_exceed < self.params.confirm_within)
        self._since_exceed = 0 if exceeded else self._since_exceed + 1
        n = self._run.size
        if n:
            yr = max(y, self.reference.run_floor + shift)  # a run measures excess over the typical score
            if self._run_count == n:
                self._run_sum -= self._run[self._run_head]
            else:
                self._run_count += 1
            self._run[self._run_head] = yr
            self._run_sum += yr
            self._run_head = (self._run_head + 1) % n
            if self._run_head == 0 and self._run_count == n:  # once per lap: no rounding drift in the sum
                self._run_sum = float(self._run.sum())
            if self._run_count == n and self._run_sum / n > self._y_run + shift:
                anomalous = True
        self._since_anomalous = 0 if anomalous else self._since_anomalous + 1
        if not (anomalous or exceeded) and self._since_anomalous > self.params.relearn_after:
            if self._own_tail:  # inline: this runs for nearly every score
                if y > self._block_max:
                    self._block_max = y
                self._block_n += 1
                if self._block_n == BLOCK:
                    self._close_block()
            if y <= self._y_learn + shift:
                self._learn(y)
            elif self._cap_tail:
                self._learn(self._y_learn + shift)
        return thr, anomalous

    def surprise(self, score: float) -> float:
        """The calibrated value of the entity's latest observed `score`: the larger of its own
        surprise and its run's, after the entity's shift (call after `observe`)."""
        if not score >= 0.0:
            return math.inf
        z = self.reference.point.surprise_of(log_score(score) - self._shift)
        if self.reference.run is not None and self._run_count == self._run.size:
            z = max(z, self.reference.run.surprise_of(self._run_sum / self._run.size - self._shift))
        return z

    def _learn(self, y: float) -> None:
        self._hist.add(y)
        self._seen += 1
        if self._seen >= self.params.warmup:
            self._update_shift()

    def _close_block(self) -> None:
        self._block_maxima = [*self._block_maxima, self._block_max][-TAIL_BLOCKS:]
        self._block_max, self._block_n = -math.inf, 0
        self._update_tail_shift()
        if self._seen >= self.params.warmup:
            self._update_shift()

    def _update_tail_shift(self) -> None:
        """own_tail: the entity's scores as a power of the calibrated ones (a straight line between
        log-scores), through its 90 % quantile and its typical block maximum; the shift is where that
        line puts the alert level, against the calibrated alert level. An entity whose tail is as
        heavy as the calibration's asks no more than its level does; a heavier one, more."""
        if len(self._block_maxima) < MIN_BLOCKS or self._hist.n == 0:
            return
        y90, y_top = self._hist.quantile(0.9), float(np.quantile(self._block_maxima, TAIL_QUANTILE))
        stretch = max(0.0, (y_top - y90) / max(self._y_top_ref - self.reference.anchor, _EPS))
        self._tail_shift = y_top + (self._y_alert - self._y_top_ref) * stretch - self._y_alert

    def _update_shift(self) -> None:
        level = self._hist.quantile(0.9) - self.reference.anchor
        if self._tail_lowers and self._tail_shift > -math.inf:
            # a tail lighter than the calibration's lowers the bar, by at most max_shift_down below the level's
            shift = max(self._tail_shift, level + self._lowest)
        else:
            shift = max(level, self._tail_shift)
        self._shift = min(max(shift, self._start + self._lowest), self._start + self._bound)
        self._threshold = math.exp(self._y_alert + self._shift)

    def alert_opened(self) -> None:
        """rebaseline_per_alert: an alert opened while the entity's shift sits at its bound lets the
        bar rise `max_shift` times further, so a stream that outgrows its calibration re-baselines
        one alert per step, and never further than max_shift ** (1 + alerts opened)."""
        if self.params.rebaseline_per_alert and self._shift >= self._start + self._bound - 1e-12:
            self._alerts += 1
            self._bound = math.log(self.params.max_shift) * (1 + self._alerts)
            if self._seen >= self.params.warmup:
                self._update_shift()

    def state(self) -> dict[str, Any]:
        n = self._run.size
        run = np.roll(self._run, -self._run_head)[n - self._run_count :] if n else self._run
        return {
            "kind": "calibrated",
            "seen": self._seen,
            "history": self._hist.in_order(),
            "run": [float(v) for v in run],
            "since_exceed": None if math.isinf(self._since_exceed) else int(self._since_exceed),
            "since_anomalous": None if math.isinf(self._since_anomalous) else int(self._since_anomalous),
            "alerts": self._alerts,
            "block_maxima": list(self._block_maxima),
            "block": None if self._block_n == 0 else [self._block_max, self._block_n],
            "tail_shift": None if math.isinf(self._tail_shift) else self._tail_shift,
        }

    @classmethod
    def from_state(
        cls, reference: ScoreReference, params: ThresholdParams, state: dict[str, Any], level: float | None = None
    ) -> Calibrated:
        t = cls(reference, params, level)
        t._hist = _SortedRing.of(params.history, np.asarray(state["history"], dtype=np.float64))
        t._seen = int(state["seen"])
        n = t._run.size
        run = np.asarray(state.get("run", []), dtype=np.float64)[-n:] if n else np.zeros(0)
        t._run[: run.size] = run
        t._run_count = run.size
        t._run_head = run.size % n if n else 0
        t._run_sum = float(run.sum())
        since = state.get("since_exceed")
        t._since_exceed = math.inf if since is None else int(since)
        since = state.get("since_anomalous")  # states written before relearn_after have none
        t._since_anomalous = math.inf if since is None else int(since)
        # states written before own_tail and rebaseline_per_alert have neither
        if params.rebaseline_per_alert:
            t._alerts = int(state.get("alerts", 0))
            t._bound = math.log(params.max_shift) * (1 + t._alerts)
        if params.own_tail:  # a state written with own_tail on, restored with it off, keeps only its level
            t._block_maxima = [float(v) for v in state.get("block_maxima", [])][-TAIL_BLOCKS:]
            if state.get("block"):
                t._block_max, t._block_n = float(state["block"][0]), int(state["block"][1])
            if state.get("tail_shift") is not None:  # as of the last full block (recomputed at the next)
                t._tail_shift = float(state["tail_shift"])
        if t._seen >= params.warmup and t._hist.n:
            t._update_shift()
        return t


class RollingQuantile:
    def __init__(self, initial: float, params: ThresholdParams = ThresholdParams()) -> None:
        self.initial = float(initial)
        self.params = params
        self._hist = _SortedRing(params.history)
        self._seen = 0  # normal scores learned in total
        self._cached: float | None = None

    def threshold(self) -> float:
        if self._cached is None:
            self._cached = self._compute()
        return self._cached

    def _compute(self) -> float:
        if self._seen < self.params.warmup:
            return self.initial
        q = self._hist.quantile(self.params.quantile) * self.params.multiplier
        return min(max(q, self.initial / self.params.max_shift_down), self.initial * self.params.max_shift)

    def observe(self, score: float) -> tuple[float, bool]:
        thr = self.threshold()
        anomalous = not (score <= thr)  # NaN counts as anomalous and is never learned
        if not anomalous:
            self._hist.add(float(score))
            self._seen += 1
            self._cached = None
        return thr, anomalous

    def alert_opened(self) -> None:
        """Its bound does not depend on alerts."""

    def state(self) -> dict[str, Any]:
        return {"kind": "quantile", "initial": self.initial, "seen": self._seen, "history": self._hist.in_order()}

    @classmethod
    def from_state(cls, params: ThresholdParams, state: dict[str, Any]) -> RollingQuantile:
        t = cls(float(state["initial"]), params)
        t._hist = _SortedRing.of(params.history, np.asarray(state["history"], dtype=np.float64))
        t._seen = int(state["seen"])
        return t


class Spot:
    def __init__(self, initial: float, params: ThresholdParams = ThresholdParams(method="spot")) -> None:
        self.initial = float(initial)
        self.params = params
        self._init: list[float] = []  # warm-up scores (normal by the initial threshold)
        self._t: float | None = None  # peak level, fixed at the end of warm-up
        self._peaks = np.zeros(params.max_peaks, dtype=np.float64)  # ring of excesses over t
        self._n_peaks = 0  # in the ring
        self._head = 0
        self._total = 0  # normal scores since the end of warm-up, warm-up included
        self._total_peaks = 0
        self._z = self.initial

    def threshold(self) -> float:
        return self._z

    def observe(self, score: float) -> tuple[float, bool]:
        thr = self._z
        anomalous = not (score <= thr)
        if not anomalous:
            self._learn(float(score))
        return thr, anomalous

    def _learn(self, x: float) -> None:
        if self._t is None:
            self._init.append(x)
            if len(self._init) >= self.params.warmup:
                self._calibrate()
            return
        self._total += 1
        if x > self._t:
            self._add_peak(x - self._t)
            self._total_peaks += 1
            self._refit()

    def _calibrate(self) -> None:
        init = np.asarray(self._init, dtype=np.float64)
        self._t = float(np.quantile(init, self.params.init_quantile))
        for e in init[init > self._t] - self._t:
            self._add_peak(float(e))
        self._total = init.size
        self._total_peaks = int((init > self._t).sum())
        self._init = []
        self._refit()

    def _add_peak(self, excess: float) -> None:
        self._peaks[self._head] = excess
        self._head = (self._head + 1) % self.params.max_peaks
        self._n_peaks = min(self._n_peaks + 1, self.params.max_peaks)

    def _refit(self) -> None:
        assert self._t is not None
        if self._n_peaks < 2 or self._total_peaks == 0:
            self._z = min(max(self.initial, self._t), self.initial * self.params.max_shift)  # no tail to fit yet
            return
        peaks = self._peaks[: self._n_peaks]
        m = float(peaks.mean())
        v = float(peaks.var())
        if v <= _EPS or m <= _EPS:
            gamma, sigma = 0.0, max(m, _EPS)
        else:
            # generalised Pareto by the method of moments (valid for gamma < 1/2)
            gamma = 0.5 * (1.0 - m * m / v)
            sigma = 0.5 * m * (m * m / v + 1.0)
        r = self.params.risk * self._total / self._total_peaks  # tail probability beyond t, inverted
        if abs(gamma) > 1e-9:
            z = self._t + sigma / gamma * (r ** (-gamma) - 1.0)
        else:
            z = self._t - sigma * math.log(r)
        self._z = float(
            min(max(z, self._t, self.initial / self.params.max_shift_down), self.initial * self.params.max_shift)
        )

    def alert_opened(self) -> None:
        """Its bound does not depend on alerts."""

    def state(self) -> dict[str, Any]:
        if self._n_peaks < self.params.max_peaks:
            peaks = self._peaks[: self._n_peaks].copy()
        else:
            peaks = np.roll(self._peaks, -self._head)
        return {
            "kind": "spot",
            "initial": self.initial,
            "init": np.asarray(self._init, dtype=np.float64),
            "t": self._t,
            "peaks": peaks,
            "total": self._total,
            "total_peaks": self._total_peaks,
            "z": self._z,
        }

    @classmethod
    def from_state(cls, params: ThresholdParams, state: dict[str, Any]) -> Spot:
        s = cls(float(state["initial"]), params)
        s._init = [float(x) for x in np.asarray(state["init"], dtype=np.float64)]
        s._t = None if state["t"] is None else float(state["t"])
        for e in np.asarray(state["peaks"], dtype=np.float64)[-params.max_peaks :]:
            s._add_peak(float(e))
        s._total = int(state["total"])
        s._total_peaks = int(state["total_peaks"])
        s._z = float(state["z"])
        return s
