"""`stream-detector-train retrain`: fit a candidate on the last span of the topic, backtest it against
the live model on a more recent held-out span, and promote it only if it passes the gate.

    stream-detector-train retrain --config run.toml --models /var/lib/stream-detector/models \\
        [--kafka-topic T] [--train 7d] [--holdout 1d] [--labels incidents.jsonl] [--candidate BUNDLE]

- **The live model** is `MODELS/current`, a symlink to a version directory; the service's
  `[model] bundle` points at `MODELS/current`, and its watch (service/reload.py) loads whatever the
  link points at, without a restart, once it has held still for a poll.
- **The candidate** is fit (training/fit.py) with the live bundle's own recipe (the training
  settings recorded in its bundle.json: window, features, model size, detectors, ...; `--fit-config`
  overrides any of them) on `[now - holdout - train, now - holdout)` of the topic, read through the
  service's decoder with the run TOML's [kafka] and [input] (training/source.py). `--candidate`
  gates a bundle made elsewhere instead.
- **The backtest** replays both bundles on `[now - holdout, now)` with the run TOML's [detection]
  (offline/replay.py); outputs go to `MODELS/.retrain/{live,candidate}/`.
- **The gate** is training/gate.py's rule. Promotion moves the candidate to `MODELS/<model_version>`
  and re-points `MODELS/current` with an atomic rename of a new symlink. Every run writes
  `MODELS/retrain-report.json` (decision, reason, both backtests, the spans).

Exit codes: 0 promoted, 3 refused (the live model stays), 2 bad input (one sentence, nothing
promoted): no live model, a candidate whose features or window differ from the live model's, an
unreachable broker, a missing topic, an empty span.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from stream_detector.config import ConfigError, load_settings
from stream_detector.core.alerts import iso_utc
from stream_detector.core.bundle import Bundle, BundleError, load_bundle
from stream_detector.core.pipeline import DetectorCore
from stream_detector.core.scorer import Scorer, ScorerError
from stream_detector.ingest.topic_range import TopicRangeError, duration_ms, parse_bound
from stream_detector.offline.datafiles import DataFileError
from stream_detector.offline.incidents import LabelsError, read_labels
from stream_detector.offline.replay import ALERTS_FILE, ReplayError, replay_table
from training.gate import MAX_EXTRA_PAGES, backtest, decide
from training.settings import FitSettings, SettingsError, make_settings, read_toml

log = logging.getLogger(__name__)

LIVE_LINK = "current"
REPORT_FILE = "retrain-report.json"
PROMOTED, REFUSED, BAD_INPUT = 0, 3, 2
# Recorded training settings that describe where the data came from, not how the model is made.
_NOT_RECIPE = (
    "data",
    "out",
    "kafka_topic",
    "since",
    "until",
    "kafka",
    "input",
    "format",
    "key_field",
    "timestamp_field",
    "nan_policy",
    "model_version",
    "progress",
)


class RetrainError(Exception):
    """Retrain cannot run; one sentence for the operator."""


@dataclass(frozen=True)
class RetrainRun:
    """What one retrain works with, fixed at its start."""

    args: argparse.Namespace
    models: Path  # MODELS
    link: Path  # MODELS/current
    live: Bundle
    settings: Any  # the run TOML's Settings
    raw: dict[str, Any]  # the run TOML as written (the candidate's recipe reads [kafka]/[input] from it)
    topic: str
    spans: dict[str, tuple[str, str]]  # "train" and "holdout": (since, until), ISO
    labels: Any  # offline/incidents.py labels, or None
    work: Path  # MODELS/.retrain: the candidate while it is fit, the backtests' outputs
    stamp: str  # UTC time of the run, for names that must not collide


def retrain(args: argparse.Namespace) -> int:
    run = _start(args)
    try:
        candidate_dir, candidate = _candidate(run)
        results = _backtest(run, candidate)
        promote, reason = decide(results["live"], results["candidate"], args.max_extra_pages)
        target = _promote(run, candidate_dir, candidate) if promote else None
    except BaseException:
        shutil.rmtree(run.work, ignore_errors=True)  # bad input leaves nothing behind
        raise
    _report(run, results, promote, reason, target)
    print(f"live      {results['live'].line()}")
    print(f"candidate {results['candidate'].line()}")
    if promote:
        print(f"promoted {candidate.model_version}: {reason} {run.link} -> {target.name if target else ''}")
        return PROMOTED
    print(f"refused {candidate.model_version}: {reason} The live model {run.live.model_version} stays.")
    return REFUSED


def _start(args: argparse.Namespace) -> RetrainRun:
    models = Path(args.models)
    link = models / LIVE_LINK
    if not link.is_symlink():
        raise RetrainError(
            f"{link} is not a symlink to a version directory; make it one (ln -s VERSION {link}) and point the "
            "service's [model] bundle at it."
        )
    live = load_bundle(link)
    settings = load_settings(args.config)
    raw = read_toml(Path(args.config)) if args.config else {}
    topic = args.kafka_topic or (settings.kafka.topics[0] if settings.kafka.topics else None)
    if topic is None:
        raise RetrainError("no topic: pass --kafka-topic or set [kafka] topics in the run TOML.")
    now_ms = parse_bound(args.now, "latest").value if args.now else int(time.time() * 1000)
    holdout_ms = _duration_ms(args.holdout, "--holdout")
    train_ms = _duration_ms(args.train, "--train")
    spans = {
        "train": (iso_utc(now_ms - holdout_ms - train_ms), iso_utc(now_ms - holdout_ms)),
        "holdout": (iso_utc(now_ms - holdout_ms), iso_utc(now_ms)),
    }
    labels = read_labels(args.labels) if args.labels else None
    work = models / ".retrain"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return RetrainRun(args, models, link, live, settings, raw, topic, spans, labels, work, stamp)


def _candidate(run: RetrainRun) -> tuple[Path, Bundle]:
    """The candidate bundle (fit now, or --candidate), refused unless the live service could load it."""
    if run.args.candidate:
        candidate_dir = Path(run.args.candidate)
        candidate = load_bundle(candidate_dir)
    else:
        from training.fit import fit

        candidate_dir = run.work / "candidate-bundle"
        fit_settings = _recipe(run.live, run.raw, run.topic, run.spans["train"], candidate_dir, run.args.fit_config)
        log.info("fitting the candidate on %s from %s to %s", run.topic, *run.spans["train"])
        candidate = load_bundle(fit(fit_settings).bundle_dir)
    live = run.live
    if tuple(candidate.features) != tuple(live.features) or candidate.window != live.window:
        raise RetrainError(
            f"the candidate {candidate.model_version} reads other features or another window than the live model "
            f"{live.model_version} ({len(candidate.features)} features, window {candidate.window}, against "
            f"{len(live.features)} and {live.window}); the running service could not load it without a restart."
        )
    return candidate_dir, candidate


def _backtest(run: RetrainRun, candidate: Bundle) -> dict[str, Any]:
    """Both bundles replayed on the held-out span with the run TOML's [detection]."""
    from stream_detector.offline.topic_table import read_topic_table

    settings = run.settings
    table, r = read_topic_table(settings, run.topic, *run.spans["holdout"], run.live.features)
    log.info("held-out span: %s", r.summary())
    if table.n_rows == 0:
        raise RetrainError(f"{r.summary()}; nothing to backtest on.")
    results = {}
    for name, bundle in (("live", run.live), ("candidate", candidate)):
        core = DetectorCore(bundle, Scorer.from_settings(bundle, settings), settings.detection.to_core())
        replay_table(core, table, run.work / name, batch_size=settings.runtime.max_batch)
        alerts = [orjson.loads(x) for x in (run.work / name / ALERTS_FILE).read_bytes().splitlines() if x.strip()]
        results[name] = backtest(bundle.model_version, alerts, table, bundle.window, run.labels)
    return results


