"""The pipeline without Kafka: pre-encoded JSON messages -> Decoder -> DetectorCore -> scorer.

Measures what the service loop does per batch minus the broker: decode on the main thread,
`DetectorCore.process` on one worker thread (overlapped with decoding the next batch, as in
service.py), and reports ingest events/s, scored windows/s and CPU seconds per 1,000 events by
stage (decode / window update / inference / threshold+alerts). With `--provider cuda` it also
compares device-resident windows (`--device-windows on`) with host-gathered ones (`off`).

Needs only numpy, orjson, onnxruntime and this repository (no confluent-kafka, no pydantic), so
`bench/gpu_check.sh` runs it on a bare GPU host. Prints a table and writes JSON (`--out`).

    .venv/bin/python bench/inprocess.py --entities 1000 --ticks 80 --hops 1,16 --provider cpu
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from perfkit import REFERENCE_BUNDLE, StageClock, cpu_delta, input_settings, prepare_cuda, rss_bytes, simulated_messages, thread_cpu

from stream_detector.core.bundle import load_bundle
from stream_detector.ingest.decode import Decoder
from stream_detector.core.pipeline import DetectionSettings, DetectorCore
from stream_detector.core.scorer import Scorer


def run_inprocess(bundle_path: Path, messages: list[Any], features: list[str], *, hop: int, provider: str, max_batch: int,
                  device_windows: bool | None, threads: int | None = None, overlap: bool = True, repeat: int = 1) -> dict[str, Any]:
    bundle = load_bundle(bundle_path)
    decoder = Decoder(features, input_settings())
    scorer = Scorer(bundle, provider=provider, max_batch=max_batch, intra_op_threads=threads)
    core = DetectorCore(bundle, scorer, DetectionSettings(hop=hop, max_entities=1_000_000, idle_timeout_ms=None),
                        device_windows=device_windows)
    clock = StageClock()
    clock.wrap(decoder, "decode", "decode")
    clock.wrap(core, "process", "core")
    clock.wrap(core.bundle.normaliser, "apply", "window")
    clock.wrap(core.store, "ingest", "window")
    if core.device is not None:
        clock.wrap(core.device, "update", "window")
        clock.wrap(core.device, "score", "inference")
    else:
        clock.wrap(scorer, "score", "inference")

    batches = [messages[i : i + max_batch] for i in range(0, len(messages), max_batch)]
    # warm-up on a copy of the first batches' entities is not possible without changing state, so
    # warm the session on random windows instead (first-run allocations, CUDA kernels)
    import numpy as np

    scorer.score(np.zeros((min(max_batch, 64), bundle.window, bundle.n_features), np.float32))
    rss0 = rss_bytes()
    before = thread_cpu()
    t0, c0 = time.perf_counter(), time.process_time()
    scored = alerts = events = 0
    with ThreadPoolExecutor(1, thread_name_prefix="sd-inference") as pool:
        for _ in range(repeat):
            pending = None
            for msgs in batches:
                batch, dead = decoder.decode(msgs)
                if dead:
                    raise RuntimeError(f"unexpected dead letters: {dead[0].reason} {dead[0].detail}")
                if pending is not None:
                    r = pending.result()
                    scored += r.n_scored
                    alerts += len(r.alerts)
                fut = pool.submit(core.process, batch)
                if overlap:
                    pending = fut
                else:
                    r = fut.result()
                    scored += r.n_scored
                    alerts += len(r.alerts)
                    pending = None
                events += batch.n
            if pending is not None:
                r = pending.result()
                scored += r.n_scored
                alerts += len(r.alerts)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    per_thread = cpu_delta(before, thread_cpu())
    named = set().union(*clock.threads.values()) if clock.threads else set()
    pool_cpu = sum(c for tid, (_, c) in per_thread.items() if tid not in named)  # ONNX Runtime's own threads
    core_cpu = clock.cpu["core"]
    inference = clock.cpu["inference"] + pool_cpu
    thr_alerts = max(0.0, core_cpu - clock.cpu["window"] - clock.cpu["inference"])
    k = 1000.0 / events
    return {
        "hop": hop, "provider": scorer.provider, "device_windows": core.device is not None, "batch": max_batch,
        "events": events, "scored": scored, "alerts": alerts, "seconds": round(wall, 3),
        "ingest_events_per_s": round(events / wall), "scored_windows_per_s": round(scored / wall),
        "cpu_s_per_1000_events": {
            "decode": round(clock.cpu["decode"] * k, 5), "window_update": round(clock.cpu["window"] * k, 5),
            "inference": round(inference * k, 5), "threshold_alerts": round(thr_alerts * k, 5),
            "total_process": round(cpu * k, 5),
        },
        "ingest_us_per_event_excl_inference": round((clock.cpu["decode"] + clock.cpu["window"] + thr_alerts) / events * 1e6, 2),
        "rss_growth_mb": round((rss_bytes() - rss0) / 2**20, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=REFERENCE_BUNDLE)
    p.add_argument("--entities", type=int, default=1000)
    p.add_argument("--ticks", type=int, default=80, help="events per entity (hop 1 scores ticks - W + 1 per entity)")
    p.add_argument("--hops", default="1,16")
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--device-windows", default="auto", choices=["auto", "on", "off", "both"])
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: the scorer's)")
    p.add_argument("--repeat", type=int, default=1, help="run the messages through this many times (entities keep their state)")
    p.add_argument("--out", type=Path, help="write the JSON result here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    env = prepare_cuda() if args.provider in ("auto", "cuda") else {}

    bundle = load_bundle(args.bundle)
    t = time.perf_counter()
    messages, features = simulated_messages(args.entities, args.ticks, bundle.n_features)
    print(f"{len(messages)} messages ({args.entities} entities x {args.ticks}) encoded in {time.perf_counter() - t:.1f} s", flush=True)
    modes = {"auto": [None], "on": [True], "off": [False], "both": [False, True]}[args.device_windows]
    rows = []
    for hop in [int(h) for h in args.hops.split(",")]:
        for dw in modes:
            try:
                r = run_inprocess(args.bundle, messages, features, hop=hop, provider=args.provider, max_batch=args.max_batch,
                                  device_windows=dw, threads=args.threads, repeat=args.repeat)
            except Exception as e:  # a benchmark row that fails is reported, the others still run
                r = {"hop": hop, "device_windows": dw, "error": f"{type(e).__name__}: {e}"}
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\nmodel {bundle.model_version}: W={bundle.window}, F={bundle.n_features}; batch {args.max_batch}")
    print(f"{'hop':>4} {'dev.win':>7} {'provider':>22} {'ingest ev/s':>12} {'scored win/s':>13} {'decode':>7} {'window':>7} {'infer':>7} {'thr+al':>7}  (CPU ms per 1000 events)")
    for r in rows:
        if "error" in r:
            print(f"{r['hop']:>4} {str(r['device_windows']):>7} error: {r['error']}")
            continue
        c = r["cpu_s_per_1000_events"]
        print(f"{r['hop']:>4} {str(r['device_windows']):>7} {r['provider']:>22} {r['ingest_events_per_s']:>12} {r['scored_windows_per_s']:>13} "
              f"{c['decode'] * 1e3:>7.1f} {c['window_update'] * 1e3:>7.1f} {c['inference'] * 1e3:>7.1f} {c['threshold_alerts'] * 1e3:>7.1f}")
    result = {"bench": "inprocess", "env": env, "model": bundle.model_version, "window": bundle.window, "features": bundle.n_features,
              "entities": args.entities, "ticks": args.ticks, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
