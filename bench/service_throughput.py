"""Service throughput through the real broker: 1,000 entities x 38 features (defaults).

Pre-loads a topic with simulated events (JSON, ~1 KB each), then runs the real `Detector` loop
(`run(max_messages=...)`) over it once per scoring hop (hop 1 and hop 16 by default), each with a
fresh consumer group, and reports:
- ingest events/s: events consumed, decoded, windowed and delivered per second, measured from the
  first consumed message to the end of the run (group join excluded);
- scored windows/s over the same interval;
- standalone ONNX Runtime windows/s for the same model, provider and batch size, measured in the
  same process just before, on random windows (no Kafka, no decoding), and the ratio
  service scored windows/s / standalone windows/s.

Model: `--bundle DIR`, or (default) the reference architecture of DESIGN.md (W=64, d_model=64,
2 layers) trained for one short epoch on simulated normal data with `stream-detector-train fit`
(throughput does not depend on how well it is trained). Broker: `--bootstrap`, or the local one
(deploy/kafka/broker.sh start). Prints a table and a JSON line; it does not pass or fail.

    .venv/bin/python bench/service_throughput.py [--entities 1000] [--ticks 100] [--hops 1,16]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stream_detector.core.bundle import load_bundle  # noqa: E402
from stream_detector.config import load_settings  # noqa: E402
from stream_detector.service.loop import Detector  # noqa: E402
from stream_detector.offline.simulate import SimConfig, Simulator, produce  # noqa: E402

from perfkit import reference_bundle, standalone_ort, start_broker  # noqa: E402  (bench/ is on sys.path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: start the local broker)")
    p.add_argument("--bundle", type=Path, help="model bundle (default: train the reference architecture briefly)")
    p.add_argument("--entities", type=int, default=1000)
    p.add_argument("--features", type=int, default=38)
    p.add_argument("--window", type=int, default=64, help="window of the trained reference bundle")
    p.add_argument("--ticks", type=int, default=100, help="events per entity pre-loaded (hop 1 scores ticks - W + 1 per entity)")
    p.add_argument("--hops", default="1,16")
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--standalone-seconds", type=float, default=5.0)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    bootstrap = args.bootstrap or start_broker()
    work = Path(tempfile.mkdtemp(prefix="sd-bench-"))
    bundle_path = args.bundle or reference_bundle(work, args.features, args.window)
    bundle = load_bundle(bundle_path)

    from confluent_kafka.admin import AdminClient, NewTopic

    run = uuid.uuid4().hex[:6]
    topic, alerts, dlq = f"bench-{run}-obs", f"bench-{run}-alerts", f"bench-{run}-dlq"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(topic, args.partitions, 1), NewTopic(alerts, 1, 1), NewTopic(dlq, 1, 1)]).values():
        f.result(timeout=30)
    sim = Simulator(SimConfig(entities=args.entities, features=args.features, anomaly_rate=1.0, warmup=0, seed=11), args.ticks)
    t0 = time.perf_counter()
    total = produce(sim, bootstrap, topic, rate=0)
    print(f"pre-loaded {total} events into {topic} in {time.perf_counter() - t0:.1f} s", flush=True)

    ort_rate, provider, _ = standalone_ort(bundle_path, args.provider, args.max_batch, args.standalone_seconds)
    rows = []
    for hop in [int(h) for h in args.hops.split(",")]:
        settings = load_settings(None, {
            "kafka": {"bootstrap_servers": bootstrap, "group_id": f"bench-{run}-hop{hop}", "topics": [topic], "alerts_topic": alerts, "dlq_topic": dlq},
            "input": {"timestamp_field": "ts"},
            "model": {"bundle": str(bundle_path), "provider": args.provider},
            "detection": {"hop": hop, "max_entities": max(100_000, 2 * args.entities)},
            "runtime": {"max_batch": args.max_batch, "max_wait_ms": 100},
        })
        stats = Detector(settings).run(max_messages=total, timeout=1800)
        busy = stats.elapsed_s - (stats.first_message_s or 0.0)
        rows.append({
            "hop": hop, "events": stats.consumed, "scored": stats.scored, "seconds": round(busy, 2),
            "ingest_events_per_s": round(stats.consumed / busy), "scored_windows_per_s": round(stats.scored / busy),
            "standalone_ort_windows_per_s": round(ort_rate), "ratio": round(stats.scored / busy / ort_rate, 3),
            "alerts": sum(stats.alerts.values()), "dead_letters": stats.dead_letters,
        })
        print(f"hop {hop}: {stats.consumed} events, {stats.scored} windows in {busy:.1f} s", flush=True)

    print(f"\nmodel {bundle.model_version}: W={bundle.window}, F={bundle.n_features}; provider {provider}; batch {args.max_batch}; "
          f"{args.entities} entities x {args.ticks} events, {args.partitions} partitions")
    head = f"{'hop':>4} {'events':>8} {'ingest ev/s':>12} {'scored win/s':>13} {'ORT alone win/s':>16} {'ratio':>6}"
    print(head)
    for r in rows:
        print(f"{r['hop']:>4} {r['events']:>8} {r['ingest_events_per_s']:>12} {r['scored_windows_per_s']:>13} {r['standalone_ort_windows_per_s']:>16} {r['ratio']:>6}")
    print(orjson.dumps({"bench": "service_throughput", "provider": provider, "model": bundle.model_version, "window": bundle.window,
                        "features": bundle.n_features, "entities": args.entities, "batch": args.max_batch, "rows": rows}).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