def _promote(run: RetrainRun, candidate_dir: Path, candidate: Bundle) -> Path:
    """The candidate into MODELS/<version>, then MODELS/current re-pointed at it atomically."""
    target = run.models / candidate.model_version
    if target.exists():
        target = run.models / f"{candidate.model_version}-{run.stamp}"
    if run.args.candidate:
        shutil.copytree(candidate_dir, target)
    else:
        os.rename(candidate_dir, target)
    tmp_link = run.models / f".{LIVE_LINK}-{run.stamp}"
    os.symlink(target.name, tmp_link)
    os.replace(tmp_link, run.link)  # atomic: the watch sees the old target or the new one, never neither
    return target


def _report(run: RetrainRun, results: dict[str, Any], promote: bool, reason: str, target: Path | None) -> None:
    report = {
        "decision": "promoted" if promote else "refused",
        "reason": reason,
        "topic": run.topic,
        "spans": run.spans,
        "live": results["live"].to_json(),
        "candidate": results["candidate"].to_json(),
        "promoted_to": str(target) if target else None,
        "labels": run.args.labels,
        "at": iso_utc(int(time.time() * 1000)),
    }
    (run.models / REPORT_FILE).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))


def _recipe(
    live: Bundle, raw: dict[str, Any], topic: str, span: tuple[str, str], out: Path, fit_config: str | None
) -> FitSettings:
    recorded = (live.training or {}).get("settings", {})
    values = {k: v for k, v in recorded.items() if k in FitSettings.model_fields and k not in _NOT_RECIPE}
    values.update({"features": list(live.features), "window": live.window})
    if fit_config:
        values.update({k: v for k, v in read_toml(Path(fit_config)).items() if k not in _NOT_RECIPE})
    values.update(
        {
            "kafka_topic": topic,
            "since": span[0],
            "until": span[1],
            "kafka": raw.get("kafka"),
            "input": raw.get("input"),
            "out": out,
            "progress": False,
        }
    )
    return make_settings(values)


