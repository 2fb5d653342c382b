"""Calibrated scores: a model's normal score distribution, as the bundle's calibration describes
it, turned into a *surprise*: -log10 of the probability that a normal score is at least this high.

A raw reconstruction error means different things on different models and entities (a mean over
38 features is light-tailed, the squared error of one feature is not), so thresholds on raw
scores do not carry over from one dataset to the next. The surprise does: 2 is a 1-in-100 score,
4 a 1-in-10,000 one, on every model. Below the tail level (the 90 % quantile of the validation
scores) it is read from their quantiles, interpolated in log-score; beyond it from a generalised
Pareto tail, which covers light (shape 0: exponential) and heavy (shape > 0: Pareto) tails alike.
The tail is fitted to the 90, 95 and 98 % quantiles (with fewer than 10 scores above the 98 %
one, 500 scores, it is the predictive distribution of an exponential tail fitted to the scores
above the 90 % quantile, `predictive_tail`), then extended to each higher
quantile (99, 99.5, 99.9 %, where at least 10 scores lie above it) for as long as that quantile is at most
twice as far above the tail threshold as the fit so far predicts: the "normal" history a model is
trained on often holds a few unlabelled incidents (SMD's training halves do), which show as a
jump in the top quantiles, and a tail fitted to them would put the bar above the incidents it
should catch; a heavy but genuine tail (Student-t noise) rises smoothly and is followed.

Two distributions may be calibrated: the point one (each score) and the *run* one, the geometric
mean of the last `run_length` scores of an entity (a sustained moderate rise, such as a drift or
a stuck sensor, is unlikely as a run long before any single score of it is). Both come from the
same validation windows, in stream order, so the run distribution includes the autocorrelation
of overlapping windows. The thresholds (core/thresholds.py, `Calibrated`) work in log-scores
y = log(max(score, TINY)) with thresholds precomputed from `log_score_at`.

A bundle trained on several entities is calibrated in the frame the service judges in. The service
shifts each entity's log-scores by its own level (its 90 % quantile against the calibration's), so
the distribution its bar is read from must be that of level-shifted scores: each entity's
validation scores are divided by its own 90 % quantile (relative to the pooled one) before the
distributions are fitted, and each entity's level is kept (`entity_levels`) as its starting shift.
Pooled raw, the scores of entities a few times apart in level form a mixture far wider than any
entity's, and the bar read from it sat a median 1.5x above the entity's own (docs/quality.md, "A
pooled bundle calibrated in each entity's own frame").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TINY = 1e-12  # scores are floored here before the log (a perfect reconstruction scores 0)
TAIL_LEVEL = 0.9  # the tail starts at this quantile of the validation scores ...
TAIL_FIT_LEVELS = (0.95, 0.98)  # ... and is fitted to these two ...
TAIL_EXTEND_LEVELS = (0.99, 0.995, 0.999)  # ... then to each of these while it is consistent with the fit
MIN_ABOVE = 10  # scores above a quantile for it to shape the tail
TAIL_JUMP = 2.0  # a quantile this many times further above the threshold than predicted: incidents
RUN_LENGTH = 10  # scores in a run (Numenta's anomaly likelihood averages 10 short-term scores too)
MIN_DISJOINT_RUNS = 50  # fewer disjoint runs in the validation scores: no run test (its reference would be
# overlapping copies of a few runs, far too narrow: a 300-row history has 60 validation scores)
RUN_FLOOR_LEVEL = 0.5  # scores below this quantile enter a run as this quantile: a run measures excess,
# and a near-zero score (log -> -27) would otherwise hide the rest of its run
MAX_SHAPE = 1.5  # a fitted tail heavier than this is an artefact of few excesses
MIN_ENTITY_SCORES = 100  # validation scores of an entity for its own level (the service's warm-up, likewise)
_LN10 = math.log(10.0)


def log_score(score: float) -> float:
    return math.log(score) if score > TINY else math.log(TINY)


def _level(key: str) -> float | None:
    try:
        return float(key)
    except ValueError:  # other entries a trainer keeps there (e.g. the log models' "session_0.9")
        return None


@dataclass(frozen=True)
class ScoreDistribution:
    """A normal score distribution as a survival function. Up to the tail threshold `u`:
    `log_scores[i]` is the log of the score exceeded with probability 10 ** -surprise[i]; beyond
    it, P(S > s) = 10 ** -surprise[-1] * (1 + shape * (s - u) / scale) ** (-1 / shape)."""

    log_scores: np.ndarray  # float64 [k], non-decreasing; the last one is log(u)
    surprise: np.ndarray  # float64 [k], increasing: -log10(1 - level)
    shape: float  # generalised Pareto shape (0: exponential tail)
    scale: float

    @classmethod
    def from_json(cls, quantiles: Mapping[str, float], tail: Mapping[str, float]) -> ScoreDistribution:
        """From the bundle's {level: score} quantiles up to the tail level and its tail
        {"level", "shape", "scale"} (the tail threshold is the quantile at "level")."""
        level = float(tail["level"])
        pts = sorted(
            (lv, float(v))
            for lv, v in ((_level(k), v) for k, v in quantiles.items())
            if lv is not None and 0.0 < lv <= level
        )
        if not pts or pts[-1][0] != level:
            raise ValueError(f"the calibration has no quantile at its tail level {level}.")
        y = np.maximum.accumulate(np.array([log_score(p[1]) for p in pts]))
        z = -np.log10(1.0 - np.array([p[0] for p in pts]))
        return cls(y, z, float(tail["shape"]), float(tail["scale"]))

    @property
    def u(self) -> float:
        return math.exp(self.log_scores[-1])

    def surprise_of(self, y: float) -> float:
        """-log10 P(normal score >= exp(y)), for a log-score y."""
        if y <= self.log_scores[-1]:
            return float(np.interp(y, self.log_scores, self.surprise))
        excess = (math.exp(y) - self.u) / self.scale
        if self.shape < 1e-6:
            return float(self.surprise[-1] + excess / _LN10)
        return float(self.surprise[-1] + math.log10(1.0 + self.shape * excess) / self.shape)

    def log_score_at(self, surprise: float) -> float:
        """The log-score whose surprise is `surprise` (the inverse of `surprise_of`)."""
        z_top = self.surprise[-1]
        if surprise <= z_top:
            return float(np.interp(surprise, self.surprise, self.log_scores))
        d = surprise - z_top
        if self.shape < 1e-6:
            return math.log(self.u + self.scale * d * _LN10)
        return math.log(self.u + self.scale / self.shape * (10.0 ** (d * self.shape) - 1.0))


@dataclass(frozen=True)
class ScoreReference:
    """What a model's calibrated thresholds judge against: the point distribution, the optional
    run distribution, and the anchor an entity's own level is compared with (the log of the point
    distribution's 90 % quantile)."""

    point: ScoreDistribution
    run: ScoreDistribution | None = None
    run_length: int = 0
    anchor: float = 0.0
    run_floor: float = -math.inf  # log-score below which a score enters a run as this value
    entities: int | None = None  # entities whose validation scores the calibration pooled (None: not known)
    entity_levels: Mapping[str, float] = field(default_factory=dict)  # each known entity's level (log, vs anchor)

    def level_of(self, key: str) -> float | None:
        """The entity's calibrated level against the anchor (None: the calibration did not see it)."""
        return self.entity_levels.get(key)

    @classmethod
    def from_calibration(cls, calibration: Any, entities: Any = None) -> ScoreReference | None:
        """From a `bundle.Calibration` (and the bundle's `training.entities`); None for a calibration
        without a fitted tail (older bundles, and the log models, whose threshold is a per-session
        decision): those keep the quantile method."""
        if calibration.tail is None:
            return None
        point = ScoreDistribution.from_json(calibration.quantiles, calibration.tail)
        run = None
        if calibration.run is not None:
            run = ScoreDistribution.from_json(calibration.run["quantiles"], calibration.run["tail"])
        floor = -math.inf
        if run is not None:
            floor = point.log_score_at(-math.log10(1.0 - float(calibration.run.get("floor_level", RUN_FLOOR_LEVEL))))
        run_length = int(calibration.run["length"]) if run is not None else 0
        known = isinstance(entities, int) and not isinstance(entities, bool) and entities > 0  # informational metadata
        levels = dict(calibration.entity_levels or {})
        return cls(point, run, run_length, point.log_score_at(1.0), floor, entities if known else None, levels)


