"""Where the end-to-end latency of an alert goes: one latency run of bench/e2e.py (a producer at a
fixed rate, every event stamped with its produce time, every scored event alerting) with the
service's loop instrumented. For every alert, its latency inside the service is split into:

- *to decode*: event produced -> its batch decoded (broker, fetch, prefetch queue, batch forming);
- *queued*: decoded -> submitted to the inference thread (waiting for the previous batch);
- *process + deliver*: submitted -> its alert produced (windows, inference, thresholds, then the
  loop noticing the end and producing);

and the slowest 1% of alerts are compared with all of them, next to the loop's Python garbage
collection pauses and the sliced checkpoints in progress. The end-to-end figure (alert read back
from the broker) comes from the same run.

    .venv/bin/python bench/latency_probe.py --rate 30000 --seconds 30 --out /tmp/probe.json

It patches private methods of `Detector` (a measuring tool, not an interface); prints a table and
writes JSON; it does not pass or fail.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

import e2e
from perfkit import REFERENCE_BUNDLE, start_broker

from stream_detector import service

_T: dict[int, float] = {}  # id(work) -> wall time (ms) when its batch was decoded
_ROWS: list[tuple[float, float, float, float]] = []  # per alert: (to decode, queued, process + deliver, wall ms)
_GC: list[tuple[int, float, float]] = []  # (generation, pause ms, wall ms at its end)
_CHECKPOINTS: list[float] = []  # wall ms when a sliced checkpoint began
_gc_start = [0.0]


def _instrument() -> None:
    decode, deliver, write_slice = service.Detector._decode, service.Detector._deliver, getattr(service.Detector, "_write_slice", None)

    def timed_decode(self: Any, msgs: list[Any]) -> Any:
        work = decode(self, msgs)
        _T[id(work)] = time.time() * 1000.0
        return work

    def timed_deliver(self: Any, work: Any, result: Any, exclude: Any = None) -> Any:
        decoded = _T.pop(id(work), None)
        if decoded is not None and result is not None and result.alerts:
            now = time.time() * 1000.0
            submitted = now - (time.monotonic() - work.started) * 1000.0  # wall time of the submit
            for a in result.alerts:
                event_ms = service._iso_to_ms(a.get("event_time"))
                if event_ms is not None:
                    _ROWS.append((decoded - event_ms, submitted - decoded, now - submitted, now))
        return deliver(self, work, result, exclude)

    def timed_write_slice(self: Any) -> Any:
        ck = self._sliced
        if ck is not None and ck.seq < 0:
            _CHECKPOINTS.append(time.time() * 1000.0)
        return write_slice(self)

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            _gc_start[0] = time.perf_counter()
        else:
            _GC.append((info["generation"], (time.perf_counter() - _gc_start[0]) * 1000.0, time.time() * 1000.0))

    service.Detector._decode = timed_decode  # type: ignore[method-assign]
    service.Detector._deliver = timed_deliver  # type: ignore[method-assign]
    if write_slice is not None:
        service.Detector._write_slice = timed_write_slice  # type: ignore[method-assign]
    gc.callbacks.append(on_gc)


def summarise(end_to_end: dict[str, Any], window_ms: float) -> dict[str, Any]:
    rows = np.array(_ROWS[len(_ROWS) // 10 :])  # the first 10%: windows filling, group settling
    if rows.size == 0:
        return {"end_to_end": end_to_end, "alerts": 0}
    total = rows[:, :3].sum(axis=1)
    slow = total >= np.percentile(total, 99)
    parts = ("to_decode_ms", "queued_ms", "process_and_deliver_ms")

    def stats(sel: np.ndarray) -> dict[str, Any]:
        return {name: {"p50": round(float(np.percentile(rows[sel, i], 50)), 1), "mean": round(float(rows[sel, i].mean()), 1)}
                for i, name in enumerate(parts)}

    def near_checkpoint(wall: np.ndarray) -> float:
        if not _CHECKPOINTS:
            return 0.0
        begins = np.array(_CHECKPOINTS)
        idx = np.searchsorted(begins, wall) - 1
        since = np.where(idx >= 0, wall - begins[np.maximum(idx, 0)], np.inf)
        return round(float((since <= window_ms).mean()), 3)

    gcs = np.array(_GC) if _GC else np.zeros((0, 3))
    t0, t1 = rows[0, 3], rows[-1, 3]
    during = gcs[(gcs[:, 2] >= t0) & (gcs[:, 2] <= t1)] if gcs.size else gcs
    return {
        "end_to_end": end_to_end,
        "alerts": int(rows.shape[0]),
        "service_ms": {f"p{q}": round(float(np.percentile(total, q)), 1) for q in (50, 95, 99)},
        "all_alerts": stats(np.ones(len(rows), dtype=bool)),
        "slowest_1pct": stats(slow),
        "share_within_ms_after_checkpoint_begin": {"window_ms": window_ms, "all": near_checkpoint(rows[:, 3]),
                                                   "slowest_1pct": near_checkpoint(rows[slow, 3])},
        "checkpoints_begun": len(_CHECKPOINTS),
        "gc": {"collections": int(during.shape[0]), "gen2": int((during[:, 0] == 2).sum()) if during.size else 0,
               "max_pause_ms": round(float(during[:, 1].max()), 1) if during.size else 0.0,
               "total_pause_ms": round(float(during[:, 1].sum()), 1) if during.size else 0.0},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: start the local broker)")
    p.add_argument("--bundle", type=Path, default=REFERENCE_BUNDLE)
    p.add_argument("--rate", type=float, required=True, help="offered events/s")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--entities", type=int, default=1000)
    p.add_argument("--hop", type=int, default=16)
    p.add_argument("--max-wait-ms", type=int, default=20)
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--provider", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--checkpoint-window-ms", type=float, default=500.0,
                   help="an alert counts as near a checkpoint when produced this soon after one began")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    e2e.PROVIDER, e2e.MAX_WAIT_MS = args.provider, args.max_wait_ms
    _instrument()
    bootstrap = args.bootstrap or start_broker()
    work = Path(tempfile.mkdtemp(prefix="sd-probe-"))
    lat = e2e.measure_latency(bootstrap, f"{uuid.uuid4().hex[:6]}probe", e2e.latency_bundle(args.bundle, work), args.entities, args.rate,
                              args.seconds, args.max_batch, args.hop, args.partitions, work)
    lat.pop("profile", None)
    result = {"command": " ".join(sys.argv), "rate": args.rate, "entities": args.entities, "hop": args.hop,
              "max_wait_ms": args.max_wait_ms, **summarise(lat, args.checkpoint_window_ms)}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
