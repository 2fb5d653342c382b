"""Log parsing + template matching throughput, one process, one thread, on the real HDFS sample.

    .venv/bin/python bench/logparse_throughput.py [--data ../shared/data] [--repeat 3]

Templates are mined (drain3, training mode) on the first --train-fraction of the lines, then every
line is parsed from bytes (as a Kafka message value) and matched against the frozen set (serving
mode). Stages are timed separately and together; the best of --repeat runs is printed. The match
cache (keyed by the masked message) is measured on and off. Prints figures; never fails on them.
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from stream_detector.logs.spec import COUNTS_LAYOUT, LogModelSpec
from stream_detector.logs.features import LogFeaturizer, explode, make_feature_config
from stream_detector.logs.parse import LineParser, make_config
from stream_detector.logs.core import LogDetectorCore
from stream_detector.logs.stage import LogStage
from stream_detector.logs.templates import UNKNOWN_TEMPLATE_ID, TemplateMiner, TemplateSet, make_template_config

REPO = Path(__file__).resolve().parent.parent
TARGET_LINES_PER_S = 50_000


def best_rate(n: int, fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="data root (default ../shared/data)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--train-fraction", type=float, default=0.3, help="leading share of lines to mine templates from")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N lines (0 = all)")
    args = ap.parse_args(argv)

    parts = sorted(glob.glob(os.path.join(args.data, "logs", "hdfs_v1_2pct", "HDFS_2pct.log.part-*")))
    if not parts:
        print(f"no HDFS log parts under {args.data}/logs/hdfs_v1_2pct; pass --data.", file=sys.stderr)
        return 2
    raw: list[bytes] = []
    for p in parts:
        raw.extend(Path(p).read_bytes().splitlines())
    if args.limit:
        raw = raw[: args.limit]
    n = len(raw)
    parser = LineParser(make_config(format="hdfs"))

    n_train = int(n * args.train_fraction)
    t0 = time.perf_counter()
    miner = TemplateMiner(make_template_config())
    for line in raw[:n_train]:
        miner.learn(parser.parse(line).message)
    mine_s = time.perf_counter() - t0
    tset = miner.freeze()
    data = tset.to_bytes()

    def fresh(cache: bool) -> TemplateSet:
        d = tset.to_json()
        return TemplateSet.from_json({**d, "config": {**d["config"], "match_cache_size": 100_000 if cache else 0}})

    parsed = [parser.parse(line) for line in raw]
    messages = [p.message for p in parsed]

    def parse_only():
        for line in raw:
            parser.parse(line)

    def match_only(cache: bool):
        ts = fresh(cache)  # a cold cache each run: the cache's warm-up is part of the figure
        for m in messages:
            ts.match(m)

    def parse_and_match():
        ts = fresh(True)
        for line in raw:
            ts.match(parser.parse(line).message)

    ts = fresh(True)
    ids = np.fromiter((ts.match(m) for m in messages), dtype=np.int32, count=n)
    times = np.fromiter((p.timestamp_ms for p in parsed), dtype=np.int64, count=n)
    ents, ev_t, ev_id, _ = explode([p.entities for p in parsed], times, ids)

    def featurize():
        fz = LogFeaturizer(tset.vocab_size, make_feature_config(session_timeout_s=6 * 3600, bucket_s=600))
        for s in range(0, len(ents), 4096):
            fz.add_batch(ents[s : s + 4096], ev_t[s : s + 4096], ev_id[s : s + 4096])
        fz.close_all()

    # The whole log stage with the default count layout (rows: cumulative counts, idle checks at
    # 600 s), and the same plus what `run` does per row when the changelog is on: each entity's
    # log session as of the rows applied (LogDetectorCore._note; every entity kept tracked).
    spec = LogModelSpec(make_config(format="hdfs"), make_feature_config(session_timeout_s=86_400, idle_check_s=600), fresh(True), 0, COUNTS_LAYOUT)

    def stage_rows(note_sessions: bool):
        stage = LogStage(spec)
        tracking = None
        if note_sessions:
            core = SimpleNamespace()  # stands in for the scoring core, which here evicts no entity
            tracking = LogDetectorCore(core, spec, stage)
            core.entities = lambda: list(tracking._sessions)
        for s in range(0, n, 4096):
            batch, _ = stage.feed(raw[s : s + 4096], offset=np.arange(s, min(n, s + 4096)))
            if tracking is not None:
                tracking._note(batch)

    rows = [
        ("parse (bytes → ParsedLine)", best_rate(n, parse_only, args.repeat)),
        ("match, cache on", best_rate(n, lambda: match_only(True), args.repeat)),
        ("match, cache off (drain3 match per line)", best_rate(n, lambda: match_only(False), args.repeat)),
        ("parse + match, cache on", best_rate(n, parse_and_match, args.repeat)),
        ("features (sessions + 600 s buckets)", best_rate(len(ents), featurize, args.repeat)),
        ("log stage, count rows (parse → rows)", best_rate(n, lambda: stage_rows(False), args.repeat)),
        ("log stage + session bookkeeping (changelog on)", best_rate(n, lambda: stage_rows(True), args.repeat)),
    ]
    print(f"HDFS sample: {n} lines from {len(parts)} parts; python {platform.python_version()}, {platform.machine()}, one thread")
    print(f"templates: mined {tset.vocab_size - 1} from the first {n_train} lines in {mine_s:.2f} s ({n_train / mine_s:,.0f} lines/s); "
          f"template set JSON {len(data)} bytes")
    print(f"serving: {int((ids == UNKNOWN_TEMPLATE_ID).sum())} of {n} lines match no template (unknown); "
          f"distinct masked messages {ts.cache_misses}")
    print(f"{'stage':44s} {'lines/s':>12s}")
    for name, rate in rows:
        print(f"{name:44s} {rate:12,.0f}")
    headline = rows[3][1]
    print(f"parse + match vs target {TARGET_LINES_PER_S:,} lines/s: {headline / TARGET_LINES_PER_S:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
