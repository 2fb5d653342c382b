"""Standalone ONNX Runtime windows/s on CUDA for the reference model, three ways, per batch size:

- `host`: `session.run` with a host array in and the reconstruction back on the host (what a
  scorer fed host-gathered windows does);
- `iobinding_device`: input already on the GPU (an `OrtValue` bound with IO binding), output left
  on the GPU: the model alone, DESIGN.md's "inputs already on the GPU" figure;
- `device_windows`: the service's GPU path (stream_detector/core/device_windows.py): windows gathered
  on the GPU from the device ring by slot and position, the model, the scoring rule in the
  graph; only the slot/position indices go in and scores + per-feature errors come back.

Needs numpy, onnxruntime(-gpu), onnx and this repository; imports torch first when it is there so
that the CUDA libraries onnxruntime-gpu links against are loaded. Prints a table, writes JSON.

    python bench/gpu_ort.py --out /tmp/gpu/ort.json [--batches 256,1024,16384] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from perfkit import REFERENCE_BUNDLE, prepare_cuda

import numpy as np


def timed(fn: Any, batch: int, seconds: float, sync: Any = None) -> float:
    fn()  # warm-up (allocations, kernel selection)
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += batch
    if sync is not None:
        sync()
    return n / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=REFERENCE_BUNDLE)
    p.add_argument("--batches", default="256,1024,16384")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--provider", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    info = prepare_cuda() if args.provider == "cuda" else {}

    import onnxruntime as ort

    from stream_detector.core.bundle import load_bundle
    from stream_detector.core.device_windows import DeviceWindows
    from stream_detector.core.scorer import Scorer
    from stream_detector.core.windows import WindowStore

    bundle = load_bundle(args.bundle)
    w, f = bundle.window, bundle.n_features
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {"bench": "gpu_ort", "model": bundle.model_version, "window": w, "features": f, "env": info, "rows": rows}
    for batch in [int(b) for b in args.batches.split(",")]:
        row: dict[str, Any] = {"batch": batch}
        scorer = Scorer(bundle, provider=args.provider, max_batch=batch)
        row["provider"] = scorer.provider
        sess = scorer.session
        x = np.random.default_rng(0).normal(size=(batch, w, f)).astype(np.float32)
        try:
            row["host_windows_per_s"] = round(timed(lambda: sess.run(["reconstruction"], {"x": x}), batch, args.seconds))
        except Exception as e:  # one failing mode does not stop the others
            row["host_error"] = str(e).splitlines()[0]
        try:
            dev = "cuda" if scorer.on_cuda else "cpu"
            xv = ort.OrtValue.ortvalue_from_numpy(x, dev, 0)
            io = sess.io_binding()
            io.bind_ortvalue_input("x", xv)
            io.bind_output("reconstruction", dev)

            def bound() -> None:
                sess.run_with_iobinding(io)

            row["iobinding_device_windows_per_s"] = round(timed(bound, batch, args.seconds, sync=getattr(io, "synchronize_outputs", None)))
        except Exception as e:
            row["iobinding_error"] = str(e).splitlines()[0]
        try:
            entities = max(batch, 4096)
            store = WindowStore(w, f, max_entities=entities, initial_capacity=entities)
            rng = np.random.default_rng(1)
            keys = [f"e{i}" for i in range(entities)]
            for _ in range(w):  # fill every window on the host, then mirror it once
                store.ingest(np.zeros(entities, np.int64), keys, rng.normal(size=(entities, f)).astype(np.float32))
            dw = DeviceWindows(bundle, scorer)
            dw.before_ingest(store)
            slots = np.arange(batch, dtype=np.int64)
            ends = (store.counts_of(slots) - 1) % dw.ring_rows
            row["device_windows_in_place"] = dw.in_place
            row["device_windows_windows_per_s"] = round(timed(lambda: dw.score(slots, ends), batch, args.seconds))
            new_rows = rng.normal(size=(batch, f)).astype(np.float32)
            positions = ends.copy()
            row["device_ring_update_rows_per_s"] = round(timed(lambda: dw.update(slots, positions, new_rows), batch, args.seconds))
        except Exception as e:
            row["device_windows_error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'batch':>6} {'provider':>22} {'host win/s':>11} {'iobind win/s':>13} {'dev.windows win/s':>18} {'ring rows/s':>12}")
    for r in rows:
        print(f"{r['batch']:>6} {r['provider']:>22} {r.get('host_windows_per_s', '-')!s:>11} {r.get('iobinding_device_windows_per_s', '-')!s:>13} "
              f"{r.get('device_windows_windows_per_s', '-')!s:>18} {r.get('device_ring_update_rows_per_s', '-')!s:>12}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
