"""A realistic multi-sensor fleet with injected anomalies and their ground truth.

Python API (no Kafka needed; used by tests, the benchmark and the demo):

    sim = Simulator(SimConfig(entities=50, anomaly_rate=2.0, seed=7), ticks=2000)
    for tick, rows in sim.ticks():      # rows: float64 [entities, features], one event per entity
        ...
    sim.truth                            # list[Anomaly]: entity, kind, start/end tick and event time

Model of one entity (each event is one tick of that entity; `interval_ms` of event time apart):
a few latent factors, each a daily cycle (compressed to `period` ticks, with an entity-specific
phase) plus AR(1) noise, drive the sensors through one shared mixing matrix, so sensors are
correlated the same way on every machine; each sensor adds its own white noise, and each entity
has its own per-sensor offset and scale. The clean signal of every sensor has about unit variance
before offset and scale; anomaly sizes are given in those units.

Anomaly kinds (`KINDS`): spike (1-3 ticks, a few sensors jump), level_shift (a block of sensors
moves and stays), drift (a ramp that grows to the full size), correlation_break (some sensors
follow their latent drivers with the sign flipped: marginals unchanged, correlations broken) and
stuck (sensors freeze at their last value). Spike and level shift are the strong kinds.
A fleet-wide fault (`fleet_fault_tick`, `--fleet-fault TICK[:TICKS]`) is one level shift of the
same sensors on every entity at the same tick (a bad deploy, a shared dependency down): each
entity's truth holds it as kind `fleet_fault`, and an entity's own anomalies that would overlap it
are left out.

Randomness: the anomaly plan and the normal signal come from separate streams of one seed, so a
run with anomalies equals the clean run of the same seed everywhere outside the ground truth.

CLI: `stream-detector simulate --bootstrap B --topic T --entities N --rate R --duration S`
streams JSON events (message key = entity) at R events/s; `--out FILE.csv|.jsonl` writes a file
instead (normal data by default, for training). `--truth FILE` writes the ground truth as JSONL.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

log = logging.getLogger(__name__)

KINDS = ("spike", "level_shift", "drift", "correlation_break", "stuck")
STRONG_KINDS = ("spike", "level_shift")
KEY_FIELD = "entity"
TIME_FIELD = "ts"

# (min, max) duration in ticks, and how many sensors are affected, per kind.
_DURATION = {
    "spike": (1, 3),
    "level_shift": (40, 80),
    "drift": (60, 150),
    "correlation_break": (40, 100),
    "stuck": (40, 100),
}
_SENSORS = {"spike": (2, 5), "level_shift": (3, 8), "drift": (3, 8), "correlation_break": (3, 6), "stuck": (2, 6)}


@dataclass(frozen=True)
class SimConfig:
    entities: int = 50
    features: int = 38
    period: int = 288  # ticks per simulated day
    latent: int = 4  # latent drivers shared by the sensors
    noise: float = 0.3  # per-sensor white noise (the latent part has variance ~1)
    anomaly_rate: float = 0.0  # anomalies starting per entity per 1,000 ticks
    kinds: tuple[str, ...] = KINDS
    magnitude: float = 6.0  # anomaly size in signal standard deviations
    warmup: int = 200  # no anomaly in an entity's first ticks (thresholds warm up)
    min_gap: int = 120  # ticks between the end of one anomaly and the start of the next
    interval_ms: int = 1000  # event time between two ticks of an entity
    start_ms: int = 1_700_000_000_000
    key_prefix: str = "machine-"
    seed: int = 0
    fleet_fault_tick: int = -1  # tick at which a fault hits every entity at once (-1: none)
    fleet_fault_ticks: int = 60  # its length

    def validate(self) -> None:
        if self.entities < 1 or self.features < 1 or self.latent < 1 or self.period < 2:
            raise ValueError("entities, features and latent must be at least 1 and period at least 2.")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"unknown anomaly kind(s) {unknown}; choose from {', '.join(KINDS)}.")
        if self.anomaly_rate < 0 or self.noise < 0 or self.magnitude <= 0:
            raise ValueError("anomaly_rate and noise must not be negative and magnitude must be positive.")
        if self.fleet_fault_tick >= 0 and self.fleet_fault_ticks < 1:
            raise ValueError("a fleet-wide fault must last at least one tick.")


@dataclass(frozen=True)
class Anomaly:
    entity: str
    kind: str
    start: int  # first anomalous tick of the entity (= its event index)
    end: int  # first tick after the anomaly (exclusive)
    start_ms: int
    end_ms: int  # event time of `end`
    features: tuple[str, ...]
    entity_index: int = field(default=0, repr=False)
    feature_index: tuple[int, ...] = field(default=(), repr=False)
    sign: float = field(default=1.0, repr=False)
    size: float = field(default=0.0, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(self).items()
            if k not in ("entity_index", "feature_index", "sign", "size")
        }


def feature_names(n: int) -> list[str]:
    return [f"sensor_{i:02d}" for i in range(n)]


class Simulator:
    def __init__(self, config: SimConfig, ticks: int) -> None:
        config.validate()
        self.config = c = config
        self.n_ticks = int(ticks)
        self.features = feature_names(c.features)
        self.keys = [f"{c.key_prefix}{e:04d}" for e in range(c.entities)]
        plan_seq, fleet_seq, noise_seq = np.random.SeedSequence(c.seed).spawn(3)
        fleet = np.random.default_rng(fleet_seq)
        self._rng = np.random.default_rng(noise_seq)
        n, f, k = c.entities, c.features, c.latent
        mix = fleet.normal(size=(f, k))
        self._mix = mix / np.linalg.norm(mix, axis=1, keepdims=True)  # each sensor's latent part has unit variance
        self._harmonic = fleet.integers(1, 3, size=k)  # daily and half-daily cycles
        self._phase = fleet.uniform(0, 2 * np.pi, size=(n, k))
        self._offset = fleet.normal(50.0, 10.0, size=(n, f))
        self._scale = fleet.uniform(2.0, 8.0, size=(1, f)) * fleet.uniform(0.8, 1.25, size=(n, f))
        self._ar_rho = 0.95
        self._ar = np.zeros((n, k))
        self._prev_clean = np.zeros((n, f))
        self.truth = plan_anomalies(c, self.n_ticks, np.random.default_rng(plan_seq), self.keys, self.features)
        self._starting: dict[int, list[Anomaly]] = {}
        for a in self.truth:
            self._starting.setdefault(a.start, []).append(a)

    def time_ms(self, tick: Any) -> Any:
        """Event time of a tick (int or int array)."""
        return self.config.start_ms + tick * self.config.interval_ms

    def ticks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(tick, raw rows float64 [entities, features]) for every tick, anomalies applied."""
        c = self.config
        active: list[Anomaly] = []
        stuck_values: dict[int, np.ndarray] = {}
        seasonal_var, ar_var = 0.7, 0.3
        for t in range(self.n_ticks):
            shocks = self._rng.normal(size=self._ar.shape)
            self._ar = self._ar_rho * self._ar + np.sqrt((1 - self._ar_rho**2) * ar_var) * shocks
            angle = 2 * np.pi * self._harmonic * t / c.period + self._phase
            latent = np.sqrt(2 * seasonal_var) * np.sin(angle) + self._ar  # [n, l], variance ~1
            driven = latent @ self._mix.T  # [n, f]
            clean = driven + c.noise * self._rng.normal(size=driven.shape)
            signal = clean.copy()
            for a in self._starting.get(t, ()):
                active.append(a)
                if a.kind == "stuck":
                    stuck_values[id(a)] = self._prev_clean[a.entity_index, list(a.feature_index)].copy()
            if active:
                active = [a for a in active if a.end > t]
                for a in active:
                    e, fi = a.entity_index, list(a.feature_index)
                    if a.kind in ("spike", "level_shift", "fleet_fault"):
                        signal[e, fi] += a.sign * a.size
                    elif a.kind == "drift":
                        signal[e, fi] += a.sign * a.size * (t - a.start + 1) / (a.end - a.start)
                    elif a.kind == "correlation_break":
                        signal[e, fi] -= 2 * driven[e, fi]
                    elif a.kind == "stuck":
                        signal[e, fi] = stuck_values[id(a)]
            self._prev_clean = clean
            yield t, self._offset + self._scale * signal

    def frame(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """All ticks at once, tick-major: (keys [n], event_time_ms int64 [n], rows float64 [n, F])."""
        rows = np.concatenate([r for _, r in self.ticks()]) if self.n_ticks else np.zeros((0, self.config.features))
        keys = self.keys * self.n_ticks
        times = np.repeat(self.time_ms(np.arange(self.n_ticks)), self.config.entities).astype(np.int64)
        return keys, times, rows

    def events(self) -> Iterator[tuple[str, int, bytes]]:
        """(key, event_time_ms, JSON value) per event, in tick order."""
        names = self.features
        for t, rows in self.ticks():
            ts = int(self.time_ms(t))
            for key, row in zip(self.keys, rows.tolist()):
                yield key, ts, encode_event(key, ts, names, row)


def encode_event(key: str, ts: int, names: Sequence[str], row: Sequence[float]) -> bytes:
    obj: dict[str, Any] = {KEY_FIELD: key, TIME_FIELD: ts}
    obj.update(zip(names, row))
    return orjson.dumps(obj)


def plan_anomalies(
    c: SimConfig, n_ticks: int, rng: np.random.Generator, keys: Sequence[str], names: Sequence[str]
) -> list[Anomaly]:
    """Non-overlapping anomalies per entity: gaps are geometric with mean 1000 / anomaly_rate ticks."""
    out: list[Anomaly] = []
    p = min(1.0, c.anomaly_rate / 1000.0)
    for e, key in enumerate(keys if c.anomaly_rate > 0 else ()):
        t = c.warmup + int(rng.geometric(p)) - 1
        while True:
            kind = str(rng.choice(c.kinds))
            lo, hi = _DURATION[kind]
            end = t + int(rng.integers(lo, hi + 1))
            if end > n_ticks:
                break
            k_lo, k_hi = _SENSORS[kind]
            k = int(rng.integers(min(k_lo, c.features), min(k_hi, c.features) + 1))
            fi = tuple(sorted(int(i) for i in rng.choice(c.features, size=k, replace=False)))
            sign = float(rng.choice((-1.0, 1.0)))
            size = (
                c.magnitude * float(rng.uniform(1.0, 1.5))
                if kind == "spike"
                else c.magnitude * float(rng.uniform(0.7, 1.0))
            )
            out.append(_anomaly(c, names, e, key, kind, t, end, fi, sign, size))
            t = end + c.min_gap + int(rng.geometric(p)) - 1
    if c.fleet_fault_tick >= 0:
        out = _with_fleet_fault(c, n_ticks, rng, keys, names, out)
    out.sort(key=lambda a: (a.start, a.entity_index))
    return out


def _with_fleet_fault(
    c: SimConfig, n_ticks: int, rng: np.random.Generator, keys: Sequence[str], names: Sequence[str], own: list[Anomaly]
) -> list[Anomaly]:
    """The entities' own anomalies that do not overlap it (with the gap), plus the fleet-wide fault on each."""
    start = c.fleet_fault_tick
    end = min(n_ticks, start + c.fleet_fault_ticks)
    if start >= end:
        return own
    k = min(c.features, 4)
    fi = tuple(sorted(int(i) for i in rng.choice(c.features, size=k, replace=False)))
    kept = [a for a in own if a.end + c.min_gap <= start or a.start >= end + c.min_gap]
    return kept + [
        _anomaly(c, names, e, key, "fleet_fault", start, end, fi, 1.0, c.magnitude) for e, key in enumerate(keys)
    ]


def _anomaly(
    c: SimConfig,
    names: Sequence[str],
    e: int,
    key: str,
    kind: str,
    start: int,
    end: int,
    fi: tuple[int, ...],
    sign: float,
    size: float,
) -> Anomaly:
    """An anomaly of entity `e` on features `fi` over ticks [start, end), with its event times and names."""
    return Anomaly(
        key,
        kind,
        start,
        end,
        c.start_ms + start * c.interval_ms,
        c.start_ms + end * c.interval_ms,
        tuple(names[i] for i in fi),
        e,
        fi,
        sign,
        size,
    )


def write_truth(path: str | Path, truth: Sequence[Anomaly]) -> None:
    with open(path, "wb") as f:
        for a in truth:
            f.write(orjson.dumps(a.to_json()) + b"\n")


def read_truth(path: str | Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in Path(path).read_bytes().splitlines() if line.strip()]


def write_file(sim: Simulator, path: str | Path) -> int:
    """Write every event to CSV (columns entity, ts, features) or JSONL; returns the event count."""
    path = Path(path)
    n = 0
    if path.suffix == ".jsonl":
        with open(path, "wb") as f:
            for _, _, value in sim.events():
                f.write(value + b"\n")
                n += 1
        return n
    if path.suffix != ".csv":
        raise ValueError(f"--out must end in .csv or .jsonl, got {path.name}.")
    with open(path, "w") as f:
        f.write(",".join([KEY_FIELD, TIME_FIELD, *sim.features]) + "\n")
        for t, rows in sim.ticks():
            ts = int(sim.time_ms(t))
            for key, row in zip(sim.keys, rows):
                f.write(f"{key},{ts}," + ",".join(f"{v:.5f}" for v in row) + "\n")
                n += 1
    return n


def produce(
    sim: Simulator,
    bootstrap: str,
    topic: str,
    rate: float,
    producer_config: dict[str, Any] | None = None,
    truth_topic: str | None = None,
    stop: Any = None,
) -> int:
    """Stream the simulation to `topic` (key = entity) at `rate` events/s (0 = as fast as possible);
    ground truth goes to `truth_topic` when given. Returns the number of events acknowledged."""
    from confluent_kafka import Producer

    errors: list[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None and not errors:
            errors.append(err.str())

    p = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True, **(producer_config or {})}
    )
    n_entities = sim.config.entities
    t0 = time.monotonic()
    sent = 0
    for t, rows in sim.ticks():
        if stop is not None and stop():
            break
        ts = int(sim.time_ms(t))
        for key, row in zip(sim.keys, rows.tolist()):
            value = encode_event(key, ts, sim.features, row)
            while True:
                try:
                    p.produce(topic, value=value, key=key.encode(), timestamp=ts, on_delivery=on_delivery)
                    break
                except BufferError:
                    p.poll(0.05)
        sent += n_entities
        p.poll(0)
        if errors:
            raise RuntimeError(f"producing to {topic} failed: {errors[0]}")
        if rate > 0:
            ahead = t0 + sent / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    if truth_topic:
        for a in sim.truth:
            p.produce(truth_topic, value=orjson.dumps(a.to_json()), key=a.entity.encode(), on_delivery=on_delivery)
    left = p.flush(60)
    if errors or left:
        raise RuntimeError(f"producing to {topic} failed: {errors[0] if errors else f'{left} events not acknowledged'}")
    return sent


