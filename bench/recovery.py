"""Recovery time of a group member under load, with and without static membership, in one run (issue 22).

    .venv/bin/python bench/recovery.py [--guarantee exactly_once] [--session-timeout-s 45] [--rate 1000]
                                       [--json FILE] [--write docs/reliability.md] [--only NAME,...]
    .venv/bin/python bench/recovery.py --from FILE.json --write docs/reliability.md   # render rows of an earlier run

`stream-detector run` processes (tests/faults.py `Service`) against the real broker (`--bootstrap`,
default the local one of deploy/kafka/broker.sh), a simulated fleet (100 entities, 8 sensors, spikes
and level shifts) streamed live at `--rate` events/s into a fresh 6-partition topic per scenario,
the test bundle factory's "mean" model (window 8), commits every 0.5 s, librdkafka's default
`session.timeout.ms` (45 s) unless `--session-timeout-s` says otherwise. Scenarios, each once with
dynamic membership (`processing.static_membership = off`: before) and once static (`auto` with an
instance id: after):

- `kill9-restart`: one member, kill -9 at ~10 s of progress, restarted at once (as systemd's
  `Restart=` would, without its RestartSec);
- `sigterm-restart`: the same with SIGTERM, restarted once the process has exited;
- `kill9-takeover`: two members, one killed and never restarted: when does the other take over;
- `sigterm-takeover`: the same with SIGTERM (a scale-in without anything else);
- `sigterm-leave` (static only): SIGTERM, then `stream-detector leave-group` with the member's settings.

Times: for a restart from the new process's start, for a takeover from the signal, to
- `assigned`: the member logs an assignment (restart) or one of the departed member's partitions
  (takeover);
- `scored`: the first window scored by the new process (`stream_detector_windows_scored_total` on its
  metrics port; restart only);
- `alert`: the first alert event a reader of the alerts topic sees after the fault
  (`read_committed` in exactly_once mode; restart only);
- `progress`: the first commit that moves a departed member's partition (takeover only).
Prints a table (and writes it between the markers of `--write`); it does not pass or fail.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402
from faults import Env, Service, create_topics, delete_topics, free_port, stream_bundle  # noqa: E402

from stream_detector.offline.simulate import SimConfig, Simulator  # noqa: E402

START, END = "<!-- recovery-table:start -->", "<!-- recovery-table:end -->"
P = 6
SCENARIOS = ("kill9-restart", "sigterm-restart", "kill9-takeover", "sigterm-takeover", "sigterm-leave")
WARM_EVENTS = 10_000  # committed before the fault: the changelog holds state, the member is in its stride


class Feed:
    """The simulated events, produced at a fixed rate into `topic` by a thread until `stop()`."""

    def __init__(self, bootstrap: str, topic: str, items: list[tuple[bytes, bytes]], rate: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(bootstrap, topic, items, rate), daemon=True)
        self._thread.start()

    def _run(self, bootstrap: str, topic: str, items: list[tuple[bytes, bytes]], rate: float) -> None:
        p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5, "log_level": 2})
        t0 = time.monotonic()
        for n, (k, v) in enumerate(items, 1):
            if self._stop.is_set():
                break
            while True:
                try:
                    p.produce(topic, key=k, value=v)
                    break
                except BufferError:
                    p.poll(0.05)
            if n % 100 == 0:
                p.poll(0)
                ahead = n / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        p.flush(30)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def metric(port: int, name: str) -> float:
    """Sum of a metric's samples on a member's metrics port (0 while it is not up yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def partitions_held(log: str, topic: str) -> set[int]:
    """The partitions a member holds, from its log's assigned/revoked/lost lines (kafka_io.py)."""
    held: set[int] = set()
    for m in re.finditer(r"(assigned|revoked|lost) ([^\n]*)", log):
        ps = {int(x) for x in re.findall(rf"{re.escape(topic)}\[(\d+)\]", m.group(2))}
        held = held | ps if m.group(1) == "assigned" else held - ps
    return held


class Committed:
    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self._c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "isolation.level": "read_uncommitted"})
        self._topic = topic

    def __call__(self, partitions: range | set[int] = range(P)) -> dict[int, int]:
        got = self._c.committed([TopicPartition(self._topic, p) for p in sorted(partitions)], timeout=30)
        return {tp.partition: tp.offset for tp in got}

    def close(self) -> None:
        self._c.close()