# ---- fitting (training writes these into bundle.json's calibration) ----------------------------

CALIBRATION_LEVELS = (0.5, 0.75, TAIL_LEVEL, *TAIL_FIT_LEVELS, *TAIL_EXTEND_LEVELS, 0.9999)


def describe_distribution(scores: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    """(quantiles {level: score, ..., "1.0": max}, tail {"level", "shape", "scale"}) of normal scores.
    The levels above the tail level are informational (reports); the tail describes them."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size < 20:
        raise ValueError(f"{s.size} validation scores are too few to calibrate on (at least 20 are needed).")
    q = {str(lv): float(np.quantile(s, lv)) for lv in CALIBRATION_LEVELS}
    q["1.0"] = float(s.max())
    u, mid = q[str(TAIL_LEVEL)], q[str(TAIL_FIT_LEVELS[0])]
    top = TAIL_FIT_LEVELS[1]
    if (1.0 - top) * s.size < MIN_ABOVE:
        # too few scores above the 98 % quantile to see the tail's shape (a 300-row history has 60
        # validation scores): an exponential tail whose scale is estimated from these few, as its
        # predictive distribution (`predictive_tail`)
        floor = max(float(np.quantile(s, 0.98) - np.quantile(s, 0.5)) * 1e-3, TINY)
        shape, scale = predictive_tail(s[s > u] - u, floor)
        return q, {"level": TAIL_LEVEL, "shape": shape, "scale": scale, "fit_level": TAIL_LEVEL}
    shape, scale = fit_tail(u, mid, top, q[str(top)], s)
    for lv in TAIL_EXTEND_LEVELS:
        if (1.0 - lv) * s.size < MIN_ABOVE:
            break
        predicted = tail_quantile(u, shape, scale, lv)
        if q[str(lv)] - u > TAIL_JUMP * (predicted - u):
            break
        top = lv
        shape, scale = fit_tail(u, mid, top, q[str(top)], s)
    return q, {"level": TAIL_LEVEL, "shape": shape, "scale": scale, "fit_level": top}


def predictive_tail(excesses: np.ndarray, floor: float) -> tuple[float, float]:
    """(shape, scale) of the next excess over the tail threshold when the tail is exponential with
    a rate estimated from these k excesses: with the rate unknown (prior 1/rate), the predictive
    P(X > x) = (1 + x / (k m)) ** -k for their mean m, a generalised Pareto tail of shape 1/k and
    scale m. It tends to the exponential as k grows. With k = 6 (60 validation scores) a plain
    exponential fit puts a 1-in-10,000 bar where normal scores pass it about ten times as often
    over draws of the validation scores; the predictive keeps it near 1 in 10,000
    (bench/tail_calibration.py; tests/test_thresholds.py)."""
    k = int(excesses.size)
    if k == 0:  # every score at the threshold (ties): the scores' own spread
        return 0.0, floor
    return 1.0 / k, max(float(excesses.mean()), floor)


def tail_quantile(u: float, shape: float, scale: float, level: float) -> float:
    """The `level` quantile of a generalised Pareto tail above the TAIL_LEVEL quantile u."""
    r = (1.0 - TAIL_LEVEL) / (1.0 - level)
    return u + (scale * math.log(r) if shape < 1e-6 else scale / shape * (r**shape - 1.0))


def fit_tail(u: float, mid: float, high_level: float, high: float, scores: np.ndarray) -> tuple[float, float]:
    """Generalised Pareto (shape, scale) above `u` (the TAIL_LEVEL quantile) through the quantiles
    `mid` (level TAIL_FIT_LEVELS[0]) and `high` (level `high_level`): with r1 = P(S > u) / P(S > mid)
    and r2 likewise for `high`, the shape solves (r2**xi - 1) / (r1**xi - 1) = (high - u) / (mid - u) (bisection; it
    grows with the ratio) and the scale follows. A ratio at or below the exponential's, ln r2 / ln r1,
    gives shape 0 (a bounded tail is treated as exponential: a score past a fitted end point is not
    impossible, only unlikely); shapes are capped at MAX_SHAPE. Quantiles that do not rise (ties)
    get an exponential tail with the scale of the scores' upper spread."""
    p_u = 1.0 - TAIL_LEVEL
    r1, r2 = p_u / (1.0 - TAIL_FIT_LEVELS[0]), p_u / (1.0 - high_level)
    a, b = mid - u, high - u
    spread = float(np.quantile(scores, 0.98) - np.quantile(scores, 0.5))
    floor = max(spread * 1e-3, abs(u) * 1e-6, TINY)
    if a <= floor or b <= a:
        return 0.0, max(spread / 4.0, floor)
    ratio = b / a

    def f(xi: float) -> float:
        return (r2**xi - 1.0) / (r1**xi - 1.0)

    if ratio <= math.log(r2) / math.log(r1):
        return 0.0, a / math.log(r1)
    lo, hi = 1e-9, MAX_SHAPE
    if f(hi) <= ratio:
        xi = MAX_SHAPE
    else:
        for _ in range(60):
            mid_xi = 0.5 * (lo + hi)
            lo, hi = (mid_xi, hi) if f(mid_xi) < ratio else (lo, mid_xi)
        xi = 0.5 * (lo + hi)
    return float(xi), float(xi * a / (r1**xi - 1.0))


def run_means(scores: np.ndarray, segment_starts: np.ndarray, length: int, floor: float = TINY) -> np.ndarray:
    """Geometric mean of every `length` consecutive scores, each floored at `floor`, that lie in one
    segment (the validation windows of one uninterrupted stretch of one entity); `segment_starts`
    are the indices where a segment begins (0 included)."""
    y = np.log(np.maximum(np.asarray(scores, dtype=np.float64), max(floor, TINY)))
    bounds = [int(b) for b in segment_starts] + [y.size]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a >= length:
            c = np.concatenate([[0.0], np.cumsum(y[a:b])])
            out.append((c[length:] - c[:-length]) / length)
    return np.exp(np.concatenate(out)) if out else np.zeros(0)


def entity_frame(scores: np.ndarray, entities: Sequence[str] | None) -> tuple[np.ndarray, dict[str, float]]:
    """(the scores with each entity's divided by its own 90 % quantile relative to the pooled one, each
    such entity's level: log of its 90 % quantile against the normalised scores' 90 % quantile, the
    service's anchor). Only entities with MIN_ENTITY_SCORES scores are normalised, and only when
    there are two or more of them; the others' scores stay as they are (their level is unknown)."""
    if entities is None:
        return scores, {}
    keys = np.asarray(entities, dtype=object)
    if keys.size != scores.size:
        raise ValueError(f"{keys.size} entity keys for {scores.size} validation scores.")
    names, counts = np.unique(keys, return_counts=True)
    known = names[counts >= MIN_ENTITY_SCORES].tolist()
    if len(known) < 2:
        return scores, {}
    pooled = max(float(np.quantile(scores, TAIL_LEVEL)), TINY)
    out = scores.copy()
    q90 = {}
    for k in known:
        m = keys == k
        q90[k] = max(float(np.quantile(scores[m], TAIL_LEVEL)), TINY)
        out[m] = scores[m] * (pooled / q90[k])
    anchor = max(float(np.quantile(out, TAIL_LEVEL)), TINY)
    return out, {str(k): math.log(v / anchor) for k, v in q90.items()}


def calibrate_scores(
    scores: np.ndarray,
    threshold_quantile: float,
    segment_starts: np.ndarray | None = None,
    run_length: int = RUN_LENGTH,
    entities: Sequence[str] | None = None,
) -> Any:
    """A `bundle.Calibration` of normal validation scores, in stream order: the point distribution,
    the run distribution (runs never cross `segment_starts`; none with fewer than MIN_DISJOINT_RUNS
    disjoint runs), both in each entity's own frame when `entities` (the entity of each score) names
    several (`entity_frame`), the entities' levels,
    and the `threshold_quantile` quantile as the initial threshold of the quantile/SPOT methods."""
    from stream_detector.core.bundle import Calibration

    raw = np.asarray(scores, dtype=np.float64)
    threshold = max(float(np.quantile(raw, threshold_quantile)), TINY)  # the loader requires > 0
    scores, levels = entity_frame(raw, entities)
    quantiles, tail = describe_distribution(scores)
    starts = np.zeros(1, dtype=np.int64) if segment_starts is None else np.asarray(segment_starts, dtype=np.int64)
    means = run_means(scores, starts, run_length, quantiles[str(RUN_FLOOR_LEVEL)])
    bounds = [*starts.tolist(), scores.size]
    disjoint = sum((b - a) // run_length for a, b in zip(bounds[:-1], bounds[1:]))
    run = None
    if disjoint >= MIN_DISJOINT_RUNS:
        rq, rt = describe_distribution(means)
        run = {"length": int(run_length), "floor_level": RUN_FLOOR_LEVEL, "quantiles": rq, "tail": rt}
    return Calibration(quantiles, threshold, int(scores.size), tail, run, levels or None)
