"""Where the end-to-end latency of an alert goes: one latency run of bench/e2e.py (a producer at a
fixed rate, every event stamped with its produce time, every scored event alerting) with the
service's loop instrumented. For every alert, its latency inside the service is split into:

- *to decode*: event produced -> its batch decoded (broker, fetch, prefetch queue, batch forming);
- *queued*: decoded -> submitted to the inference thread (waiting for the previous batch);
- *process + deliver*: submitted -> its alert produced (windows, inference, thresholds, then the
  loop noticing the end and producing);

and the slowest 1% of alerts are compared with all of them, next to the loop's Python garbage
collection pauses, the sliced checkpoints in progress and the synchronous offset commits. In the
JSON (--out), `timeline` has the same per 250 ms of wall time from `timeline_start_utc`: a stall
outside the service (every alert late at once, then a queue that drains) shows there as a step, to
line up with the broker's log. CPU is sampled every 100 ms (`cpu_cores_mean`, and per 250 ms in
the timeline): cores busy on the whole machine, in this process (the service; the sampler's own
reads included) and in the broker's JVM; the rest is the load generator and alert reader (a
process of their own) and anything else on the machine. The end-to-end figure (alert read back
from the broker) comes from the same run.

    .venv/bin/python bench/latency_probe.py --rate 30000 --seconds 30 --out /tmp/probe.json

    # the service code of another commit under the same harness and load:
    git worktree add /tmp/sd-old COMMIT
    .venv/bin/python bench/latency_probe.py --code /tmp/sd-old --rate 30000 --seconds 30

It patches private methods of `Detector` (a measuring tool, not an interface); prints a table and
writes JSON; it does not pass or fail.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
e2e: Any = None  # bench/e2e.py and the service module, imported in main() once --code is on sys.path
service: Any = None

_T: dict[int, float] = {}  # id(work) -> wall time (ms) when its batch was decoded
_ROWS: list[tuple[float, float, float, float]] = []  # per alert: (to decode, queued, process + deliver, wall ms)
_GC: list[tuple[int, float, float]] = []  # (generation, pause ms, wall ms at its end)
_CHECKPOINTS: list[float] = []  # wall ms when a sliced checkpoint began
_gc_start = [0.0]
_COMMITS: list[tuple[float, float]] = []  # (synchronous offset commit ms, wall ms at its end)
_CPU: list[tuple[float, float, float, float]] = []  # per 100 ms: (wall ms at its end, cores busy: machine, this process, broker)


def _broker_pid() -> int | None:
    """The local Kafka broker's JVM (deploy/kafka/broker.sh), if it runs on this machine."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if b"kafka.Kafka" in (d / "cmdline").read_bytes():
                    return int(d.name)
            except OSError:
                continue
    return None


def _sample_cpu(stop: Any, every_s: float = 0.1) -> None:
    """Cores busy per `every_s` on the whole machine, in this process (the service, in-process) and
    in the broker; the rest is the load generator, the alert reader and anything else."""
    import os

    from perfkit import CLOCK_TICKS, stat_cpu_s

    broker = _broker_pid()

    def machine() -> float:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
        return (sum(v) - v[3] - v[4]) / CLOCK_TICKS  # all but idle and iowait, CPU seconds

    def proc(pid: int | None) -> float:
        try:
            return stat_cpu_s(Path(f"/proc/{pid}/stat")) if pid is not None else 0.0
        except OSError:
            return 0.0

    me = os.getpid()
    last = (time.monotonic(), machine(), proc(me), proc(broker))
    while not stop.wait(every_s):
        now = (time.monotonic(), machine(), proc(me), proc(broker))
        dt = now[0] - last[0]
        _CPU.append((time.time() * 1000.0, (now[1] - last[1]) / dt, (now[2] - last[2]) / dt, (now[3] - last[3]) / dt))
        last = now


