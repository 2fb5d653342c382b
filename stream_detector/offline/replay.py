"""`stream-detector replay`: the backtesting path. A file is read with `datafiles.read_table` (or a
range of a topic with `topic_table.read_topic_table`, `--kafka-topic`), cut
into `EventBatch`es and fed through the same `DetectorCore` the Kafka service runs, so a backtest
is the production logic, not a second implementation.

Events carry topic = the input file's name, partition 0, offset = the row's 0-based position
among the file's data rows (`DataTable.row_index`), and the file's timestamps when it has them.
Rows are fed in time order when there are timestamps (stable: file order among equal times),
else in file order.

Writes `OUT/scores.csv` (scoresfile.py: header `row,key,score,threshold,alert,event`, one line per
kept input row, in `row` order; see docs/architecture.md) and `OUT/alerts.jsonl` (one contract-3
alert event per line, in emission order), and prints rows/s.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from stream_detector.config import ConfigError, Settings, add_settings_arguments, settings_from_args
from stream_detector.core.bundle import Bundle, BundleError, load_bundle
from stream_detector.core.events import NO_TIME, EventBatch
from stream_detector.core.pipeline import DetectorCore
from stream_detector.core.scorer import Scorer, ScorerError
from stream_detector.ingest.topic_range import TopicRangeError
from stream_detector.offline.datafiles import FORMATS, DataFileError, DataTable, read_table
from stream_detector.offline.scoresfile import SCORES_FILE, write_scores

log = logging.getLogger(__name__)

ALERTS_FILE = "alerts.jsonl"


class ReplayError(Exception):
    """Replay cannot run; one sentence for the user."""


@dataclass(frozen=True)
class ReplaySummary:
    rows: int
    scored: int
    alerts: int
    opens: int
    seconds: float  # detection only (reading and writing files excluded)
    provider: str

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")

    @property
    def scored_per_s(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else float("inf")


def replay_table(
    core: DetectorCore, table: DataTable, out_dir: Path, batch_size: int = 4096, topic: str | None = None
) -> ReplaySummary:
    """Feed a table through `core` and write scores.csv and alerts.jsonl into out_dir."""
    if tuple(table.features) != tuple(core.bundle.features):
        raise ReplayError("the input's feature columns do not match the model bundle's features.")
    n = table.n_rows
    topic = topic if topic is not None else Path(table.source).name
    order = np.arange(n)
    if table.timestamps_ms is not None and np.any(np.diff(table.timestamps_ms) < 0):
        order = np.argsort(table.timestamps_ms, kind="stable")
    rows32 = table.values.astype(np.float32)
    times = table.timestamps_ms if table.timestamps_ms is not None else np.full(n, NO_TIME, dtype=np.int64)
    score = np.full(n, np.nan, dtype=np.float32)
    threshold = np.full(n, np.nan, dtype=np.float32)
    alert_open = np.zeros(n, dtype=bool)
    event: list[str] = [""] * n
    alerts: list[dict] = []
    scored = 0
    t0 = time.perf_counter()
    for start in range(0, n, batch_size):
        pos = order[start : start + batch_size]  # positions in the table
        batch = EventBatch.build(
            [table.keys[i] for i in pos.tolist()],
            rows32[pos],
            times[pos],
            topic=topic,
            partition=0,
            offset=table.row_index[pos],
        )
        res = core.process(batch, row_alert_state=True)
        hit = pos[res.index]
        score[hit] = res.score
        threshold[hit] = res.threshold
        assert res.open_after is not None
        alert_open[pos] = res.open_after
        for p, ev in zip(hit.tolist(), res.alert_event):
            if ev is not None:
                event[p] = ev
        alerts.extend(res.alerts)
        scored += res.n_scored
    seconds = time.perf_counter() - t0

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_scores(out_dir / SCORES_FILE, table, score, threshold, alert_open, event)
    with open(out_dir / ALERTS_FILE, "wb") as f:
        for a in alerts:
            f.write(orjson.dumps(a))
            f.write(b"\n")
    return ReplaySummary(
        n, scored, len(alerts), sum(a["state"] == "open" for a in alerts), seconds, core.scorer.provider
    )


def _write_scores(
    path: Path, table: DataTable, score: np.ndarray, threshold: np.ndarray, alert_open: np.ndarray, event: list[str]
) -> None:
    by_row = np.argsort(table.row_index, kind="stable")
    keys = table.keys
    write_scores(
        path,
        table.row_index[by_row],
        [keys[i] for i in by_row.tolist()],
        score[by_row],
        threshold[by_row],
        alert_open[by_row],
        [event[i] for i in by_row.tolist()],
    )


# ---------------------------------------------------------------------- command line
def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "replay",
        help="score a file with a model bundle, offline (backtesting): scores.csv + alerts.jsonl",
        description="Feed a CSV/JSONL/SMD/Parquet file (or raw log lines) through the same windows, scorer, thresholds "
        "and alert logic as the Kafka service, with the same settings: the TOML of `run` (--config), its "
        "SD_SECTION__KEY environment variables and its --section.key flags. Writes OUT/scores.csv and "
        "OUT/alerts.jsonl.",
    )
    p.add_argument("--model", type=Path, help="model bundle directory (default: [model] bundle of the settings)")
    p.add_argument("--input", type=Path, help="data file to replay (or --kafka-topic)")
    p.add_argument(
        "--kafka-topic",
        help="replay a range of this topic instead of a file, read as the service reads it ([kafka] and [input] "
        "settings, the service's decoder) without joining or committing to a consumer group",
    )
    p.add_argument(
        "--since",
        help="with --kafka-topic: first record, as earliest (default), an ISO-8601 time (2026-12-01T00:00Z), "
        "a duration before now (90m, 6h, 7d) or @OFFSET (every partition)",
    )
    p.add_argument("--until", help="with --kafka-topic: end of the range (exclusive), same forms; default latest")
    p.add_argument("--out", required=True, type=Path, help="output directory (created)")
    p.add_argument(
        "--format",
        default="auto",
        choices=(*FORMATS, "log"),
        help="input format (default: from the suffix); 'log': raw log lines for a log model bundle (logreplay.py)",
    )
    add_settings_arguments(p)
    p.set_defaults(func=run_cli)


def replay_settings(args: argparse.Namespace) -> tuple[Settings, Path]:
    """The settings `run` would use (TOML < env < flags) and the bundle path; ConfigError otherwise."""
    settings = settings_from_args(args)
    path = args.model or settings.model.bundle
    if path is None:
        raise ConfigError("no model bundle: pass --model or set [model] bundle.")
    return settings, Path(path)


def replay_input(args: argparse.Namespace, settings: Settings, bundle: Bundle) -> DataTable:
    """The file (--input) or the topic range (--kafka-topic) to replay, with the bundle's features."""
    if (args.input is None) == (args.kafka_topic is None):
        raise ReplayError("give the data to replay as --input FILE or --kafka-topic TOPIC, one of the two.")
    if args.kafka_topic is None:
        if args.since or args.until:
            raise ReplayError("--since and --until apply to --kafka-topic only.")
        return read_table(
            args.input,
            args.format,
            features=bundle.features,
            key_field=settings.input.key_field,
            timestamp_field=settings.input.timestamp_field,
        )
    from stream_detector.offline.topic_table import read_topic_table

    table, r = read_topic_table(settings, args.kafka_topic, args.since, args.until, bundle.features)
    print(r.summary(), file=sys.stderr)
    if table.n_rows == 0:
        raise ReplayError(f"{r.summary()}; nothing to replay.")
    return table


