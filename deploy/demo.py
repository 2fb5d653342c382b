"""`make demo`: the whole product on this machine in a few minutes.

1. start the local Kafka broker (deploy/kafka/broker.sh start; idempotent);
2. simulate normal operation of a sensor fleet to a CSV file;
3. train a small model on it with the `stream-detector-train fit` CLI (a subprocess: the runtime
   never imports torch);
4. start the detector service (`Detector`, on a thread) on fresh demo topics;
5. stream the fleet again, now with injected anomalies, and print every alert as it arrives,
   marked with the injected anomaly it caught (or as false);
6. print how many injected anomalies were alerted (by kind), how many alerts were false, and the
   median detection delay.

Run `python deploy/demo.py --help` for the sizes; everything lands in --workdir.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from stream_detector.offline.simulate import KINDS, STRONG_KINDS, Anomaly, SimConfig, Simulator, produce, write_file, write_truth

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("stream_detector.demo")


def start_broker() -> str:
    r = subprocess.run(["bash", str(REPO / "deploy" / "kafka" / "broker.sh"), "start"], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"demo: could not start the local Kafka broker: {r.stderr.strip() or r.stdout.strip()}")
    return [ln for ln in r.stdout.splitlines() if ln.startswith("bootstrap=")][-1].split("=", 1)[1]


def train(data: Path, out: Path, args: argparse.Namespace) -> None:
    cmd = [
        sys.executable, "-m", "training.cli", "--log-level", "WARNING", "fit", "--data", str(data), "--out", str(out),
        "--window", str(args.window), "--d-model", "32", "--n-heads", "2", "--n-layers", "1", "--ff-dim", "64",
        "--epochs", str(args.epochs), "--max-windows-per-epoch", "8192",  # the demo's own budget, measured in docs/quality.md
        "--threads", "1", "--seed", str(args.seed), "--no-progress", "--detectors", args.detectors,
    ]
    print(f"[demo] training: {' '.join(cmd[1:])}", flush=True)
    r = subprocess.run(cmd, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"demo: training failed (exit {r.returncode}).")


def create_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names]).values():
        f.result(timeout=30)


def tick_of(alert: dict[str, Any], cfg: SimConfig) -> int:
    ms = datetime.fromisoformat(alert["event_time"].replace("Z", "+00:00")).timestamp() * 1000
    return round((ms - cfg.start_ms) / cfg.interval_ms)


def match(alert: dict[str, Any], truth: list[Anomaly], cfg: SimConfig, tolerance: int) -> Anomaly | None:
    """The injected anomaly an open alert belongs to: same entity, inside it (+ tolerance ticks)."""
    t = tick_of(alert, cfg)
    for a in truth:
        if a.entity == alert["key"] and a.start <= t < a.end + tolerance:
            return a
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python deploy/demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, help="where data, bundle and truth go (default: a new temp dir)")
    p.add_argument("--entities", type=int, default=20)
    p.add_argument("--features", type=int, default=38)
    p.add_argument("--train-ticks", type=int, default=1500, help="normal events per entity for training")
    p.add_argument("--ticks", type=int, default=1200, help="events per entity streamed with anomalies")
    p.add_argument("--rate", type=float, default=2000.0, help="events/s streamed")
    p.add_argument("--anomaly-rate", type=float, default=2.0, help="anomalies per entity per 1,000 events")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--detectors", default="transformer,pca,flatline",
                   help="fit's --detectors: a fleet of correlated sensors, where a frozen reading is a fault, adds pca and flatline "
                        "(training/composite.py; server metrics plateau legitimately, so fit's own default is the Transformer alone)")
    p.add_argument("--detection", action="append", default=[], metavar="KEY=VALUE",
                   help="a [detection] setting for the service (e.g. alert_level=4.5); default: the product's defaults")
    p.add_argument("--bootstrap", help="use this broker instead of starting the local one")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from stream_detector.core.bundle import BundleError
    from stream_detector.config import ConfigError, load_settings
    from stream_detector.service.kafka_io import KafkaIOError
    from stream_detector.core.scorer import ScorerError
    from stream_detector.service.loop import Detector

    work = args.workdir or Path(tempfile.mkdtemp(prefix="stream-detector-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    bootstrap = args.bootstrap or start_broker()
    print(f"[demo] broker {bootstrap}; files in {work}", flush=True)

    # Event time follows the wall clock: one tick of the fleet lasts as long as streaming it at
    # --rate takes, the normal (training) period lies in the past and the live stream starts now,
    # so the end-to-end lag metric (event time -> alert) means what it says.
    interval_ms = max(1, round(1000 * args.entities / args.rate)) if args.rate > 0 else 1000
    base = dict(entities=args.entities, features=args.features, seed=args.seed, interval_ms=interval_ms)
    train_start_ms = int(time.time() * 1000) - args.train_ticks * interval_ms
    n = write_file(Simulator(SimConfig(**base, start_ms=train_start_ms), args.train_ticks), work / "normal.csv")
    print(f"[demo] simulated {n} normal events ({args.entities} machines x {args.features} sensors)", flush=True)
    train(work / "normal.csv", work / "bundle", args)

    # The live stream: the same fleet (same seed: same machines), later in time, with anomalies.
    run_id = uuid.uuid4().hex[:6]
    topics = {"input": f"demo-{run_id}-observations", "alerts": f"demo-{run_id}-alerts", "dlq": f"demo-{run_id}-dlq"}
    create_topics(bootstrap, list(topics.values()), partitions=4)
    try:
        settings = load_settings(None, {
            "kafka": {"bootstrap_servers": bootstrap, "group_id": f"demo-{run_id}", "topics": [topics["input"]],
                      "alerts_topic": topics["alerts"], "dlq_topic": topics["dlq"]},
            "input": {"timestamp_field": "ts"},
            "model": {"bundle": str(work / "bundle"), "provider": "auto"},
            "detection": dict(kv.split("=", 1) for kv in args.detection),
            "runtime": {"max_batch": 1000, "max_wait_ms": 100, "commit_interval_s": 2.0},
        })
        detector = Detector(settings)
    except (ConfigError, BundleError, ScorerError, KafkaIOError) as e:
        raise SystemExit(f"demo: {e}") from None
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            detector.run()
        except BaseException as e:  # reported by the main thread
            failure.append(e)

    service = threading.Thread(target=serve, name="detector", daemon=True)
    service.start()
    cfg = SimConfig(**base, anomaly_rate=args.anomaly_rate, warmup=300, start_ms=int(time.time() * 1000))
    sim = Simulator(cfg, args.ticks)
    write_truth(work / "truth.jsonl", sim.truth)
    print(f"[demo] detector running (model {detector.bundle.model_version} on {detector.scorer.provider}); "
          f"streaming {args.ticks * args.entities} events with {len(sim.truth)} injected anomalies at {args.rate:g}/s", flush=True)

    from confluent_kafka import Consumer

    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": f"demo-reader-{run_id}", "auto.offset.reset": "earliest"})
    reader.subscribe([topics["alerts"]])
    done = threading.Event()
    sent: list[int] = []
    producer = threading.Thread(target=lambda: (sent.append(produce(sim, bootstrap, topics["input"], args.rate)), done.set()), daemon=True)
    producer.start()

    tolerance = args.window + 10
    opens: list[tuple[dict[str, Any], Anomaly | None]] = []
    total = args.ticks * args.entities
    alerts_file = open(work / "alerts.jsonl", "wb")  # every alert event as published, for a closer look

    def on_alert(value: bytes) -> None:
        alerts_file.write(value + b"\n")
        a = orjson.loads(value)
        if a["state"] != "open":
            return
        hit = match(a, sim.truth, cfg, tolerance)
        opens.append((a, hit))
        top = ", ".join(str(f.get("name")) for f in a.get("top_features", []))
        what = f"injected {hit.kind} at event {hit.start} (+{tick_of(a, cfg) - hit.start})" if hit else "FALSE ALARM"
        print(f"ALERT {a['key']} event {tick_of(a, cfg)} score {a['score']:.3g} > {a['threshold']:.3g} top [{top}]: {what}", flush=True)

    deadline = None
    while not failure:
        for m in reader.consume(100, timeout=0.5):
            if m.error() is None:
                on_alert(m.value())
        if done.is_set() and deadline is None:
            deadline = time.monotonic() + 30
        if done.is_set() and (detector.stats.consumed >= total or time.monotonic() > deadline):
            time.sleep(1.0)  # let the last alerts arrive
            for m in reader.consume(1000, timeout=1.0):
                if m.error() is None:
                    on_alert(m.value())
            break
    alerts_file.close()
    detector.stop()
    service.join(timeout=30)
    reader.close()
    if failure:
        raise SystemExit(f"demo: the detector stopped: {failure[0]}")

    caught = {id(h): h for _, h in opens if h is not None}
    delays = sorted({id(h): tick_of(a, cfg) - h.start for a, h in reversed(opens) if h is not None}.values())
    false = sum(1 for _, h in opens if h is None)
    by_kind = Counter(a.kind for a in sim.truth)
    caught_kind = Counter(h.kind for h in caught.values())
    print("\n[demo] summary")
    print(f"  events streamed: {total}, consumed by the detector: {detector.stats.consumed}, windows scored: {detector.stats.scored}")
    for k in KINDS:
        if by_kind[k]:
            mark = " (strong)" if k in STRONG_KINDS else ""
            print(f"  {k:<18} alerted {caught_kind[k]:>3} / {by_kind[k]:<3}{mark}")
    print(f"  injected anomalies alerted: {len(caught)} / {len(sim.truth)}")
    print(f"  false alerts: {false} (of {len(opens)} open alerts)")
    if delays:
        print(f"  median detection delay: {statistics.median(delays):g} events ({statistics.median(delays) * cfg.interval_ms / 1000:g} s of event time)")
    print(f"  total demo time: {time.monotonic() - t_start:.0f} s; ground truth in {work / 'truth.jsonl'}, alert events in {work / 'alerts.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
