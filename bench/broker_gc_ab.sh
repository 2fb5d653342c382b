#!/usr/bin/env bash
# The same latency probe against the local broker with two JVM settings, alternated:
#   bash bench/broker_gc_ab.sh [RATE events/s, default 37700] [OUT_DIR, default /tmp/sd-gc-ab] [PAIRS, default 2]
# A = the broker's JVM settings before phase 6 (-Xms256m -Xmx1g, G1's defaults), B = broker.sh's
# defaults (fixed 2 GB heap, 20 ms pause goal). Each condition restarts deploy/kafka/broker.sh, runs
# a 25 s probe to warm the broker (discarded), then the measured 30 s probe. Prints one line per
# measured run: end-to-end latency, the broker's GC pauses within the measured window (from its
# gc.log) and the machine's and the broker's cores; the probes' JSON is in OUT_DIR.
# Stops the broker it restarts at the end only if it was not running before.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-37700}
OUT=${2:-/tmp/sd-gc-ab}
PAIRS=${3:-2}
DATA=${XDG_CACHE_HOME:-$HOME/.cache}/stream-detector/kafka-data-19092  # broker.sh's default data dir
. bench/broker_ab.sh

start_broker_as() {
  if [ "$1" = A ]; then
    KAFKA_HEAP_OPTS="-Xms256m -Xmx1g" KAFKA_JVM_PERFORMANCE_OPTS="-XX:+UseG1GC" bash deploy/kafka/broker.sh start
  else
    env -u KAFKA_HEAP_OPTS -u KAFKA_JVM_PERFORMANCE_OPTS bash deploy/kafka/broker.sh start
  fi
}

report() {
    "$PY" - "$1" "$2" "$DATA" <<'PY'
import glob, json, re, sys
from datetime import datetime
d = json.load(open(sys.argv[1]))
lat, cpu = d["end_to_end"]["latency_ms"], d["cpu_cores_mean"]
t0 = datetime.fromisoformat(d["timeline_start_utc"]).timestamp()
t1 = t0 + d["timeline"][-1]["t_ms"] / 1000.0
pauses = []  # (kind, ms) of the broker's GC pauses inside the measured window
for path in glob.glob(sys.argv[3] + "/gc.log*"):
    for line in open(path, errors="replace"):
        m = re.match(r"\[([^\]]+)\].*\[gc\s*\] GC\(\d+\) (Pause \w+(?: \([\w ]+\))?).* ([\d.]+)ms$", line)
        if m and t0 <= datetime.fromisoformat(m.group(1).replace("+0000", "+00:00")).timestamp() <= t1:
            pauses.append((m.group(2), float(m.group(3))))
conc = sum(1 for k, _ in pauses if "Concurrent Start" in k)
print(f"broker JVM {sys.argv[2]}  end-to-end p50 {lat['p50']} p95 {lat['p95']} p99 {lat['p99']} max {lat['max']} ms;"
      f" broker GC in the window: {len(pauses)} pauses, {conc} concurrent cycles, largest {max((p for _, p in pauses), default=0):.1f} ms,"
      f" total {sum(p for _, p in pauses):.0f} ms; cores busy: machine {cpu.get('machine')}, broker {cpu.get('broker')}  ({sys.argv[1]})")
PY
}

ab_run "$RATE" "$OUT" "$PAIRS" jvm A B
