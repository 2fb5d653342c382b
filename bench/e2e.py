"""End-to-end throughput, CPU profile and latency of the service through the real broker.

One command, one run, every figure of issue 6 side by side (ratios are only meaningful within
one run on a shared machine):

    .venv/bin/python bench/e2e.py --entities 1000,50000 --out docs/perf-results.json

Per fleet size (entities x 38 features, contract-2 JSON from stream_detector.offline.simulate, keys =
entity, 4 partitions):
1. pre-load a topic with `--ticks` events per entity (as fast as the producer goes);
2. standalone confluent-kafka consume + decode of those messages (typed msgspec decoder and the
   orjson decoder), events/s; and both decoders side by side on the same bytes, µs/event;
3. standalone ONNX Runtime windows/s of the same model and batch size (`Scorer.score`);
4. the real `Detector.run(max_messages=...)` per scoring hop (fresh consumer group each): ingest
   events/s and scored windows/s from the first consumed message, and CPU seconds per 1,000
   events by stage: decode, window update (normalise + ring buffers), inference (the scorer's
   calling thread + ONNX Runtime's pool threads), threshold+alerts (the rest of
   `DetectorCore.process`), Kafka I/O + loop (the main thread minus decoding, plus librdkafka's
   own threads); RSS per 10,000 entities;
5. (first fleet size) latency: a producer offers 50% of the largest ingest rate measured in 4.
   at a fixed rate, every event stamped with its wall-clock produce time; the model's threshold
   is set so low that every scored event is anomalous and, with `alerts.update_every=1`, emits
   an alert; a consumer on the alerts topic records delivery time - produce time per alert;
6. (`--soak-seconds`) the same latency set-up for a long run with `--soak-entities`: latency over
   the whole run and RSS every 10 s (slope after the windows filled).

Model: `--bundle`, default bench/reference_bundle (DESIGN.md's reference architecture: F=38,
W=64, d_model=64, 2 layers). Broker: `--bootstrap`, or the local one (deploy/kafka/broker.sh).
Prints tables and writes JSON; it does not pass or fail.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from perfkit import REFERENCE_BUNDLE, StageClock, ThreadCpuSampler, rss_bytes, settled_rss_bytes, standalone_ort, start_broker

from stream_detector.core.bundle import load_bundle, write_bundle
from stream_detector.config import InputSettings, load_settings
from stream_detector.ingest.decode import Decoder
try:
    from stream_detector.ingest.kafka_config import CONSUMER_DEFAULTS
except ImportError:
    try:
        from stream_detector.service.kafka_io import CONSUMER_DEFAULTS  # before kafka_config.py
    except ImportError:  # the code of an older commit, measured by bench/latency_probe.py --code (only its latency path runs)
        CONSUMER_DEFAULTS = {}
from stream_detector.service.loop import Detector
from stream_detector.core.thresholds import ThresholdParams
from stream_detector.offline.simulate import SimConfig, Simulator, encode_event, produce

log = logging.getLogger("bench.e2e")


# ---------------------------------------------------------------------------------- topics
def admin(bootstrap: str) -> Any:
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": bootstrap})


def create_topics(bootstrap: str, topics: dict[str, int]) -> None:
    from confluent_kafka.admin import NewTopic

    a = admin(bootstrap)  # keep the client alive until the futures resolve
    # the simulated events carry simulated (old) timestamps: keep the broker's time retention off them
    for f in a.create_topics([NewTopic(t, n, 1, config={"retention.ms": "-1"}) for t, n in topics.items()]).values():
        f.result(timeout=60)


def delete_topics(bootstrap: str, topics: list[str]) -> None:
    try:
        a = admin(bootstrap)
        for f in a.delete_topics(topics, operation_timeout=30).values():
            f.result(timeout=60)
    except Exception as e:  # best effort: the broker keeps them otherwise
        log.warning("could not delete bench topics: %s", e)


# ---------------------------------------------------------------------------------- standalone parts
def consume_all(bootstrap: str, topic: str, total: int, extra: dict[str, Any] | None = None, keep: int = 0) -> tuple[list[Any], float]:
    """Read `total` messages of `topic` with a fresh group in batches of 1024; (first `keep`
    messages, seconds from the first message to the last)."""
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-read-{uuid.uuid4().hex[:6]}", "auto.offset.reset": "earliest",
                  "enable.auto.commit": False, **CONSUMER_DEFAULTS, **(extra or {})})
    c.subscribe([topic])
    kept: list[Any] = []
    n, t0 = 0, None
    deadline = time.monotonic() + 600
    while n < total and time.monotonic() < deadline:
        batch = c.consume(1024, 1.0)
        if batch and t0 is None:
            t0 = time.perf_counter()
        n += len(batch)
        if len(kept) < keep:
            kept.extend(batch[: keep - len(kept)])
    dt = time.perf_counter() - (t0 or time.perf_counter())
    c.close()
    return kept, dt


def consume_decode_rate(bootstrap: str, topic: str, total: int, features: list[str], typed: bool) -> float:
    """Standalone confluent-kafka consume + decode, events/s (fresh group, whole topic)."""
    from confluent_kafka import Consumer

    decoder = Decoder(features, InputSettings(timestamp_field="ts"), typed=typed)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-dec-{uuid.uuid4().hex[:6]}", "auto.offset.reset": "earliest",
                  "enable.auto.commit": False, **CONSUMER_DEFAULTS})
    c.subscribe([topic])
    n, t0 = 0, None
    deadline = time.monotonic() + 600
    while n < total and time.monotonic() < deadline:
        batch = c.consume(1024, 1.0)
        if not batch:
            continue
        if t0 is None:
            t0 = time.perf_counter()
        decoder.decode(batch)
        n += len(batch)
    rate = n / (time.perf_counter() - (t0 or time.perf_counter()))
    c.close()
    return rate


def decoder_table(messages: list[Any], features: list[str]) -> dict[str, float]:
    """µs per event of each decoder on the same consumed messages (best of 5)."""
    out = {}
    for name, typed in (("orjson", False), ("msgspec_typed", True)):
        d = Decoder(features, InputSettings(timestamp_field="ts"), typed=typed)
        if typed and d._typed is None:
            continue
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for i in range(0, len(messages), 1024):
                d.decode(messages[i : i + 1024])
            best = min(best, time.perf_counter() - t)
        out[name] = round(best / len(messages) * 1e6, 2)
    return out


# ---------------------------------------------------------------------------------- the service
PROVIDER = "auto"  # --provider
MAX_WAIT_MS = 100  # --max-wait-ms
POOL_EVENTS = 100_000  # latency runs: events encoded before the clock starts, then cycled (~120 MB)
TS_PLACEHOLDER = 10**12  # 13 digits, overwritten with the produce time in ms (13 digits until 2286)


def service_settings(bootstrap: str, run: str, name: str, topic: str, bundle: Path, hop: int, entities: int, max_batch: int,
                     **sections: dict[str, Any]) -> Any:
    o: dict[str, dict[str, Any]] = {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": f"bench-{run}-{name}", "topics": [topic],
                  "alerts_topic": f"bench-{run}-alerts", "dlq_topic": f"bench-{run}-dlq"},
        "input": {"timestamp_field": "ts"},
        "model": {"bundle": str(bundle), "provider": PROVIDER, "watch": False},
        "detection": {"hop": hop, "max_entities": max(100_000, 2 * entities)},
        "runtime": {"max_batch": max_batch, "max_wait_ms": MAX_WAIT_MS},
    }
    for k, v in sections.items():
        o.setdefault(k, {}).update(v)
    return load_settings(None, o)


def instrumented_run(settings: Any, max_messages: int | None = None, timeout: float | None = None,
                     when_assigned: Any = None, rss_every_s: float | None = None) -> tuple[Any, dict[str, Any]]:
    """`Detector(settings).run(...)` with CPU accounting per stage (see the module doc). The loop
    runs on a thread of its own; `when_assigned()` is called once it owns partitions. With
    `rss_every_s`, profile["rss_series"] holds [seconds, RSS MB, tracked entities] samples."""
    rss0 = settled_rss_bytes()
    det = Detector(settings)
    clock = StageClock()
    clock.wrap(det.decoder, "decode", "decode")
    clock.wrap(det.core.bundle.normaliser, "apply", "window")
    clock.wrap(det.core.store, "ingest", "window")
    if det.core.device is not None:
        clock.wrap(det.core.device, "update", "window")
        clock.wrap(det.core.device, "score", "inference")
    else:
        clock.wrap(det.scorer, "score", "inference")
    peak: dict[str, Any] = {"entities": 0, "rss": 0, "batches": 0, "first_scored": None, "last": None}
    process = det.core.process

    def process_and_sample(batch: Any, *a: Any, **kw: Any) -> Any:
        r = process(batch, *a, **kw)
        peak["batches"] += 1
        peak["last"] = time.monotonic()
        if peak["first_scored"] is None and r.n_scored:
            peak["first_scored"] = time.monotonic()
        if peak["batches"] % 16 == 1:  # /proc read, cheap but not free
            peak["entities"] = max(peak["entities"], len(det.core.store))
            peak["rss"] = max(peak["rss"], rss_bytes())
        return r

    det.core.process = process_and_sample  # type: ignore[method-assign]
    clock.wrap(det.core, "process", "core")
    sampler = ThreadCpuSampler()  # the loop, inference and librdkafka threads end with the run
    c0 = time.process_time()
    box: dict[str, Any] = {}
    loop = threading.Thread(target=lambda: box.update(stats=det.run(max_messages=max_messages, timeout=timeout)), name="sd-loop")
    loop.start()
    if when_assigned is not None:
        while loop.is_alive() and not (det._source is not None and det._source.assignment):
            time.sleep(0.01)
        when_assigned()
    series: list[list[float]] = []
    if rss_every_s:
        t_start = time.monotonic()
        while loop.is_alive():
            rss = settled_rss_bytes() if not series else rss_bytes()  # the first: the detector built, nothing consumed
            series.append([round(time.monotonic() - t_start, 1), round(rss / 2**20, 1), len(det.core.store)])
            loop.join(rss_every_s)
    loop.join()
    if "stats" not in box:
        raise RuntimeError("the detector loop failed (see the log above)")
    stats = box["stats"]
    cpu_total = time.process_time() - c0
    per_thread = sampler.stop()
    loop_tids = clock.threads.get("decode", set())
    inference_tids = clock.threads.get("core", set())
    rdk = sum(c for tid, (name, c) in per_thread.items() if name.startswith("rdk:"))
    main = sum(per_thread.get(tid, ("", 0.0))[1] for tid in loop_tids)
    pool = sum(c for tid, (name, c) in per_thread.items()
               if tid not in loop_tids and tid not in inference_tids and not name.startswith("rdk:")
               and tid != threading.main_thread().native_id)
    events = max(1, stats.consumed)
    k = 1000.0 / events
    inference = clock.cpu["inference"] + pool
    thr_alerts = max(0.0, clock.cpu["core"] - clock.cpu["window"] - clock.cpu["inference"])
    kafka_loop = max(0.0, main - clock.cpu["decode"]) + rdk
    busy = stats.elapsed_s - (stats.first_message_s or 0.0)
    entities = max(peak["entities"], len(det.core.store))
    rss = max(peak["rss"], rss_bytes()) - rss0
    profile = {
        "cpu_s_per_1000_events": {
            "decode": round(clock.cpu["decode"] * k, 5),
            "window_update": round(clock.cpu["window"] * k, 5),
            "inference": round(inference * k, 5),
            "threshold_alerts": round(thr_alerts * k, 5),
            "kafka_io_and_loop": round(kafka_loop * k, 5),
            "process_total": round(cpu_total * k, 5),
        },
        "ingest_us_per_event_excl_inference": round((clock.cpu["decode"] + clock.cpu["window"] + thr_alerts + kafka_loop) / events * 1e6, 2),
        "ingest_us_per_event_excl_inference_and_kafka": round((clock.cpu["decode"] + clock.cpu["window"] + thr_alerts) / events * 1e6, 2),
        "seconds": round(busy, 2),
        # scoring phase: from the first batch with a scored window to the last batch (the first W
        # events of every entity only fill windows)
        "scoring_seconds": round(peak["last"] - peak["first_scored"], 2) if peak["first_scored"] and peak["last"] else None,
        "entities_tracked": entities,
        "rss_growth_mb": round(rss / 2**20, 1),
        "rss_mb_per_10k_entities": round(rss / 2**20 / entities * 10_000, 1) if entities else None,
        "provider": det.scorer.provider,
        "device_windows": det.core.device is not None,
        "intra_op_threads": det.scorer.intra_op_threads,
    }
    if rss_every_s:
        profile["rss_series"] = series
    return stats, profile


def calibrated_bundle(src: Path, work: Path) -> Path:
    """The same model with a calibration that describes its score distribution (core/calibration.py),
    from 20,000 windows of a clean simulated fleet, so the 'calibrated' threshold method can run
    (the reference bundle predates it)."""
    out = work / "calibrated-bundle"
    if (out / "bundle.json").is_file():
        return out
    from stream_detector.core.calibration import calibrate_scores
    from stream_detector.core.pipeline import DetectionSettings, DetectorCore
    from stream_detector.core.events import EventBatch
    from stream_detector.core.scorer import Scorer

    b = load_bundle(src)
    keys, times, rows = Simulator(SimConfig(entities=200, features=b.n_features, seed=5), b.window + 100).frame()
    core = DetectorCore(b, Scorer(b, provider="cpu"), DetectionSettings(threshold=ThresholdParams(method="quantile")))
    scores = core.process(EventBatch.build(keys, rows.astype(np.float32), times)).score
    write_bundle(out, b.model_path.read_bytes(), model_version=b.model_version + "-calibrated", features=list(b.features),
                 window=b.window, normaliser=b.normaliser, scoring=b.scoring,
                 calibration=calibrate_scores(scores, 0.999), model=b.model, training=b.training)
    return out


# ---------------------------------------------------------------------------------- latency
def latency_bundle(src: Path, work: Path) -> Path:
    """The same model with a calibrated threshold so low that every score is anomalous."""
    b = load_bundle(src)
    out = work / "latency-bundle"
    if out.exists():
        shutil.rmtree(out)
    from stream_detector.core.bundle import Calibration

    write_bundle(out, b.model_path.read_bytes(), model_version=b.model_version + "-latency", features=list(b.features),
                 window=b.window, normaliser=b.normaliser, scoring=b.scoring,
                 calibration=Calibration({"1.0": 1e-9}, 1e-9, 1), model=b.model, training=b.training)
    return out


def latency_helper(bootstrap: str, topic: str, alerts_topic: str, entities: int, features: int, rate: float, seconds: float,
                   out_path: str) -> None:
    """In a process of its own (no GIL shared with the detector): offer `rate` events/s for
    `seconds`, each stamped with its wall-clock produce time, and record for every alert on
    `alerts_topic` its delivery time minus that stamp."""
    from confluent_kafka import Consumer, Producer

    latencies: list[float] = []
    delivered: list[float] = []  # wall ms when each alert was read
    stop = threading.Event()

    def read_alerts() -> None:
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{alerts_topic}-reader", "auto.offset.reset": "earliest",
                      "fetch.wait.max.ms": 5, "enable.auto.commit": False})
        c.subscribe([alerts_topic])
        quiet_until = None
        while True:
            msgs = c.consume(1000, 0.002)  # consume() waits its whole timeout unless 1000 arrive: keep it short (it is the measurement)
            now = time.time() * 1000.0
            for m in msgs:
                if m.error() is None:
                    et = orjson.loads(m.value()).get("event_time")
                    if et:
                        latencies.append(now - datetime.fromisoformat(et.replace("Z", "+00:00")).timestamp() * 1000.0)
                        delivered.append(now)
            if stop.is_set():  # drain for up to 5 s after the last event was offered
                quiet_until = quiet_until or time.monotonic() + 5
                if time.monotonic() > quiet_until:
                    break
        c.close()

    # The generator shares the 2 cores with the service and the broker: every event is encoded
    # before the clock starts (a pool of ticks, cycled), and sending one only writes its produce
    # time into the 13 digits reserved for it, so the generator costs the service as little CPU
    # as it can (its cores used are reported next to the latencies).
    ticks = max(1, min(int(rate * seconds / entities) + 2, POOL_EVENTS // entities))
    sim = Simulator(SimConfig(entities=entities, features=features, anomaly_rate=0.0, seed=21), ticks)
    pool: list[tuple[bytes, bytearray, int]] = []
    for _, rows in sim.ticks():
        for key, row in zip(sim.keys, rows.tolist()):
            value = encode_event(key, TS_PLACEHOLDER, sim.features, row)
            pool.append((key.encode(), bytearray(value), value.index(b'"ts":') + 5))
    reader = threading.Thread(target=read_alerts)
    reader.start()
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 2, "enable.idempotence": True})
    cpu0 = time.process_time()
    t0 = time.monotonic()
    produced = 0
    for key, value, at in itertools.cycle(pool):
        value[at:at + 13] = b"%d" % int(time.time() * 1000)
        while True:
            try:
                p.produce(topic, value=bytes(value), key=key)
                break
            except BufferError:
                p.poll(0.01)
        produced += 1
        if produced % 64 == 0:
            p.poll(0)
            now = time.monotonic()
            if now - t0 > seconds:
                break
            if t0 + produced / rate > now:
                time.sleep(t0 + produced / rate - now)
    p.flush(30)
    elapsed = time.monotonic() - t0
    achieved = produced / elapsed
    generator_cores = (time.process_time() - cpu0) / elapsed  # producing and reading alerts, this process
    stop.set()
    reader.join()
    Path(out_path).write_bytes(orjson.dumps({"produced": produced, "achieved_rate": achieved, "generator_cores": generator_cores,
                                             "latencies": latencies, "delivered": delivered}))


def measure_latency(bootstrap: str, run: str, bundle: Path, entities: int, rate: float, seconds: float, max_batch: int,
                    hop: int, partitions: int, work: Path, rss_every_s: float | None = None) -> dict[str, Any]:
    import multiprocessing

    topic, alerts_topic = f"bench-{run}-lat", f"bench-{run}-lat-alerts"
    create_topics(bootstrap, {topic: partitions, alerts_topic: 1, f"bench-{run}-dlq": 1})
    b = load_bundle(bundle)
    settings = service_settings(bootstrap, run, "latency", topic, bundle, hop, entities, max_batch,
                                kafka={"alerts_topic": alerts_topic},
                                detection={"update_every": 1, "cooldown": 0, "resolve_after": 1_000_000, "warmup": 1000, "history": 1000})
    out_path = work / "latency.json"
    helper = multiprocessing.get_context("spawn").Process(
        target=latency_helper, args=(bootstrap, topic, alerts_topic, entities, b.n_features, rate, seconds, str(out_path)))
    stats, profile = instrumented_run(settings, timeout=seconds + 20, when_assigned=helper.start, rss_every_s=rss_every_s)
    helper.join(60)
    delete_topics(bootstrap, [topic, alerts_topic, f"bench-{run}-dlq", f"bench-{run}-latency-changelog"])
    res = orjson.loads(out_path.read_bytes()) if out_path.exists() else {"produced": 0, "achieved_rate": 0, "latencies": []}
    lat = np.asarray(res["latencies"])
    warm = lat[lat.size // 10 :]  # the first 10% of alerts: the windows were filling and the group settling
    pct = {f"p{q}": round(float(np.percentile(warm, q)), 1) for q in (50, 95, 99)} if warm.size else {}
    at = np.asarray(res.get("delivered", []))[lat.size // 10 :]
    second = ((at - at[0]) // 1000).astype(int) if at.size == warm.size and warm.size else np.zeros(0, int)
    # per second of the measured part: a stall (every alert late at once) tells itself from a slow service
    timeline = [{"t_s": int(t), "alerts": int((second == t).sum()), "p50": round(float(np.median(warm[second == t])), 1),
                 "max": round(float(warm[second == t].max()), 1)} for t in np.unique(second)]
    return {"offered_events_per_s": round(rate), "achieved_events_per_s": round(res["achieved_rate"]), "produced": res["produced"],
            "generator_cores": round(res["generator_cores"], 3) if "generator_cores" in res else None,
            "consumed": stats.consumed, "alerts": int(lat.size),
            "latency_ms": {**pct, "max": round(float(warm.max()), 1) if warm.size else None, "samples": int(warm.size)},
            "latency_per_second": timeline,
            "profile": profile}


def soak(args: argparse.Namespace, bootstrap: str, best_rate: float, hop: int, work: Path) -> dict[str, Any]:
    """A long run at a fixed share of the measured maximum (`--soak-*`): latency over the whole run
    and RSS every 10 s, to see whether memory stays flat once every window is full."""
    rate = args.soak_fraction * best_rate
    print(f"[soak] {args.soak_entities} entities at {rate:.0f} events/s ({args.soak_fraction:.0%} of {best_rate:.0f}) "
          f"for {args.soak_seconds:g} s", flush=True)
    lat = measure_latency(bootstrap, f"{uuid.uuid4().hex[:6]}soak", latency_bundle(args.bundle, work), args.soak_entities, rate,
                          args.soak_seconds, args.max_batch, hop, args.partitions, work, rss_every_s=10.0)
    series = lat["profile"].pop("rss_series")
    late = np.array([x for x in series if x[0] >= args.soak_seconds / 2]) if series else np.zeros((0, 3))
    rss: dict[str, Any] = {"series": series}
    if late.shape[0] >= 3:
        slope = float(np.polyfit(late[:, 0] / 60.0, late[:, 1], 1)[0])
        # growth from the first sample (detector built, partitions assigned, nothing consumed yet)
        rss.update({"mb_at_start": float(series[0][1]), "mb_at_end": float(late[-1, 1]),
                    "second_half_mb_min": float(late[:, 1].min()), "second_half_mb_max": float(late[:, 1].max()),
                    "second_half_slope_mb_per_min": round(slope, 2), "entities": int(late[-1, 2]),
                    "growth_mb_per_10k_entities": round(float(late[-1, 1] - series[0][1]) / max(1, late[-1, 2]) * 10_000, 1)})
    print(f"[soak] latency {lat['latency_ms']}; RSS {({k: v for k, v in rss.items() if k != 'series'})}", flush=True)
    return {"entities": args.soak_entities, "seconds": args.soak_seconds, "hop": hop, "fraction_of_max": args.soak_fraction,
            **lat, "rss": rss}


# ---------------------------------------------------------------------------------- one fleet size
def run_fleet(args: argparse.Namespace, bootstrap: str, bundle_path: Path, entities: int, first: bool, work: Path) -> dict[str, Any]:
    bundle = load_bundle(bundle_path)
    run = uuid.uuid4().hex[:6]
    large = entities > args.large
    ticks = args.ticks or (bundle.window + 8 if large else 320)
    hops = args.hops_large if large else args.hops
    topic = f"bench-{run}-obs"
    create_topics(bootstrap, {topic: args.partitions, f"bench-{run}-alerts": 1, f"bench-{run}-dlq": 1})
    sim = Simulator(SimConfig(entities=entities, features=bundle.n_features, anomaly_rate=1.0, warmup=0, seed=11), ticks)
    t = time.perf_counter()
    total = produce(sim, bootstrap, topic, rate=0)
    produce_s = time.perf_counter() - t
    print(f"[{entities} entities] pre-loaded {total} events in {produce_s:.1f} s", flush=True)
    out: dict[str, Any] = {"entities": entities, "ticks": ticks, "events": total, "produce_events_per_s": round(total / produce_s)}

    sample, _ = consume_all(bootstrap, topic, min(total, 60_000), keep=60_000)
    out["message_bytes_mean"] = round(float(np.mean([len(m.value()) for m in sample])), 1)
    out["decoders_us_per_event"] = decoder_table(sample, list(bundle.features))
    del sample
    n_read = min(total, 400_000)
    out["consume_decode_events_per_s"] = {
        "msgspec_typed": round(consume_decode_rate(bootstrap, topic, n_read, list(bundle.features), typed=True)),
        "orjson": round(consume_decode_rate(bootstrap, topic, n_read, list(bundle.features), typed=False)),
        "messages": n_read,
    }
    print(f"[{entities} entities] decoders {out['decoders_us_per_event']} µs/event; consume+decode {out['consume_decode_events_per_s']} events/s", flush=True)
    ort_rate, provider, ort_cpu = standalone_ort(bundle_path, PROVIDER, args.max_batch, args.standalone_seconds)
    all_cores, _, all_cores_cpu = standalone_ort(bundle_path, PROVIDER, args.max_batch, args.standalone_seconds,
                                                 threads=len(os.sched_getaffinity(0)))
    out["standalone_ort"] = {"windows_per_s": round(ort_rate), "provider": provider, "batch": args.max_batch,
                             "cpu_s_per_1000_windows": round(ort_cpu, 4),
                             "note": "the scorer's own session settings (intra-op threads = cores - 1)",
                             "all_cores": {"windows_per_s": round(all_cores), "cpu_s_per_1000_windows": round(all_cores_cpu, 4)}}
    print(f"[{entities} entities] ONNX Runtime alone: {ort_rate:.0f} windows/s at batch {args.max_batch} on {provider}", flush=True)

    rows = []
    for hop, method in itertools.product(hops, args.thresholds):  # methods alternate within a hop: their ratio is one run's
        path = calibrated_bundle(bundle_path, work) if method == "calibrated" else bundle_path
        settings = service_settings(bootstrap, run, f"hop{hop}{method}", topic, path, hop, entities, args.max_batch,
                                    detection={"threshold": method})
        n = total if hop > 1 or large else min(total, entities * (bundle.window + args.hop1_extra))  # hop 1 is ORT-bound: fewer ticks
        stats, profile = instrumented_run(settings, max_messages=n, timeout=3600)
        busy = profile["seconds"]
        scoring_s = profile["scoring_seconds"] or busy
        scored_rate = stats.scored / scoring_s if hop == 1 else stats.scored / busy  # hop 1: over its scoring phase
        row = {"hop": hop, "threshold": method, "events": stats.consumed, "scored": stats.scored,
               "ingest_events_per_s": round(stats.consumed / busy), "scored_windows_per_s": round(scored_rate),
               "scored_vs_standalone_ort": round(scored_rate / ort_rate, 3),
               "alerts": sum(stats.alerts.values()), "dead_letters": stats.dead_letters,
               "changelog_records": stats.changelog_records, "changelog_mb": round(stats.changelog_bytes / 2**20, 1),
               "changelog_bytes_per_event": round(stats.changelog_bytes / max(1, stats.consumed)),
               "backpressure_s": round(stats.backpressure_s, 2), **profile}
        rows.append(row)
        print(f"[{entities} entities] hop {hop}, threshold {method}: {row['ingest_events_per_s']} events/s, {row['scored_windows_per_s']} windows/s "
              f"({row['scored_vs_standalone_ort']} x ORT alone), CPU ms/1000 ev {row['cpu_s_per_1000_events']}", flush=True)
    out["service"] = rows
    delete_topics(bootstrap, [topic] + [f"bench-{run}-hop{h}{m}-changelog" for h in hops for m in args.thresholds])

    if first and args.latency_seconds > 0:
        best = max(rows, key=lambda r: r["ingest_events_per_s"])
        out["latency"] = []
        global MAX_WAIT_MS
        for max_wait in args.latency_max_wait_ms:
            MAX_WAIT_MS = max_wait
            for fraction in args.latency_fractions:
                rate = fraction * best["ingest_events_per_s"]
                print(f"[{entities} entities] latency at {fraction:.0%} of {best['ingest_events_per_s']} events/s (hop {best['hop']}, "
                      f"max_wait_ms {max_wait}) for {args.latency_seconds:g} s", flush=True)
                lat = measure_latency(bootstrap, f"{run}{int(fraction * 100)}w{max_wait}", latency_bundle(bundle_path, work), entities,
                                      rate, args.latency_seconds, args.max_batch, best["hop"], args.partitions, work)
                out["latency"].append({"hop": best["hop"], "fraction_of_max": fraction, "max_wait_ms": max_wait, **lat})
                print(f"[{entities} entities] latency {lat['latency_ms']} ({lat['alerts']} alerts, {lat['produced']} events offered, "
                      f"{lat['achieved_events_per_s']}/s)", flush=True)
        MAX_WAIT_MS = args.max_wait_ms
    delete_topics(bootstrap, [f"bench-{run}-alerts", f"bench-{run}-dlq"])
    return out


def _hop(row: dict[str, Any]) -> str:
    """The hop, and the threshold method where a run compared several."""
    method = row.get("threshold", "auto")
    return str(row["hop"]) if method == "auto" else f"{row['hop']} {method}"


def print_tables(result: dict[str, Any]) -> None:
    print(f"\nmachine: {result['machine']['cpus']} CPUs, {result['machine']['processor']}; model {result['model']['version']} "
          f"(W={result['model']['window']}, F={result['model']['features']}), batch {result['batch']}")
    print(f"{'entities':>8} {'hop':>4} {'ingest ev/s':>11} {'scored win/s':>12} {'ORT alone':>9} {'ratio':>6} "
          f"{'decode':>7} {'window':>7} {'infer':>7} {'thr+al':>7} {'kafka':>7} {'µs/ev*':>7} {'MB/10k':>7}")
    for f in result["fleets"]:
        for r in f["service"]:
            c = r["cpu_s_per_1000_events"]
            print(f"{f['entities']:>8} {_hop(r):>4} {r['ingest_events_per_s']:>11} {r['scored_windows_per_s']:>12} "
                  f"{f['standalone_ort']['windows_per_s']:>9} {r['scored_vs_standalone_ort']:>6} {c['decode'] * 1e3:>7.2f} "
                  f"{c['window_update'] * 1e3:>7.2f} {c['inference'] * 1e3:>7.2f} {c['threshold_alerts'] * 1e3:>7.2f} "
                  f"{c['kafka_io_and_loop'] * 1e3:>7.2f} {r['ingest_us_per_event_excl_inference']:>7} {r['rss_mb_per_10k_entities']!s:>7}")
    print("CPU columns: ms per 1,000 events (= µs per event); µs/ev*: ingest path CPU per event excluding inference (Kafka I/O included)")
    for f in result["fleets"]:
        print(f"{f['entities']} entities: consume+decode alone {f['consume_decode_events_per_s']} events/s; decoders {f['decoders_us_per_event']} µs/event")
        for lat in f.get("latency", []):
            print(f"{f['entities']} entities: latency at {lat['offered_events_per_s']} events/s offered ({lat['fraction_of_max']:.0%} of max, "
                  f"hop {lat['hop']}, max_wait_ms {lat['max_wait_ms']}, {lat['achieved_events_per_s']} achieved): {lat['latency_ms']}")
    if result.get("soak"):
        sk = result["soak"]
        print(f"soak: {sk['entities']} entities, {sk['seconds']:g} s at {sk['offered_events_per_s']} events/s: latency {sk['latency_ms']}; "
              f"RSS {({k: v for k, v in sk['rss'].items() if k != 'series'})}")


def markdown(result: dict[str, Any]) -> str:
    """The tables of docs/performance.md, from a result file."""
    out = ["| entities | hop | ingest events/s | scored windows/s | ORT alone windows/s | scored / ORT | decode | window update | inference | threshold+alerts | Kafka I/O + loop | ingest path µs/event (excl. inference) | RSS growth MB | changelog bytes/event (records) |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for f in result["fleets"]:
        for r in f["service"]:
            c = r["cpu_s_per_1000_events"]
            out.append(f"| {f['entities']:,} | {_hop(r)} | {r['ingest_events_per_s']:,} | {r['scored_windows_per_s']:,} | "
                       f"{f['standalone_ort']['windows_per_s']:,} | {r['scored_vs_standalone_ort']} | {c['decode'] * 1e3:.2f} | "
                       f"{c['window_update'] * 1e3:.2f} | {c['inference'] * 1e3:.2f} | {c['threshold_alerts'] * 1e3:.2f} | "
                       f"{c['kafka_io_and_loop'] * 1e3:.2f} | {r['ingest_us_per_event_excl_inference']} | {r['rss_growth_mb']} | "
                       f"{r.get('changelog_bytes_per_event', round(r['changelog_mb'] * 2**20 / max(1, r['events'])))} ({r['changelog_records']:,}) |")
    out += ["", "| entities | consume + decode alone, events/s (msgspec / orjson) | decoders µs/event (msgspec / orjson) | mean message bytes |",
            "|---:|---:|---:|---:|"]
    for f in result["fleets"]:
        cd, dd = f["consume_decode_events_per_s"], f["decoders_us_per_event"]
        out.append(f"| {f['entities']:,} | {cd['msgspec_typed']:,} / {cd['orjson']:,} | {dd.get('msgspec_typed')} / {dd['orjson']} | {f['message_bytes_mean']} |")
    lat = [(f["entities"], x) for f in result["fleets"] for x in f.get("latency", [])]
    if lat:
        out += ["", "| entities | hop | offered events/s (of max) | max_wait_ms | alerts | p50 ms | p95 ms | p99 ms | max ms | load generator, cores |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for e, x in lat:
            m = x["latency_ms"]
            out.append(f"| {e:,} | {x['hop']} | {x['offered_events_per_s']:,} ({x['fraction_of_max']:.0%}) | {x['max_wait_ms']} | {x['alerts']:,} | "
                       f"{m.get('p50')} | {m.get('p95')} | {m.get('p99')} | {m.get('max')} | {x.get('generator_cores') or '-'} |")
    sk = result.get("soak")
    if sk:
        m, r = sk["latency_ms"], sk["rss"]
        out += ["", "| soak: entities | seconds | offered events/s (of max) | consumed | alerts | p50 / p99 / max ms | RSS MB at start / "
                "at end | second half: RSS min / max MB, slope MB/min | RSS growth per 10k entities, MB |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                f"| {sk['entities']:,} | {sk['seconds']:g} | {sk['offered_events_per_s']:,} ({sk['fraction_of_max']:.0%}) | {sk['consumed']:,} | "
                f"{sk['alerts']:,} | {m.get('p50')} / {m.get('p99')} / {m.get('max')} | {r.get('mb_at_start')} / {r.get('mb_at_end')} | "
                f"{r.get('second_half_mb_min')} / {r.get('second_half_mb_max')}, {r.get('second_half_slope_mb_per_min')} | "
                f"{r.get('growth_mb_per_10k_entities')} |"]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: start the local broker)")
    p.add_argument("--bundle", type=Path, default=REFERENCE_BUNDLE)
    p.add_argument("--entities", default="1000,50000", help="fleet sizes, comma-separated")
    p.add_argument("--ticks", type=int, default=0, help="events per entity pre-loaded (default 320; W + 8 for fleets above --large)")
    p.add_argument("--hops", default="1,16", help="scoring hops of the service runs")
    p.add_argument("--large", type=int, default=5000, help="fleets above this size run only --hops-large, over W + 8 ticks")
    p.add_argument("--hops-large", default="16")
    p.add_argument("--hop1-extra", type=int, default=40, help="hop 1 consumes only entities x (W + this) events (ORT-bound)")
    p.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--standalone-seconds", type=float, default=5.0)
    p.add_argument("--latency-seconds", type=float, default=30.0, help="length of each latency run (0: skip)")
    p.add_argument("--latency-fractions", default="0.5,0.25", help="offered load as fractions of the largest measured ingest rate")
    p.add_argument("--max-wait-ms", type=int, default=20, help="runtime.max_wait_ms of the throughput runs (the service default: 20)")
    p.add_argument("--latency-max-wait-ms", default="100,20", help="runtime.max_wait_ms values of the latency runs")
    p.add_argument("--soak-seconds", type=float, default=0.0, help="after the fleets: a run this long at --soak-fraction of the "
                   "first fleet's best ingest rate, latency and RSS over time (600 in docs/performance.md; 0: skip)")
    p.add_argument("--soak-entities", type=int, default=10_000)
    p.add_argument("--soak-fraction", type=float, default=0.25, help="offered load of the soak (0.5 of the 1,000-fleet maximum "
                   "overloads a 10,000 fleet on 2 shared cores: docs/performance.md)")
    p.add_argument("--thresholds", default="auto", help="threshold methods of the service runs, comma-separated (e.g. "
                   "quantile,calibrated: each hop runs once per method, in turn, for their ratio in one run)")
    p.add_argument("--out", type=Path, help="write the JSON result here")
    p.add_argument("--render", type=Path, help="only print the markdown tables of an existing result file")
    args = p.parse_args()
    if args.render:
        print(markdown(json.loads(args.render.read_text())))
        return 0
    args.hops = [int(h) for h in args.hops.split(",")]
    args.thresholds = [m.strip() for m in args.thresholds.split(",") if m.strip()]
    args.hops_large = [int(h) for h in args.hops_large.split(",")]
    args.latency_fractions = [float(x) for x in args.latency_fractions.split(",")]
    args.latency_max_wait_ms = [int(x) for x in args.latency_max_wait_ms.split(",")]
    global PROVIDER, MAX_WAIT_MS
    PROVIDER, MAX_WAIT_MS = args.provider, args.max_wait_ms
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("stream_detector.core.windows").setLevel(logging.ERROR)

    bootstrap = args.bootstrap or start_broker()
    bundle = load_bundle(args.bundle)
    work = Path(tempfile.mkdtemp(prefix="sd-e2e-"))
    result: dict[str, Any] = {
        "bench": "e2e", "date": datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "processor": platform.processor() or platform.machine(),
                    "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]},
        "model": {"version": bundle.model_version, "window": bundle.window, "features": bundle.n_features, "path": str(args.bundle)},
        "batch": args.max_batch, "provider": args.provider, "max_wait_ms": args.max_wait_ms, "fleets": [],
    }
    for i, e in enumerate(int(x) for x in args.entities.split(",")):
        result["fleets"].append(run_fleet(args, bootstrap, args.bundle, e, i == 0, work))
        if args.out:  # partial results survive an interrupted long run
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))
    if args.soak_seconds > 0:
        best = max(result["fleets"][0]["service"], key=lambda r: r["ingest_events_per_s"])
        result["soak"] = soak(args, bootstrap, best["ingest_events_per_s"], best["hop"], work)
    result["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print_tables(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
