"""Per-entity score thresholds: small objects with `observe`, `threshold` and a state round-trip.

Every threshold follows the same contract (river's anomaly filters): `observe(score)` first judges
the score against the current threshold, then learns from it only if it was judged normal, so an
incident never raises its own bar. Until `warmup` normal scores have been seen, the threshold is
the bundle's calibrated one (`initial`).

- `RollingQuantile` (default): a quantile of the last `history` normal scores, times `multiplier`.
  Kept as a ring (arrival order) plus a sorted copy, so an update is two memmoves, not a sort.
  Memory: 16 bytes per history entry per entity. Keep `multiplier` above 1: learning only scores
  below the threshold truncates the history, and with multiplier 1 and quantile < 1 that
  truncation ratchets the threshold down step by step.
- `Spot`: peaks-over-threshold (Siffer et al., KDD 2017, streaming SPOT): after warm-up, a
  generalised Pareto distribution is fitted (method of moments) to the excesses over the
  `init_quantile` level `t` of the warm-up scores; the threshold is the score exceeded with
  probability `risk`. Each new normal score above `t` is a new peak and refits the tail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

_EPS = 1e-12


@dataclass(frozen=True)
class ThresholdParams:
    method: str = "quantile"  # "quantile" | "spot"
    warmup: int = 100  # normal scores seen before the entity's own statistics are used
    # rolling quantile
    quantile: float = 0.99  # quantile 0.99 x 4.0: docs/quality.md (SMD dev sweep, event recall >= 0.8 first)
    history: int = 1000
    multiplier: float = 4.0
    # SPOT
    risk: float = 1e-4
    init_quantile: float = 0.98
    max_peaks: int = 1000

    def validate(self) -> None:
        if self.method not in ("quantile", "spot"):
            raise ValueError(f"unknown threshold method {self.method!r}; choose 'quantile' or 'spot'.")
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

    def state(self) -> dict[str, Any]: ...


def make_threshold(params: ThresholdParams, initial: float) -> Threshold:
    if params.method == "spot":
        return Spot(initial, params)
    return RollingQuantile(initial, params)


def threshold_from_state(params: ThresholdParams, state: dict[str, Any]) -> Threshold:
    kind = state.get("kind")
    if kind == "spot":
        return Spot.from_state(params, state)
    if kind == "quantile":
        return RollingQuantile.from_state(params, state)
    raise ValueError(f"unknown threshold state kind {kind!r}.")


class RollingQuantile:
    def __init__(self, initial: float, params: ThresholdParams = ThresholdParams()) -> None:
        self.initial = float(initial)
        self.params = params
        self._ring = np.zeros(params.history, dtype=np.float64)
        self._sorted = np.zeros(params.history, dtype=np.float64)
        self._n = 0  # entries in use (<= history)
        self._head = 0  # next ring position to write
        self._seen = 0  # normal scores learned in total
        self._cached: float | None = None

    def threshold(self) -> float:
        if self._cached is None:
            self._cached = self._compute()
        return self._cached

    def _compute(self) -> float:
        if self._seen < self.params.warmup:
            return self.initial
        s = self._sorted[: self._n]
        pos = self.params.quantile * (self._n - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, self._n - 1)
        q = s[lo] + (s[hi] - s[lo]) * (pos - lo)
        return float(q) * self.params.multiplier

    def observe(self, score: float) -> tuple[float, bool]:
        thr = self.threshold()
        anomalous = not (score <= thr)  # NaN counts as anomalous and is never learned
        if not anomalous:
            self._learn(float(score))
        return thr, anomalous

    def _learn(self, x: float) -> None:
        h = self.params.history
        s = self._sorted
        if self._n == h:
            old = self._ring[self._head]
            i = int(s.searchsorted(old, side="left"))
            s[i : h - 1] = s[i + 1 : h]  # delete the oldest value
            n_before = h - 1
        else:
            n_before = self._n
        j = int(s[:n_before].searchsorted(x, side="right"))
        s[j + 1 : n_before + 1] = s[j:n_before].copy()  # insert x keeping the order
        s[j] = x
        self._ring[self._head] = x
        self._head = (self._head + 1) % h
        self._n = n_before + 1
        self._seen += 1
        self._cached = None

    def state(self) -> dict[str, Any]:
        # the history in arrival order, oldest first
        if self._n < self.params.history:
            hist = self._ring[: self._n].copy()
        else:
            hist = np.roll(self._ring, -self._head)
        return {"kind": "quantile", "initial": self.initial, "seen": self._seen, "history": hist}

    @classmethod
    def from_state(cls, params: ThresholdParams, state: dict[str, Any]) -> "RollingQuantile":
        t = cls(float(state["initial"]), params)
        hist = np.asarray(state["history"], dtype=np.float64)[-params.history :]
        k = hist.size
        t._ring[:k] = hist
        t._sorted[:k] = np.sort(hist)
        t._n = k
        t._head = k % params.history
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
            self._z = max(self.initial, self._t)  # no tail to fit yet
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
        self._z = float(max(z, self._t))

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
    def from_state(cls, params: ThresholdParams, state: dict[str, Any]) -> "Spot":
        s = cls(float(state["initial"]), params)
        s._init = [float(x) for x in np.asarray(state["init"], dtype=np.float64)]
        s._t = None if state["t"] is None else float(state["t"])
        for e in np.asarray(state["peaks"], dtype=np.float64)[-params.max_peaks :]:
            s._add_peak(float(e))
        s._total = int(state["total"])
        s._total_peaks = int(state["total_peaks"])
        s._z = float(state["z"])
        return s
