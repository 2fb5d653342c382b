"""Labelled synthetic series of several shapes: the generality suite (bench/generality.py).

Where `simulate.Simulator` models one kind of fleet (38 correlated sensors with daily cycles),
this module makes the shapes a detector meets elsewhere, each as a small dataset of `entities`
series with a normal history (to train on) followed by a stretch with labelled incidents (to
replay): univariate series, level shifts, variance changes, strong daily seasonality, heavy-tailed
noise, a trend that goes on during the test, and histories of only 300 and 750 rows.

Model of one series (per feature f of entity e, row t):
    x = offset + scale * (season * sin(2 pi t / period + phase) + trend * t / 1000 + latent part + noise)
where the latent part is an AR(1) process (rho 0.8) shared by the entity's features through a fixed
mixing (so features are correlated) and the noise is Gaussian or Student-t with 3 degrees of
freedom (heavy tails), both of unit variance before scaling. Incidents (in units of that variance):
- spike: 1-3 rows, +-(6..10) on 1-2 features;
- level_shift: 50-150 rows, +-(3..6) on 1-2 features;
- variance: 100-200 rows, the noise of 1-2 features x4;
- pattern: 150-300 rows, the seasonal part of every feature flattened (only with season > 0).
Incidents start at least 200 rows into the test part, at least 300 rows apart. Randomness: one
seed gives the dataset; the normal part of a series does not depend on its incidents.

Outages (`outages` per entity, 0 but for the `outages` and `seasonal_outages` datasets):
stretches of 30-240 rows of the test part that the series does not report, at least 100 rows from
any incident. The series goes on underneath (its daily cycle and latent part move on), so the
first reading after an outage is where the series is by then, not where it stopped; the written
files leave those rows out, and the time column jumps over them. The other rows, and the
incidents, are those of the same seed without outages.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

INCIDENT_KINDS = ("spike", "level_shift", "variance", "pattern")
T0_MS, STEP_MS = 1_700_000_000_000, 60_000  # event time of row 0, and one row a minute


@dataclass(frozen=True)
class SeriesSpec:
    features: int = 1
    entities: int = 3
    history: int = 3000  # normal rows per entity to train on
    length: int = 5000  # rows per entity replayed, with incidents
    period: int = 288  # rows per day
    season: float = 0.0  # amplitude of the daily cycle
    noise: str = "gauss"  # "gauss" | "t3"
    trend: float = 0.0  # level change per 1,000 rows (it goes on through the test part)
    kinds: tuple[str, ...] = ("spike", "level_shift")
    incidents: int = 6  # per entity
    outages: int = 0  # per entity: stretches of the test part the series does not report

    def validate(self) -> None:
        if self.features < 1 or self.entities < 1 or self.history < 10 or self.length < 500:
            raise ValueError("a series needs at least 1 feature, 1 entity, 10 history rows and 500 test rows.")
        unknown = [k for k in self.kinds if k not in INCIDENT_KINDS]
        if unknown or (("pattern" in self.kinds) and self.season <= 0):
            raise ValueError(
                f"incident kinds must be from {', '.join(INCIDENT_KINDS)} ('pattern' needs a season), got "
                f"{list(self.kinds)}."
            )
        if self.noise not in ("gauss", "t3"):
            raise ValueError(f"noise must be 'gauss' or 't3', got {self.noise!r}.")


SUITE: dict[str, SeriesSpec] = {
    "univariate": SeriesSpec(features=1, season=1.0),
    "level_shifts": SeriesSpec(features=4, kinds=("level_shift",)),
    "variance": SeriesSpec(features=4, kinds=("variance",)),
    "seasonal": SeriesSpec(features=2, season=3.0, kinds=("spike", "level_shift", "pattern")),
    "heavy_tails": SeriesSpec(features=2, noise="t3", kinds=("spike", "level_shift")),
    "trend": SeriesSpec(features=2, trend=0.3, kinds=("spike", "level_shift")),
    "short_history": SeriesSpec(features=1, history=300, season=1.0),
    "medium_history": SeriesSpec(features=1, history=750, season=1.0),  # issue 17's trial: at most 750 rows
    "outages": SeriesSpec(features=1, season=1.0, outages=6),  # univariate's series, with readings missing
    "seasonal_outages": SeriesSpec(features=2, season=3.0, kinds=("spike", "level_shift", "pattern"), outages=6),
}


@dataclass(frozen=True)
class Incident:
    kind: str
    start: int  # row of the test part
    end: int  # exclusive
    features: tuple[int, ...]
    size: float


@dataclass
class Series:
    key: str
    history: np.ndarray  # float64 [history, F]
    test: np.ndarray  # float64 [length, F]
    incidents: list[Incident] = field(default_factory=list)
    reported: np.ndarray | None = None  # bool [length]: the test rows the series reports (None: all)

    def labels(self) -> np.ndarray:
        out = np.zeros(len(self.test), dtype=np.int8)
        for i in self.incidents:
            out[i.start : i.end] = 1
        return out


def generate(spec: SeriesSpec, seed: int) -> list[Series]:
    spec.validate()
    root = np.random.SeedSequence(seed)
    out = [_one(spec, f"series-{e}", *root.spawn(1)[0].spawn(2)) for e in range(spec.entities)]
    if spec.outages:  # a stream of its own, so the series and incidents are those of the same seed without
        outage_rng = np.random.default_rng(np.random.SeedSequence([seed, 0x0C7A6E]))
        for s in out:
            s.reported = _reported(spec, s.incidents, outage_rng)
    return out


def _reported(spec: SeriesSpec, incidents: list[Incident], rng: np.random.Generator) -> np.ndarray:
    """The test rows a series reports: all but `spec.outages` stretches of 30-240 rows, each at least
    100 rows from any incident and from each other (fewer when the test part has no room)."""
    reported = np.ones(spec.length, dtype=bool)
    keep_clear = np.zeros(spec.length, dtype=bool)
    for inc in incidents:
        keep_clear[max(0, inc.start - 100) : inc.end + 100] = True
    for _ in range(spec.outages):
        for _attempt in range(100):
            n = int(rng.integers(30, 241))
            a = int(rng.integers(100, spec.length - n))
            if not keep_clear[a : a + n].any():
                reported[a : a + n] = False
                keep_clear[max(0, a - 100) : a + n + 100] = True
                break
    return reported


def _one(spec: SeriesSpec, key: str, normal_seq: np.random.SeedSequence, plan_seq: np.random.SeedSequence) -> Series:
    rng = np.random.default_rng(normal_seq)
    f, n = spec.features, spec.history + spec.length
    t = np.arange(n)[:, None]
    phase = rng.uniform(0, 2 * np.pi, size=f)
    mix = rng.normal(size=f)
    mix = 0.7 * mix / max(np.abs(mix).max(), 1e-9)  # share of the latent part per feature
    rho = 0.8
    shocks = rng.normal(size=n) * np.sqrt(1 - rho**2)
    latent = np.zeros(n)
    for i in range(1, n):
        latent[i] = rho * latent[i - 1] + shocks[i]
    if spec.noise == "t3":
        noise = rng.standard_t(3, size=(n, f)) / np.sqrt(3.0)  # unit variance
    else:
        noise = rng.normal(size=(n, f))
    noise *= np.sqrt(1 - mix**2)
    seasonal = spec.season * np.sin(2 * np.pi * t / spec.period + phase) if spec.period > 0 else np.zeros((n, f))
    trend = spec.trend * t / 1000.0
    offset = rng.normal(20.0, 5.0, size=f)
    scale = rng.uniform(0.5, 3.0, size=f)

    incidents = _plan(spec, np.random.default_rng(plan_seq))
    h = spec.history
    for inc in incidents:
        a, b, fi = h + inc.start, h + inc.end, list(inc.features)
        if inc.kind in ("spike", "level_shift"):
            noise[a:b, fi] += inc.size
        elif inc.kind == "variance":
            noise[a:b, fi] *= inc.size
        elif inc.kind == "pattern":
            seasonal[a:b, :] = 0.0
    x = offset + scale * (seasonal + trend + latent[:, None] * mix + noise)
    return Series(key, x[:h], x[h:], incidents)


def _plan(spec: SeriesSpec, rng: np.random.Generator) -> list[Incident]:
    out: list[Incident] = []
    start = 200 + int(rng.integers(0, 100))
    for _ in range(spec.incidents):
        kind = str(rng.choice(spec.kinds))
        dur = {"spike": (1, 3), "level_shift": (50, 150), "variance": (100, 200), "pattern": (150, 300)}[kind]
        end = start + int(rng.integers(dur[0], dur[1] + 1))
        if end > spec.length:
            break
        k = int(rng.integers(1, min(2, spec.features) + 1))
        fi = tuple(sorted(int(i) for i in rng.choice(spec.features, size=k, replace=False)))
        sign = float(rng.choice((-1.0, 1.0)))
        size = {
            "spike": sign * rng.uniform(6, 10),
            "level_shift": sign * rng.uniform(3, 6),
            "variance": 4.0,
            "pattern": 0.0,
        }[kind]
        out.append(Incident(kind, start, end, fi, float(size)))
        gap = max(300, (spec.length - 200) // (spec.incidents + 1))
        start = end + int(rng.integers(gap // 2, gap + 1))
    return out


def feature_names(n: int) -> list[str]:
    return [f"x{i}" for i in range(n)]


def write_dataset(series: list[Series], folder: Path) -> dict[str, Path]:
    """history.csv (every entity's normal history, with a `key` column), and per entity
    test-KEY.csv and labels-KEY.txt (0/1 per row); returns the paths by name."""
    folder.mkdir(parents=True, exist_ok=True)
    names = feature_names(series[0].history.shape[1])
    paths = {"history": folder / "history.csv"}
    with open(paths["history"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "ts", *names])
        for s in series:
            for i, row in enumerate(s.history):
                w.writerow([s.key, T0_MS + i * STEP_MS, *(f"{v:.6g}" for v in row)])
    for s in series:
        test = paths[f"test-{s.key}"] = folder / f"test-{s.key}.csv"
        rows = np.flatnonzero(s.reported) if s.reported is not None else np.arange(len(s.test))
        with open(test, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["key", "ts", *names])
            base = len(s.history)
            for i in rows.tolist():
                w.writerow([s.key, T0_MS + (base + i) * STEP_MS, *(f"{v:.6g}" for v in s.test[i])])
        labels = paths[f"labels-{s.key}"] = folder / f"labels-{s.key}.txt"
        labels.write_text("\n".join(str(int(v)) for v in s.labels()[rows]) + "\n")
    return paths
