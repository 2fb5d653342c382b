#!/usr/bin/env bash
# GPU host check for issue 6: is ONNX Runtime's CUDA provider really active, and how fast are
# the model and the pipeline on it? Writes every result into RESULT_DIR (JSON + logs).
#
#   PYTHONPATH=/path/to/unpacked/onnxruntime-gpu bash bench/gpu_check.sh RESULT_DIR [PYTHON]
#
# Needs only this repository plus numpy, orjson, onnx, onnxruntime-gpu (on PYTHONPATH) and, to
# load the CUDA libraries, torch; no Kafka broker, no Java, no network, no pip. PYTHON defaults
# to python3. Each step has its own time limit and a failing step does not stop the others;
# together they take about 5 minutes on an H200 (SD_GPU_CHECK_ENTITIES / SD_GPU_CHECK_TICKS size
# the pipeline step, default 4000 x 100):
#   1. env       : Python, torch + GPU, onnxruntime version/location, the provider a session really
#                  gets (import torch first so the CUDA libraries load)            -> env.json
#   2. ort       : standalone windows/s at batch 256/1024/16384 — host copies, IO binding with
#                  device-resident input, and the device-window score graph       -> ort.json
#   3. pipeline  : in-process pipeline (pre-encoded JSON -> decode -> DetectorCore -> scorer on
#                  CUDA) at hop 1, device windows off and on                       -> pipeline.json
#   4. tests     : the gpu-marked tests (CUDA scores = CPU scores, device windows = host windows)
#                                                                                   -> tests.log
# Summary of every step's status: RESULT_DIR/gpu_check.json.
set -u
OUT=${1:?usage: bash bench/gpu_check.sh RESULT_DIR [PYTHON]}
PY=${2:-python3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$REPO:$REPO/bench${PYTHONPATH:+:$PYTHONPATH}"
declare -A STATUS

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, remember the status
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    STATUS[$name]="rc=$rc seconds=$((SECONDS - t0))"
    tail -n 15 "$OUT/$name.log"
    echo "== $name: ${STATUS[$name]}"
}

step env 120 "$PY" - "$OUT/env.json" <<'EOF'
import json, sys
from perfkit import prepare_cuda
info = prepare_cuda()
try:
    from stream_detector.core.bundle import load_bundle
    from stream_detector.core.scorer import Scorer
    from perfkit import REFERENCE_BUNDLE
    s = Scorer(load_bundle(REFERENCE_BUNDLE), provider="cuda")
    info["session_providers"] = s.session.get_providers()
    info["cuda_active"] = s.on_cuda
except Exception as e:
    info["session_error"] = f"{type(e).__name__}: {e}"
    info["cuda_active"] = False
try:
    import msgspec
    info["msgspec"] = msgspec.__version__
except ImportError:
    info["msgspec"] = None  # decode.py then uses orjson alone
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
print("CUDA provider ACTIVE" if info["cuda_active"] else "CUDA provider NOT active: the figures below are CPU figures")
EOF

step ort 150 "$PY" bench/gpu_ort.py --out "$OUT/ort.json" --batches 256,1024,16384 --seconds 3

step pipeline 240 "$PY" bench/inprocess.py --provider cuda --device-windows both --hops 1 \
    --entities "${SD_GPU_CHECK_ENTITIES:-4000}" --ticks "${SD_GPU_CHECK_TICKS:-100}" --max-batch 4096 --out "$OUT/pipeline.json"

step tests 150 "$PY" -c "import sys; import perfkit; perfkit.prepare_cuda(); import pytest; \
sys.exit(pytest.main(['-m', 'gpu', '-q', '-rA', '-p', 'no:cacheprovider', 'tests/test_scorer.py', 'tests/test_device_windows.py']))"

{
    echo "{"
    first=1
    for k in env ort pipeline tests; do
        [ $first -eq 1 ] || echo ","
        first=0
        printf '  "%s": "%s"' "$k" "${STATUS[$k]:-not run}"
    done
    echo ""
    echo "}"
} >"$OUT/gpu_check.json"
echo "== summary ($OUT/gpu_check.json)"
cat "$OUT/gpu_check.json"
