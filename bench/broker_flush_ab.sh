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
PY=${PYTHON:-.venv/bin/python}
LOG=${XDG_CACHE_HOME:-$HOME/.cache}/stream-detector/kafka-data-19092/server.log  # broker.sh's default data dir
mkdir -p "$OUT"
was_running=0; bash deploy/kafka/broker.sh status >/dev/null 2>&1 && was_running=1
probe() { "$PY" bench/latency_probe.py --bootstrap 127.0.0.1:19092 --rate "$RATE" "$@" >/dev/null 2>"$OUT/last.err" \
          || { tail -5 "$OUT/last.err" >&2; exit 1; }; }
for pair in $(seq 1 "$PAIRS"); do
  for flush in 0 1000; do
    bash deploy/kafka/broker.sh stop >/dev/null 2>&1 || true
    bash deploy/kafka/broker.sh start --flush-interval-ms "$flush" >/dev/null
    sleep 10  # a broker that has just opened its port may not yet serve new topics' metadata
    probe --seconds 25
    out="$OUT/flush${flush}-run${pair}.json"
    probe --seconds 30 --out "$out"
    "$PY" - "$out" "$flush" "$LOG" <<'PY'
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
  done
done
bash deploy/kafka/broker.sh stop >/dev/null 2>&1 || true
[ "$was_running" = 1 ] && bash deploy/kafka/broker.sh start >/dev/null
exit 0
