#!/usr/bin/env bash
# Throughput of this checkout against an older commit: bench/e2e.py's service runs (1,000 entities,
# hops 1 and 16, no latency runs) of each, ROUNDS rounds, alternated on the same broker, so their
# ratio is measured under the same load. This checkout also runs each hop with both threshold
# methods (`--thresholds quantile,calibrated`; the reference bundle's own method is the quantile
# one, the method of the old code), which gives the calibrated thresholds' cost in the same runs.
# An old tree whose e2e.py knows --thresholds runs both too, and the calibrated new/old ratio is printed.
#   bash bench/e2e_ab.sh OLD_REV ROUNDS OUT     e.g. bash bench/e2e_ab.sh f739a3b 2 /tmp/e2e-ab
# Prints one line per run (ingest events/s per hop and method) and the mean ratios at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
old=${1:?OLD_REV}; rounds=${2:-2}; out=${3:-/tmp/e2e-ab}
PY=${PYTHON:-$PWD/.venv/bin/python}
mkdir -p "$out"
tree="$out/old-tree"
rm -rf "$tree"; mkdir -p "$tree"
git archive "$old" | tar -x -C "$tree"
bootstrap=$(bash deploy/kafka/broker.sh start | sed -n 's/^bootstrap=//p' | tail -1)
args=(--bootstrap "$bootstrap" --entities 1000 --latency-seconds 0 --hops 1,16)
old_args=()  # an old tree that knows --thresholds runs both methods too (new/old per method)
grep -q -- '"--thresholds"' "$tree/bench/e2e.py" && old_args=(--thresholds quantile,calibrated)
for r in $(seq 1 "$rounds"); do
  (cd "$tree" && PYTHONPATH="$tree" "$PY" bench/e2e.py "${args[@]}" "${old_args[@]}" --out "$out/old-$r.json" > "$out/old-$r.log" 2>&1)
  PYTHONPATH="$PWD" "$PY" bench/e2e.py "${args[@]}" --thresholds quantile,calibrated --out "$out/new-$r.json" > "$out/new-$r.log" 2>&1
done
"$PY" - "$out" "$rounds" <<'PYEOF'
import json, sys
out, rounds = sys.argv[1], int(sys.argv[2])
rate = lambda f, hop, m: [r["ingest_events_per_s"] for r in json.load(open(f))["fleets"][0]["service"]
                          if r["hop"] == hop and r.get("threshold", "auto") == m][0]
both = lambda f: any(r.get("threshold") == "calibrated" for r in json.load(open(f))["fleets"][0]["service"])
for hop in (1, 16):
    rows, cal = [], []
    for r in range(1, rounds + 1):
        old_file = f"{out}/old-{r}.json"
        old_both = both(old_file)
        o = rate(old_file, hop, "quantile" if old_both else "auto")
        q, c = rate(f"{out}/new-{r}.json", hop, "quantile"), rate(f"{out}/new-{r}.json", hop, "calibrated")
        if old_both:
            oc = rate(old_file, hop, "calibrated")
            cal.append(c / oc)
            print(f"hop {hop} round {r}: calibrated, new {c:,} / old {oc:,} = {c / oc:.3f}")
        rows.append((o, q, c))
        print(f"hop {hop} round {r}: old {o:,} events/s; new, quantile {q:,} ({q / o:.3f} x old); new, calibrated {c:,} ({c / q:.3f} x quantile)")
    n = len(rows)
    print(f"hop {hop} mean: new/old {sum(q / o for o, q, _ in rows) / n:.3f}, calibrated/quantile {sum(c / q for _, q, c in rows) / n:.3f}"
          + (f", calibrated new/old {sum(cal) / n:.3f}" if cal else ""))
PYEOF
