"""What a shadow candidate costs the live model: its p99 alert latency without and with a shadow
(service/shadow.py), in one run, on the same broker and load (bench/e2e.py's latency measurement:
a producer at a fixed rate stamps every event, every scored event of the live model alerts, and
the latency is produce -> alert read back from the broker).

The shadow is the reference bundle with its own calibration (a real candidate's cost: the same
model size scoring every window, few alerts); the live bundle is e2e's latency bundle built from
it. Rounds alternate (without, with, without, with, ...) so that drift of the shared machine falls
on both; the table gives each round and the ratio of the medians.

    .venv/bin/python bench/shadow_cost.py --rate 3000 --seconds 30 --entities 100 --rounds 2

Prints a table (and JSON with --out); it does not pass or fail.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import e2e  # noqa: E402  (bench/e2e.py, after the path is set)


def measure(bootstrap: str, live: Path, shadow: Path | None, args: argparse.Namespace, work: Path) -> dict:
    run = f"{uuid.uuid4().hex[:6]}shadow"
    shadow_topic = f"bench-{run}-lat-alerts.shadow"
    create, settings_for = e2e.create_topics, e2e.service_settings
    if shadow is not None:  # the shadow's topic next to e2e's own, and the shadow in the settings
        e2e.create_topics = lambda b, topics: create(b, {**topics, shadow_topic: 1})
        e2e.service_settings = lambda *a, **sections: settings_for(
            *a, **{**sections, "model": {**sections.get("model", {}), "shadow_bundle": str(shadow)}})
    try:
        lat = e2e.measure_latency(bootstrap, run, live, args.entities, args.rate, args.seconds, args.max_batch,
                                  args.hop, args.partitions, work)
    finally:
        e2e.create_topics, e2e.service_settings = create, settings_for
        if shadow is not None:
            e2e.delete_topics(bootstrap, [shadow_topic])
    lat.pop("profile", None)
    lat.pop("latency_per_second", None)
    return lat


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: start the local broker)")
    p.add_argument("--bundle", type=Path, default=REPO / "bench" / "reference_bundle")
    p.add_argument("--rate", type=float, default=3000.0, help="offered events/s")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--entities", type=int, default=100)  # enough events per entity to fill windows
    p.add_argument("--hop", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    e2e.PROVIDER = "cpu"
    bootstrap = args.bootstrap or e2e.start_broker()
    work = Path(tempfile.mkdtemp(prefix="sd-shadow-cost-"))
    live = e2e.latency_bundle(args.bundle, work)
    rows = []
    for r in range(args.rounds):
        for name, shadow in (("without shadow", None), ("with shadow", args.bundle)):
            lat = measure(bootstrap, live, shadow, args, work)
            rows.append({"round": r + 1, "run": name, **lat})
            ms = lat["latency_ms"]
            print(f"round {r + 1} {name:15s} p50 {ms.get('p50')} ms  p99 {ms.get('p99')} ms  "
                  f"alerts {lat['alerts']}  achieved {lat['achieved_events_per_s']}/s", flush=True)
    if not all(x["latency_ms"] for x in rows):
        print("some rounds produced no alert: give each entity more events (fewer --entities, more --seconds)")
        return 1
    med = {name: statistics.median(x["latency_ms"]["p99"] for x in rows if x["run"] == name and x["latency_ms"])
           for name in ("without shadow", "with shadow")}
    ratio = med["with shadow"] / med["without shadow"]
    print(f"p99 alert latency, median of {args.rounds} rounds: without {med['without shadow']} ms, with "
          f"{med['with shadow']} ms, ratio {ratio:.2f} ({args.rate:g} events/s, {args.entities} entities, hop {args.hop})")
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows, "p99_median_ms": med,
                                        "ratio": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