class AlertReader:
    """The first alert event a reader sees after `start()` (read_committed in exactly_once mode)."""

    def __init__(self, bootstrap: str, topic: str, read_committed: bool) -> None:
        self._c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
                            "isolation.level": "read_committed" if read_committed else "read_uncommitted"})
        self._topic = topic

    def start(self) -> None:
        """From the end of the topic now: records of a killed member's open transaction lie below it."""
        _, high = self._c.get_watermark_offsets(TopicPartition(self._topic, 0), timeout=10, cached=False)
        self._c.assign([TopicPartition(self._topic, 0, high)])

    def seen(self) -> bool:
        return any(m.error() is None for m in self._c.consume(100, timeout=0))

    def close(self) -> None:
        self._c.close()


def wait_for(conds: dict[str, Any], t0: float, timeout: float, alive: list[Service]) -> dict[str, float | None]:
    """Poll every condition until all are met (or `timeout`); seconds from t0 at which each was first met."""
    got: dict[str, float | None] = {k: None for k in conds}
    while time.monotonic() - t0 < timeout and any(v is None for v in got.values()):
        for k, cond in conds.items():
            if got[k] is None and cond():
                got[k] = time.monotonic() - t0
        for s in alive:
            if not s.alive():
                raise RuntimeError(f"{s.log_path.name} exited ({s.proc.returncode}): {s.log()[-2000:]}")
        time.sleep(0.05)
    return got


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.a, self.tmp = args, tmp
        sim = Simulator(SimConfig(entities=100, features=8, anomaly_rate=2.5, warmup=120, seed=22), args.ticks)
        self.items = [(k.encode(), v) for k, _, v in sim.events()]
        self.bundle = stream_bundle(tmp, sim.features).path
        self.exactly_once = args.guarantee == "exactly_once"

    def member(self, env: Env, topic: str, name: str, static: bool, tag: str) -> tuple[Service, int]:
        port = free_port()
        extra = ["--runtime.metrics-port", str(port), "--processing.static-membership", "auto" if static else "off",
                 "--kafka.consumer", f"session.timeout.ms={int(self.a.session_timeout_s * 1000)}",
                 "--kafka.consumer", "heartbeat.interval.ms=3000"]
        svc = Service(env.args(topic, self.bundle, self.a.guarantee, name, extra=extra), self.tmp / f"{tag}-{name}.log")
        return svc, port

    def scenario(self, name: str, static: bool) -> dict[str, Any]:
        bs = self.a.bootstrap
        topic = f"rec-{uuid.uuid4().hex[:10]}"
        create_topics(bs, {topic: (P, {})})
        env = Env(bs)
        feed = Feed(bs, topic, self.items, self.a.rate)
        committed = Committed(bs, env.group, topic)
        procs: list[Service] = []
        tag = f"{name}-{'static' if static else 'dynamic'}"
        row: dict[str, Any] = {"scenario": name, "membership": "static" if static else "dynamic"}
        try:
            m0, port0 = self.member(env, topic, "m0", static, tag)
            procs.append(m0)
            takeover = name.endswith(("takeover", "leave"))
            if takeover:
                m1, _ = self.member(env, topic, "m1", static, tag)
                procs.append(m1)
            progress = lambda: sum(max(o, 0) for o in committed().values())  # noqa: E731
            wait_for({"warm": lambda: progress() >= WARM_EVENTS}, time.monotonic(), 180, procs)
            if takeover:
                wait_for({"split": lambda: len(partitions_held(m0.log(), topic)) == P // 2}, time.monotonic(), 60, procs)
                row.update(self._takeover(name, env, topic, m0, m1, committed))
            else:
                row.update(self._restart(name, env, topic, m0, static, tag, procs))
        finally:
            feed.stop()
            for s in procs:
                s.ensure_dead()
            committed.close()
            env.drop()
            delete_topics(bs, [topic])
        print(f"[recovery] {orjson.dumps(row).decode()}", flush=True)
        return row

    def _restart(self, name: str, env: Env, topic: str, m0: Service, static: bool, tag: str, procs: list[Service]) -> dict[str, Any]:
        reader = AlertReader(self.a.bootstrap, env.alerts, self.exactly_once)
        try:
            if name == "kill9-restart":
                m0.kill9()
                stop_s = None
            else:
                stop_s = m0.sigterm()
            reader.start()
            again, port = self.member(env, topic, "m0", static, f"{tag}-again")
            procs.append(again)
            t0 = time.monotonic()
            got = wait_for({
                "assigned": lambda: re.search(rf"assigned {re.escape(topic)}\[", again.log()) is not None,
                "scored": lambda: metric(port, "stream_detector_windows_scored_total") > 0,
                "alert": reader.seen,
            }, t0, self.a.session_timeout_s + 90, [again])
        finally:
            reader.close()
        return {**got, "stop_s": stop_s}

    def _takeover(self, name: str, env: Env, topic: str, m0: Service, m1: Service, committed: Committed) -> dict[str, Any]:
        theirs = partitions_held(m0.log(), topic)
        t0 = time.monotonic()
        if name == "kill9-takeover":
            m0.kill9()
        else:
            m0.sigterm()
        at_stop = committed(theirs)
        stop_s = time.monotonic() - t0
        if name == "sigterm-leave":
            r = subprocess.run([sys.executable, "-m", "stream_detector.cli", "leave-group",
                                *env.args(topic, self.bundle, self.a.guarantee, "m0", extra=["--processing.static-membership", "auto"])],
                               capture_output=True, text=True, timeout=120, cwd=REPO)
            if r.returncode != 0:
                raise RuntimeError(f"leave-group failed: {r.stderr[-2000:]}")
        got = wait_for({
            "assigned": lambda: theirs <= partitions_held(m1.log(), topic),
            "progress": lambda: any(o > at_stop[p] for p, o in committed(theirs).items()),
        }, t0, self.a.session_timeout_s + self.a.transaction_timeout_s + 60, [m1])
        return {**got, "stop_s": round(stop_s, 2)}


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


LABELS = {
    "kill9-restart": "kill -9, restart at once",
    "sigterm-restart": "SIGTERM, restart at once",
    "kill9-takeover": "kill -9, never back: the other member takes over",
    "sigterm-takeover": "SIGTERM, never back: the other member takes over",
    "sigterm-leave": "SIGTERM + `leave-group`: the other member takes over",
}


def table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = (f"{meta['guarantee']}, session.timeout.ms {meta['session_timeout_s']:g} s, "
            f"transaction timeout {meta['transaction_timeout_s']:g} s, {meta['rate']:,.0f} events/s live, 6 partitions; "
            "seconds from the restart (restart rows) or from the signal (takeover rows)\n\n"
            "| scenario | membership | assigned | first scored event | first alert seen | departed partitions move on |\n"
            "|---|---|---:|---:|---:|---:|\n")
    lines = []
    for r in rows:
        before = "before: dynamic" if r["membership"] == "dynamic" else "after: static"
        lines.append(f"| {LABELS[r['scenario']]} | {before} | {fmt(r.get('assigned'))} | {fmt(r.get('scored'))} | "
                     f"{fmt(r.get('alert'))} | {fmt(r.get('progress'))} |\n")
    return head + "".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:19092"))
    ap.add_argument("--guarantee", default="exactly_once", choices=["exactly_once", "at_least_once"])
    ap.add_argument("--session-timeout-s", type=float, default=45.0, help="the members' session.timeout.ms (librdkafka's default 45 s)")
    ap.add_argument("--rate", type=float, default=1000.0, help="events/s of the live stream")
    ap.add_argument("--ticks", type=int, default=1500, help="ticks of the 100-entity fleet (the stream's length)")
    ap.add_argument("--only", help="comma-separated scenarios: " + ", ".join(SCENARIOS))
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--write", type=Path, help="markdown file whose table (between the markers) is replaced")
    ap.add_argument("--from", dest="rows", type=Path, help="render the rows of an earlier run's --json instead of running")
    args = ap.parse_args(argv)
    args.transaction_timeout_s = 60.0  # processing.transaction_timeout_s's default, which run_args keeps
    if args.rows is not None:
        earlier = orjson.loads(args.rows.read_bytes())
        meta, rows = earlier["meta"], earlier["rows"]
    else:
        chosen = args.only.split(",") if args.only else list(SCENARIOS)
        tmp = Path(tempfile.mkdtemp(prefix="recovery-"))
        bench = Bench(args, tmp)
        rows = []
        for name in chosen:
            for static in (False, True):
                if name == "sigterm-leave" and not static:
                    continue
                rows.append(bench.scenario(name, static))
        meta = {"guarantee": args.guarantee, "session_timeout_s": args.session_timeout_s,
                "transaction_timeout_s": args.transaction_timeout_s, "rate": args.rate, "logs": str(tmp)}
    text = table(rows, meta)
    print(text)
    if args.json:
        args.json.write_bytes(orjson.dumps({"meta": meta, "rows": rows}, option=orjson.OPT_INDENT_2))
    if args.write:
        doc = args.write.read_text()
        if START not in doc or END not in doc:
            print(f"recovery: {args.write} has no {START} ... {END} markers", file=sys.stderr)
            return 2
        head, rest = doc.split(START, 1)
        args.write.write_text(head + START + "\n" + text + END + rest.split(END, 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