def _duration_ms(text: str, flag: str) -> int:
    ms = duration_ms(text) or 0
    if ms <= 0:
        raise RetrainError(f"{flag} {text!r} is not a duration such as 90m, 6h, 7d or 2w.")
    return ms


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "retrain",
        help="fit a candidate on the topic's last span, backtest it against the live model, promote it if better",
        description="Fit a candidate with the live bundle's recipe on [now - holdout - train, now - holdout) of the "
        "topic, replay it and the live bundle on [now - holdout, now) with the service's detection settings, and "
        "promote it (MODELS/current re-pointed atomically; the running service's watch loads it) only if it does "
        "not page more without catching more (training/gate.py). Exit 0 promoted, 3 refused, 2 bad input.",
    )
    p.add_argument("--config", required=True, help="the run TOML of the service ([kafka], [input], [detection])")
    p.add_argument("--models", required=True, help="directory of model versions; MODELS/current is the live one")
    p.add_argument("--kafka-topic", help="topic to train and backtest on (default: the first of [kafka] topics)")
    p.add_argument("--train", default="7d", help="span to fit on, before the held-out span (default 7d)")
    p.add_argument("--holdout", default="1d", help="most recent span, for the backtest only (default 1d)")
    p.add_argument("--now", help="end of the held-out span (default: now); an ISO-8601 time")
    p.add_argument("--labels", help="incidents in the held-out span (JSON lines: entity, start_ms, end_ms)")
    p.add_argument(
        "--max-extra-pages",
        type=float,
        default=MAX_EXTRA_PAGES,
        help=f"without labels: fraction of extra alerts a candidate may open (default {MAX_EXTRA_PAGES})",
    )
    p.add_argument("--candidate", help="gate this bundle instead of fitting one")
    p.add_argument("--fit-config", help="TOML of fit settings that override the live bundle's recipe")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from training.trainer import TrainingInterrupted
    from training.windows import WindowingError

    try:
        return retrain(args)
    except (
        RetrainError,
        ConfigError,
        BundleError,
        SettingsError,
        DataFileError,
        TopicRangeError,
        LabelsError,
        ScorerError,
        ReplayError,
        WindowingError,
        TrainingInterrupted,
    ) as e:
        print(f"error: {str(e).rstrip('.')}.", file=sys.stderr)
        return BAD_INPUT
    except OSError as e:
        print(f"error: {e.filename or 'a file'}: {(e.strerror or str(e)).lower()}.", file=sys.stderr)
        return BAD_INPUT
