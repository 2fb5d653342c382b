"""`stream-detector replay --format log`: a log file, in line order, through the log stage and the
same `DetectorCore` as `run`; per-entity decisions.

Writes into OUT:
- `scores.csv` — one line per scored row, in the order they were scored, written by
  `scoresfile.write_scores`: `row,key,score,threshold,alert,event,kind,template_id` (`row` = 0-based
  line number, -1 for a row that is no line; `kind` line / session-end / idle-check / ...);
- `alerts.jsonl` — contract-3 alert events, each with a `log` object (offending template, sample line);
- `entities.csv` — the decision per entity: `key,first_ms,last_ms,lines,alerted,first_alert_ms,
  first_alert_template,max_score` (what `evaluate --sessions` reads);
- `dead_letters.jsonl` — lines that could not be parsed, with the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from stream_detector.core.bundle import Bundle
from stream_detector.core.pipeline import DetectionSettings, DetectorCore
from stream_detector.core.scorer import Scorer
from stream_detector.logs.core import LogDetectorCore
from stream_detector.logs.spec import LogModelSpec, log_detection_settings
from stream_detector.logs.stage import LINE, ROW_KINDS, LogStage
from stream_detector.offline.scoresfile import LOG_COLUMNS, SCORES_FILE, write_scores

log = logging.getLogger(__name__)

ENTITIES_FILE = "entities.csv"
ENTITIES_HEADER = "key,first_ms,last_ms,lines,alerted,first_alert_ms,first_alert_template,max_score"


@dataclass(frozen=True)
class LogReplaySummary:
    lines: int
    rows: int
    scored: int
    dead: int
    entities: int
    alerted: int
    opens: int
    seconds: float  # log stage + detection (reading and writing files excluded)
    stage_seconds: float
    provider: str

    @property
    def lines_per_s(self) -> float:
        return self.lines / self.seconds if self.seconds > 0 else float("inf")


class _Entity:
    __slots__ = ("first_ms", "last_ms", "lines", "first_alert_ms", "first_alert_template", "max_score")

    def __init__(self, t: int) -> None:
        self.first_ms = t
        self.last_ms = t
        self.lines = 0
        self.first_alert_ms: int | None = None
        self.first_alert_template = ""
        self.max_score = 0.0


class _ScoreRows:
    """scores.csv's columns, gathered row by row."""

    def __init__(self) -> None:
        self.row: list[int] = []
        self.key: list[str] = []
        self.score: list[float] = []
        self.threshold: list[float] = []
        self.alert: list[bool] = []
        self.event: list[str | None] = []
        self.kind: list[str] = []
        self.template_id: list[int] = []

    def add(
        self,
        row: int,
        key: str,
        score: float,
        threshold: float,
        alert: bool,
        event: str | None,
        kind: str,
        template_id: int,
    ) -> None:
        self.row.append(row)
        self.key.append(key)
        self.score.append(score)
        self.threshold.append(threshold)
        self.alert.append(alert)
        self.event.append(event)
        self.kind.append(kind)
        self.template_id.append(template_id)

    def write(self, path: Path) -> None:
        columns: tuple[Sequence[object], ...] = (self.kind, self.template_id)
        extra = dict(zip(LOG_COLUMNS, columns))
        write_scores(path, self.row, self.key, self.score, self.threshold, self.alert, self.event, extra)


