#!/usr/bin/env bash
# The same latency probe against the local broker with and without a cap on its log cleaner,
# alternated, long enough for the state changelog's first segments to fill and be compacted:
#   bash bench/broker_cleaner_ab.sh [RATE events/s, default 19000] [OUT_DIR, default /tmp/sd-cleaner-ab]
#                                   [PAIRS, default 2] [CAP bytes/s, default 8388608] [SECONDS, default 420]
# A = no cap (Kafka's default, and broker.sh's before this comparison), B = a cap of CAP (broker.sh's
# default since: 8 MiB/s). 10,000 entities (the e2e
# soak's fleet; at 25% of its maximum the changelog's 256 MB segments roll about 6 minutes in).
# Prints one line per measured run: end-to-end latency, 250 ms slots whose slowest alert took
# over 150 ms, and the cleaner's passes in the window (from the broker's server.log); the probes'
# JSON is in OUT_DIR. Stops the broker it restarts at the end only if it was not running before.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-19000}
OUT=${2:-/tmp/sd-cleaner-ab}
PAIRS=${3:-2}
CAP=${4:-8388608}
export AB_SECONDS=${5:-420} AB_PROBE_ARGS="--entities 10000"
DATA=${XDG_CACHE_HOME:-$HOME/.cache}/stream-detector/kafka-data-19092  # broker.sh's default data dir
. bench/broker_ab.sh

start_broker_as() {
  if [ "$1" = A ]; then
    SD_KAFKA_CLEANER_IO_BYTES_PER_S=0 bash deploy/kafka/broker.sh start
  else
    SD_KAFKA_CLEANER_IO_BYTES_PER_S="$CAP" bash deploy/kafka/broker.sh start
  fi
}

report() {
    "$PY" - "$1" "$2" "$DATA" <<'PY'
import json, re, sys
from datetime import datetime
d = json.load(open(sys.argv[1]))
lat = d["end_to_end"]["latency_ms"]
t0 = datetime.fromisoformat(d["timeline_start_utc"]).timestamp()
t1 = t0 + d["timeline"][-1]["t_ms"] / 1000.0
slow = sum(1 for s in d["timeline"] if s["max_ms"] > 150)
passes = []  # (start, end) of the cleaner's passes inside the measured window
start = None
for line in open(sys.argv[3] + "/server.log", errors="replace"):
    m = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\] INFO (Cleaner 0: Beginning cleaning|Cleaner 0: Swapping in cleaned)", line)
    if not m:
        continue
    t = datetime.strptime(m.group(1) + "+0000", "%Y-%m-%d %H:%M:%S,%f%z").timestamp()
    if "Beginning" in m.group(2):
        start = t
    elif start is not None and t0 <= start <= t1:
        passes.append((start, t))
        start = None
span = f"{passes[0][0] - t0:.0f}-{passes[-1][1] - t0:.0f} s into the run" if passes else "none"
print(f"cleaner cap {sys.argv[2]}  end-to-end p50 {lat['p50']} p99 {lat['p99']} max {lat['max']} ms;"
      f" 250 ms slots slower than 150 ms: {slow} of {len(d['timeline'])}; cleaner passes: {len(passes)} ({span},"
      f" {sum(b - a for a, b in passes):.1f} s in all)  ({sys.argv[1]})")
PY
}

ab_run "$RATE" "$OUT" "$PAIRS" cleaner A B