def _instrument() -> None:
    from stream_detector.service import batches, checkpoint, kafka_io

    decode, deliver, write_slice = service.Detector._decode, service.Detector._deliver, checkpoint.Checkpointer.write_slice

    def timed_decode(self: Any, msgs: list[Any]) -> Any:
        work = decode(self, msgs)
        _T[id(work)] = time.time() * 1000.0
        return work

    def timed_deliver(self: Any, work: Any, result: Any) -> Any:
        decoded = _T.pop(id(work), None)
        if decoded is not None and result is not None and result.alerts:
            now = time.time() * 1000.0
            submitted = now - (time.monotonic() - work.started) * 1000.0  # wall time of the submit
            for a in result.alerts:
                event_ms = batches.iso_to_ms(a.get("event_time"))
                if event_ms is not None:
                    _ROWS.append((decoded - event_ms, submitted - decoded, now - submitted, now))
        return deliver(self, work, result)

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

    commit = kafka_io.KafkaSource.commit

    def timed_commit(self: Any, *a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return commit(self, *a, **kw)
        finally:
            _COMMITS.append(((time.perf_counter() - t) * 1000.0, time.time() * 1000.0))

    kafka_io.KafkaSource.commit = timed_commit  # type: ignore[method-assign]
    service.Detector._decode = timed_decode  # type: ignore[method-assign]
    service.Detector._deliver = timed_deliver  # type: ignore[method-assign]
    checkpoint.Checkpointer.write_slice = timed_write_slice  # type: ignore[method-assign]
    gc.callbacks.append(on_gc)


def timeline(rows: np.ndarray, total: np.ndarray, gcs: np.ndarray, step_ms: float = 250.0) -> list[dict[str, Any]]:
    """Per `step_ms` of wall time (from the first counted alert): alerts produced, their median and
    largest latency inside the service and largest wait before decode, the loop's GC pause time and
    whether a checkpoint began, to tell a stall (everything late at once) from a queue that builds."""
    t0 = rows[0, 3]
    slot = ((rows[:, 3] - t0) // step_ms).astype(int)
    out = []
    for i in range(int(slot.max()) + 1):
        sel = slot == i
        lo, hi = t0 + i * step_ms, t0 + (i + 1) * step_ms
        g = gcs[(gcs[:, 2] >= lo) & (gcs[:, 2] < hi)] if gcs.size else gcs
        c = [x for x in _CPU if lo <= x[0] < hi]
        cpu = {"cores_busy": round(float(np.mean([x[1] for x in c])), 2), "service_cores": round(float(np.mean([x[2] for x in c])), 2),
               "broker_cores": round(float(np.mean([x[3] for x in c])), 2)} if c else {}
        out.append({"t_ms": int(i * step_ms), "alerts": int(sel.sum()), **cpu,
                    "p50_ms": round(float(np.median(total[sel])), 1) if sel.any() else None,
                    "max_ms": round(float(total[sel].max()), 1) if sel.any() else None,
                    "max_to_decode_ms": round(float(rows[sel, 0].max()), 1) if sel.any() else None,
                    "gc_pause_ms": round(float(g[:, 1].sum()), 1) if g.size else 0.0,
                    "checkpoint_begun": any(lo <= c < hi for c in _CHECKPOINTS),
                    "offset_commit_ms": round(sum(c[0] for c in _COMMITS if lo <= c[1] < hi), 1)})
    return out


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

    def since_checkpoint(wall: np.ndarray) -> np.ndarray:
        """ms since the latest checkpoint began (inf before the first)."""
        if not _CHECKPOINTS:
            return np.full(wall.shape, np.inf)
        begins = np.array(_CHECKPOINTS)
        idx = np.searchsorted(begins, wall) - 1
        return np.where(idx >= 0, wall - begins[np.maximum(idx, 0)], np.inf)

    def near_checkpoint(wall: np.ndarray) -> float:
        return round(float((since_checkpoint(wall) <= window_ms).mean()), 3)

    slow_since = since_checkpoint(rows[slow, 3])
    slow_since = slow_since[np.isfinite(slow_since)]

    gcs = np.array(_GC) if _GC else np.zeros((0, 3))
    t0, t1 = rows[0, 3], rows[-1, 3]
    during = gcs[(gcs[:, 2] >= t0) & (gcs[:, 2] <= t1)] if gcs.size else gcs
    cpu = np.array([x for x in _CPU if t0 <= x[0] <= t1]) if _CPU else np.zeros((0, 4))
    busy = {} if not cpu.size else {
        "machine": round(float(cpu[:, 1].mean()), 2), "service": round(float(cpu[:, 2].mean()), 2),
        "broker": round(float(cpu[:, 3].mean()), 2), "rest (load generator, alert reader, other)": round(float((cpu[:, 1] - cpu[:, 2] - cpu[:, 3]).mean()), 2),
        "share_of_100ms_with_machine_above_1.9_cores": round(float((cpu[:, 1] > 1.9).mean()), 3)}
    return {
        "end_to_end": end_to_end,
        "alerts": int(rows.shape[0]),
        "service_ms": {f"p{q}": round(float(np.percentile(total, q)), 1) for q in (50, 95, 99)},
        "all_alerts": stats(np.ones(len(rows), dtype=bool)),
        "slowest_1pct": stats(slow),
        "share_within_ms_after_checkpoint_begin": {"window_ms": window_ms, "all": near_checkpoint(rows[:, 3]),
                                                   "slowest_1pct": near_checkpoint(rows[slow, 3])},
        "slowest_1pct_ms_since_checkpoint_begin": {f"p{q}": round(float(np.percentile(slow_since, q)), 1) for q in (10, 50, 90)}
        if slow_since.size else {},
        "checkpoints_begun": len(_CHECKPOINTS),
        "cpu_cores_mean": busy,
        "timeline_start_utc": datetime.fromtimestamp(rows[0, 3] / 1000.0, timezone.utc).isoformat(timespec="milliseconds"),
        "timeline": timeline(rows, total, gcs),
        "offset_commits_ms": {"count": len(_COMMITS), "max": round(max(c[0] for c in _COMMITS), 1) if _COMMITS else None,
                              "each": [round(c[0], 1) for c in _COMMITS]},
        "gc": {"collections": int(during.shape[0]), "gen2": int((during[:, 0] == 2).sum()) if during.size else 0,
               "max_pause_ms": round(float(during[:, 1].max()), 1) if during.size else 0.0,
               "total_pause_ms": round(float(during[:, 1].sum()), 1) if during.size else 0.0},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: start the local broker)")
    p.add_argument("--bundle", type=Path, default=REPO / "bench" / "reference_bundle")
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
    p.add_argument("--code", type=Path, help="a checkout (e.g. a git worktree of another commit) whose stream_detector "
                   "package is measured instead of this one's; the harness stays this one's")
    p.add_argument("--settings", default="{}", help="JSON overrides by section, e.g. '{\"runtime\": {\"commit_interval_s\": 30}}'")
    p.add_argument("--gc-freeze-after-s", type=float, help="experiment: gc.freeze() this many seconds into the run")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    global e2e, service
    if args.code:
        sys.path.append(str(REPO))  # perfkit puts the repository first unless it is on the path already
        sys.path.insert(0, str(args.code.resolve()))
    import e2e as bench_e2e
    from stream_detector.service import loop as service_module

    e2e, service = bench_e2e, service_module
    print(f"measuring {Path(service.__file__).resolve().parent}", file=sys.stderr)
    e2e.PROVIDER, e2e.MAX_WAIT_MS = args.provider, args.max_wait_ms
    overrides = json.loads(args.settings)
    if overrides:
        settings_for = e2e.service_settings
        e2e.service_settings = lambda *a, **sections: settings_for(
            *a, **{**sections, **{k: {**sections.get(k, {}), **v} for k, v in overrides.items()}})
    _instrument()
    if args.gc_freeze_after_s is not None:
        threading.Timer(args.gc_freeze_after_s, gc.freeze).start()
    bootstrap = args.bootstrap or e2e.start_broker()
    work = Path(tempfile.mkdtemp(prefix="sd-probe-"))
    stop_sampling = threading.Event()
    threading.Thread(target=_sample_cpu, args=(stop_sampling,), name="probe-cpu", daemon=True).start()
    try:
        lat = e2e.measure_latency(bootstrap, f"{uuid.uuid4().hex[:6]}probe", e2e.latency_bundle(args.bundle, work), args.entities, args.rate,
                                  args.seconds, args.max_batch, args.hop, args.partitions, work)
    finally:
        stop_sampling.set()
    lat.pop("profile", None)
    result = {"command": " ".join(sys.argv), "code": str(Path(service.__file__).resolve().parent.parent), "rate": args.rate, "entities": args.entities, "hop": args.hop,
              "max_wait_ms": args.max_wait_ms, **summarise(lat, args.checkpoint_window_ms)}
    print(json.dumps({k: v for k, v in result.items() if k != "timeline"}, indent=1))  # the timeline is in --out
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
