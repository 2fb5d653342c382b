#!/usr/bin/env bash
# The same latency probe against the local broker with and without periodic flushing, alternated:
#   bash bench/broker_flush_ab.sh [RATE events/s, default 33000] [OUT_DIR, default /tmp/sd-flush-ab] [PAIRS, default 2]
# Each condition restarts deploy/kafka/broker.sh with --flush-interval-ms 0 (Kafka's default: a
# partition is fsynced when its segment rolls) or 1000, runs a 25 s probe to warm the broker's JVM
# (discarded), then the measured 30 s probe. At 33,000 events/s over 4 partitions each partition
# rolls its 256 MB segment ~27 s after the producer starts, inside the measured window. Prints one
# line per measured run, with when the input topic's segments rolled (from the broker's log) and the
# largest latency inside the service within 2 s after a roll and elsewhere; the probes' JSON (with
# the per-250 ms timeline) is in OUT_DIR.
# Stops the broker it restarts at the end only if it was not running before.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-33000}
OUT=${2:-/tmp/sd-flush-ab}
PAIRS=${3:-2}
LOG=${XDG_CACHE_HOME:-$HOME/.cache}/stream-detector/kafka-data-19092/server.log  # broker.sh's default data dir
. bench/broker_ab.sh

start_broker_as() { bash deploy/kafka/broker.sh start --flush-interval-ms "$1"; }

report() {
    "$PY" - "$1" "$2" "$LOG" <<'PY'
import json, re, sys
from datetime import datetime, timezone
d = json.load(open(sys.argv[1]))
lat, slow = d["end_to_end"]["latency_ms"], d["slowest_1pct"]
t0 = datetime.fromisoformat(d["timeline_start_utc"]).timestamp() * 1000.0
rolls = []  # ms after the timeline's start at which a partition of the probe's input topic rolled
for line in open(sys.argv[3], errors="replace"):
    m = re.match(r"\[(\S+ \S+)\].*partition=bench-\w+probe-lat-\d+.*Rolled new log segment", line)
    if m:
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=timezone.utc).timestamp() * 1000.0 - t0
        if 0 <= t <= d["timeline"][-1]["t_ms"]:
            rolls.append(t)
near = [s for s in d["timeline"] if any(r - 250 <= s["t_ms"] <= r + 2000 for r in rolls)]
worst_near = max((s["max_ms"] or 0 for s in near), default=None)
worst_else = max((s["max_ms"] or 0 for s in d["timeline"] if s not in near), default=None)
print(f"flush.interval.ms={sys.argv[2]:>4}  end-to-end p50 {lat['p50']} p95 {lat['p95']} p99 {lat['p99']} max {lat['max']} ms;"
      f" slowest 1%: {slow['to_decode_ms']['p50']} ms before decode; segment rolls at {[round(r / 1000, 1) for r in rolls]} s:"
      f" largest service latency within 2 s after one {worst_near} ms, elsewhere {worst_else} ms  ({sys.argv[1]})")
PY
}

ab_run "$RATE" "$OUT" "$PAIRS" flush 0 1000