def replay_log(
    bundle: Bundle,
    spec: LogModelSpec,
    scorer: Scorer,
    settings: DetectionSettings,
    input_path: Path,
    out_dir: Path,
    batch_lines: int = 4096,
) -> LogReplaySummary:
    lines = input_path.read_bytes().splitlines()
    core = LogDetectorCore(DetectorCore(bundle, scorer, settings), spec)
    stage = LogStage(spec)
    topic = input_path.name
    entities: dict[str, _Entity] = {}
    alerts: list[dict[str, Any]] = []
    dead: list[tuple[int, str]] = []
    scores = _ScoreRows()
    rows = scored = 0
    stage_s = 0.0
    t0 = time.perf_counter()
    for start in range(0, len(lines) + 1, batch_lines):
        t1 = time.perf_counter()
        chunk = lines[start : start + batch_lines]
        if chunk:
            batch, bad = stage.feed(chunk, topic=topic, offset=np.arange(start, start + len(chunk)))
            dead.extend((start + i, r) for i, r in bad)
        else:  # end of input: incomplete sessions are closed without an end row
            stage.flush()
            break
        stage_s += time.perf_counter() - t1
        if batch.n == 0:
            continue
        res = core.process(batch)
        rows += batch.n
        scored += res.n_scored
        for k, t, kind in zip(batch.keys, batch.event_time_ms.tolist(), batch.kind.tolist()):
            e = entities.get(k)
            if e is None:
                e = entities[k] = _Entity(t)
            if kind == LINE:
                e.lines += 1
                e.last_ms = max(e.last_ms, t)
        for i, sc, thr, open_, ev in zip(
            res.index.tolist(), res.score.tolist(), res.threshold.tolist(), res.alert_open.tolist(), res.alert_event
        ):
            k = batch.keys[i]
            kind = int(batch.kind[i])
            e = entities[k]
            e.max_score = max(e.max_score, sc)
            if ev == "open" and e.first_alert_ms is None:
                e.first_alert_ms = int(batch.event_time_ms[i])
                e.first_alert_template = spec.token_text(int(batch.token[i]))
            scores.add(
                int(batch.offset[i]) if kind == LINE else -1,
                k,
                sc,
                thr,
                open_,
                ev,
                ROW_KINDS[kind],
                int(batch.token[i]),
            )
        alerts.extend(res.alerts)
    seconds = time.perf_counter() - t0

    out_dir.mkdir(parents=True, exist_ok=True)
    scores.write(out_dir / SCORES_FILE)
    with open(out_dir / "alerts.jsonl", "wb") as f:
        for a in alerts:
            f.write(orjson.dumps(a) + b"\n")
    with open(out_dir / "dead_letters.jsonl", "wb") as f:
        for i, r in dead:
            f.write(orjson.dumps({"row": i, "reason": r}) + b"\n")
    with open(out_dir / ENTITIES_FILE, "w", encoding="utf-8") as f:
        f.write(ENTITIES_HEADER + "\n")
        for k, e in entities.items():
            fa = "" if e.first_alert_ms is None else str(e.first_alert_ms)
            tmpl = e.first_alert_template.replace('"', '""')
            alerted_flag = int(e.first_alert_ms is not None)
            f.write(f'{k},{e.first_ms},{e.last_ms},{e.lines},{alerted_flag},{fa},"{tmpl}",{e.max_score:.6g}\n')
    opens = sum(a["state"] == "open" for a in alerts)
    alerted = sum(e.first_alert_ms is not None for e in entities.values())
    return LogReplaySummary(
        len(lines), rows, scored, len(dead), len(entities), alerted, opens, seconds, stage_s, scorer.provider
    )


def run_log_replay_cli(args: Any) -> int:
    """`replay --format log` (called by replay.run_cli): the settings of `run`, like a file replay."""
    import sys

    from stream_detector.config import ConfigError
    from stream_detector.core.bundle import BundleError, load_bundle
    from stream_detector.core.scorer import ScorerError
    from stream_detector.logs.spec import load_log_spec
    from stream_detector.offline.replay import replay_settings

    try:
        settings, path = replay_settings(args)
        bundle = load_bundle(path)
        spec = load_log_spec(bundle)
        detection = settings.detection.to_core()
        if not args.input.is_file():
            raise ValueError(f"input log file {args.input} does not exist.")
        scorer = Scorer.from_settings(bundle, settings)
        s = replay_log(
            bundle,
            spec,
            scorer,
            log_detection_settings(detection, spec),
            args.input,
            args.out,
            batch_lines=settings.runtime.max_batch,
        )
    except (ConfigError, BundleError, ScorerError, ValueError) as e:
        print(f"stream-detector replay: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"stream-detector replay: cannot read or write a file ({e.strerror}: {e.filename}).", file=sys.stderr)
        return 2
    print(
        f"replayed {s.lines} lines of {args.input.name} on {s.provider}: {s.entities} entities, {s.dead} unparseable "
        "lines, "
        f"{s.rows} rows, {s.scored} scored; {s.alerted} entities alerted ({s.opens} alerts opened); "
        f"{s.lines_per_s:,.0f} lines/s end to end ({s.stage_seconds:.2f} s log stage, {s.seconds:.2f} s total)"
    )
    print(f"wrote scores.csv, alerts.jsonl, {ENTITIES_FILE}, dead_letters.jsonl into {args.out}")
    return 0