def run_cli(args: argparse.Namespace) -> int:
    if args.format == "log":
        if args.kafka_topic is not None or args.input is None:
            print(
                "stream-detector replay: a log bundle replays a file of raw lines: give --input FILE (replay from a "
                "topic is built for metric bundles).",
                file=sys.stderr,
            )
            return 2
        from stream_detector.offline.logreplay import run_log_replay_cli

        return run_log_replay_cli(args)
    try:
        settings, path = replay_settings(args)
        bundle: Bundle = load_bundle(path)
        detection = settings.detection.to_core()
        table = replay_input(args, settings, bundle)
        core = DetectorCore(bundle, Scorer.from_settings(bundle, settings), detection)
        summary = replay_table(core, table, args.out, batch_size=settings.runtime.max_batch)
    except (ConfigError, BundleError, DataFileError, ScorerError, ReplayError, TopicRangeError, ValueError) as e:
        print(f"stream-detector replay: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"stream-detector replay: cannot write the results ({e.strerror}: {e.filename}).", file=sys.stderr)
        return 2
    source = Path(table.source).name
    print(
        f"replayed {summary.rows} rows of {source} ({len(set(table.keys))} entities) on {summary.provider}: "
        f"{summary.scored} scored, {summary.opens} alerts opened ({summary.alerts} alert events); "
        f"{summary.rows_per_s:,.0f} rows/s, {summary.scored_per_s:,.0f} scored windows/s "
        f"({summary.seconds:.2f} s detection)"
    )
    if core.store.gap_restarts:
        print(
            f"{core.store.gap_restarts} time gaps (a step over {core.store.gap_factor:g}x the entity's typical one) "
            f"started a window again: the {bundle.window - 1} rows after each are not scored"
        )
    print(f"wrote {args.out / SCORES_FILE} and {args.out / ALERTS_FILE}")
    return 0