# ---- CLI --------------------------------------------------------------------------------------


def _fleet_fault(value: str | None) -> tuple[int, int]:
    """`TICK` or `TICK:TICKS` -> (fleet_fault_tick, fleet_fault_ticks); ValueError with one sentence."""
    default = SimConfig()
    if not value:
        return default.fleet_fault_tick, default.fleet_fault_ticks
    tick, _, length = value.partition(":")
    try:
        out = int(tick), int(length) if length else default.fleet_fault_ticks
    except ValueError:
        raise ValueError(f"--fleet-fault takes TICK or TICK:TICKS (whole numbers), not {value!r}.") from None
    if out[0] < 0:
        raise ValueError("--fleet-fault: the tick must not be negative.")
    return out


def handle(args: argparse.Namespace) -> int:
    try:
        kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
        fault_tick, fault_ticks = _fleet_fault(args.fleet_fault)
        rate_default = 0.0 if args.out else 2.0
        cfg = SimConfig(
            entities=args.entities,
            features=args.features,
            period=args.period,
            seed=args.seed,
            anomaly_rate=rate_default if args.anomaly_rate is None else args.anomaly_rate,
            kinds=kinds,
            magnitude=args.magnitude,
            interval_ms=args.interval_ms,
            fleet_fault_tick=fault_tick,
            fleet_fault_ticks=fault_ticks,
        )
        cfg.validate()
    except ValueError as e:
        print(f"simulate: {e}", file=sys.stderr)
        return 2
    if args.out:
        ticks = args.ticks if args.ticks else 1000
    else:
        if not (args.bootstrap and args.topic):
            print(
                "simulate: give --bootstrap and --topic to stream to Kafka, or --out FILE to write a file.",
                file=sys.stderr,
            )
            return 2
        if args.duration is None or args.duration <= 0 or args.rate < 0:
            print("simulate: --duration must be positive and --rate not negative.", file=sys.stderr)
            return 2
        ticks = (
            args.ticks
            if args.ticks
            else max(1, round(args.rate * args.duration / cfg.entities))
            if args.rate > 0
            else 1000
        )
    sim = Simulator(cfg, ticks)
    if args.truth:
        write_truth(args.truth, sim.truth)
    try:
        if args.out:
            n = write_file(sim, args.out)
            print(
                f"wrote {n} events ({cfg.entities} entities x {ticks} ticks, {len(sim.truth)} anomalies) to {args.out}"
            )
            return 0
        n = produce(sim, args.bootstrap, args.topic, args.rate, truth_topic=args.truth_topic)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"simulate: {e}", file=sys.stderr)
        return 1
    print(f"sent {n} events ({cfg.entities} entities x {ticks} ticks, {len(sim.truth)} anomalies) to {args.topic}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="stream a simulated sensor fleet with injected anomalies (or write it to a file)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--bootstrap", help="Kafka bootstrap servers to stream to")
    p.add_argument("--topic", help="topic for the events (message key = entity)")
    p.add_argument("--out", help="write events to this .csv or .jsonl file instead of Kafka")
    p.add_argument("--entities", type=int, default=50, help="number of entities (default 50)")
    p.add_argument("--features", type=int, default=38, help="sensors per entity (default 38)")
    p.add_argument(
        "--rate",
        type=float,
        default=1000.0,
        help="events per second over all entities, 0 = as fast as possible (default 1000)",
    )
    p.add_argument("--duration", type=float, help="seconds to stream (ticks = rate x duration / entities)")
    p.add_argument("--ticks", type=int, help="events per entity (overrides --duration; file mode default 1000)")
    p.add_argument("--period", type=int, default=288, help="ticks per simulated day (default 288)")
    p.add_argument("--interval-ms", type=int, default=1000, help="event time between ticks (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--anomaly-rate", type=float, help="anomalies per entity per 1,000 ticks (default 2; 0 with --out)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"anomaly kinds (default {','.join(KINDS)})")
    p.add_argument(
        "--magnitude", type=float, default=6.0, help="anomaly size in signal standard deviations (default 6)"
    )
    p.add_argument(
        "--fleet-fault",
        metavar="TICK[:TICKS]",
        help="a fault hitting every entity at this tick, for TICKS ticks (default 60): one incident, not N",
    )
    p.add_argument("--truth", help="write the ground truth (one anomaly per line) to this JSONL file")
    p.add_argument("--truth-topic", help="also send the ground truth to this topic")
    p.set_defaults(func=handle)
