# Sourced by bench/broker_flush_ab.sh and bench/broker_gc_ab.sh: the same latency probe against the
# local broker under each condition in turn, PAIRS rounds, alternated. Per condition: restart
# deploy/kafka/broker.sh (`start_broker_as COND`, defined by the caller), warm it with a discarded
# 25 s probe, then measure AB_SECONDS (default 30) into OUT/PREFIX<COND>-run<N>.json and print one
# line (`report JSON COND`, defined by the caller). AB_PROBE_ARGS (a string of further probe
# options, e.g. "--entities 10000") goes to both probes. Restarts the broker at the end only if it
# was running before.
#   ab_run RATE OUT PAIRS PREFIX COND...
PY=${PYTHON:-.venv/bin/python}
AB_SECONDS=${AB_SECONDS:-30}
read -r -a _AB_ARGS <<< "${AB_PROBE_ARGS:-}"

_ab_probe() {  # RATE OUT probe-args...
  local rate=$1 out=$2; shift 2
  "$PY" bench/latency_probe.py --bootstrap 127.0.0.1:19092 --rate "$rate" ${_AB_ARGS[@]+"${_AB_ARGS[@]}"} "$@" >/dev/null 2>"$out/last.err" \
    || { tail -5 "$out/last.err" >&2; exit 1; }
}

ab_run() {
  local rate=$1 out=$2 pairs=$3 prefix=$4; shift 4
  local was_running=0 pair cond json
  mkdir -p "$out"
  bash deploy/kafka/broker.sh status >/dev/null 2>&1 && was_running=1
  for pair in $(seq 1 "$pairs"); do
    for cond in "$@"; do
      bash deploy/kafka/broker.sh stop >/dev/null 2>&1 || true
      start_broker_as "$cond" >/dev/null
      sleep 10  # a broker that has just opened its port may not yet serve new topics' metadata
      _ab_probe "$rate" "$out" --seconds 25
      json="$out/${prefix}${cond}-run${pair}.json"
      _ab_probe "$rate" "$out" --seconds "$AB_SECONDS" --out "$json"
      report "$json" "$cond"
    done
  done
  bash deploy/kafka/broker.sh stop >/dev/null 2>&1 || true
  if [ "$was_running" = 1 ]; then bash deploy/kafka/broker.sh start >/dev/null; fi
}
