"""`stream-detector-train fit --format log`: raw log lines → template set + log model → bundle.

Two models (`log_model`): `counts` (the default; training/logcounts.py: cumulative template-count
vectors per entity, PCA reconstruction per row kind, idle checks; layout `template-counts/1`) and
`sequence` (training/logseq.py: a causal Transformer over template ids trained by the shared loop
of training/trainer.py; layout `template-context/1`). The default was chosen by measurement on the
HDFS benchmark (docs/quality.md, Logs).

Settings (`LogFitSettings`): `fit`'s flags and the flat keys of its TOML file (`--config`, with
`format = "log"`), flags over the file. They include every field of the line parser's
`LogParserConfig` (`PARSER_SETTINGS`; `format` is `log_format`), which the bundle stores, so `run`
and `replay` read lines as training did; `--bucket` gives the count model per time bucket (layout
`template-bucket-counts/1`, docs/logs.md). Settings that cannot work end in one `LogTrainingError`
sentence, the first lines of the file included (`check_first_lines`: a timestamp that does not read
as its format names its line). `stream-detector-train logformat` (training/logformat.py) is the dry
run of the same parser settings.

Steps: read the lines; drop the entities a label file marks anomalous (or keep only a list of
normal ones); mine templates with drain3 on the kept lines (`TemplateMiner`), freeze them; run the
kept lines through the very `LogStage` the service uses, which gives the model's input rows
(layout in stream_detector/logs/spec.py); hold out the entities whose first event is latest
(`val_fraction`) for early stopping and calibration; fit the model; export to ONNX and prove
parity; calibrate on the held-out sessions; write the bundle with its `logs` section and
templates.json.

Calibration is per session, because an entity is flagged when any of its events alerts: the
suggested threshold is the `threshold_quantile` quantile of the held-out sessions' largest event
score (their end rows included) times `threshold_margin`, and at least the model's floor
(`threshold_floor` nats for the sequence model: an event the model gives 1 % or more never alerts,
however regular the training data was; `count_threshold_floor` for the count model). Both models
share this calibration (`session_calibration`), the bundle writer (`write_log_bundle`) and the
`training` metadata (training/meta.py).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stream_detector.core.bundle import Calibration, Normaliser, ScoringRule, load_bundle, write_bundle
from stream_detector.logs.features import LogFeatureConfigError, make_feature_config
from stream_detector.logs.parse import (
    LineParser,
    LogConfigError,
    LogLineError,
    check_first_lines,
)
from stream_detector.logs.spec import BUCKET_COUNTS_LAYOUT, COUNTS_LAYOUT, LAYOUT, WINDOW, LogModelSpec
from stream_detector.logs.stage import START, LogStage
from stream_detector.logs.templates import TemplateConfigError, TemplateMiner, make_template_config
from training.logsettings import LogFitSettings, LogTrainingError, log_settings_from_args, parser_config

log = logging.getLogger(__name__)

LOG_SCORING = ScoringRule(positions=(-1,), reduction="model_error")


@dataclass(frozen=True)
class LogFitResult:
    bundle_dir: Path
    model_version: str
    templates: int
    train_rows: int
    val_rows: int
    best_val_loss: float
    threshold: float
    parity_max_abs_diff: float
    seconds: float


def read_lines(path: Path) -> list[bytes]:
    try:
        return path.read_bytes().splitlines()
    except FileNotFoundError:
        raise LogTrainingError(f"log file {path} does not exist.") from None
    except OSError as e:
        raise LogTrainingError(f"cannot read log file {path} ({e.strerror}).") from None


def read_labels(path: Path) -> tuple[str, set[str]]:
    """('exclude', anomalous entities) for a CSV with a label column, ('keep', entities) for a plain
    list of normal entities, one per line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LogTrainingError(f"label file {path} does not exist.") from None
    rows = [r for r in csv.reader(text.splitlines()) if r and r[0].strip()]
    if not rows:
        raise LogTrainingError(f"label file {path} is empty.")
    if len(rows[0]) == 1:
        return "keep", {r[0].strip() for r in rows}
    header = [h.strip().lower() for h in rows[0]]
    if "label" not in header:
        raise LogTrainingError(f"label file {path} has several columns but none named 'Label'.")
    li = header.index("label")
    bad = {
        r[0].strip()
        for r in rows[1:]
        if len(r) > li and r[li].strip().lower() in ("anomaly", "anomalous", "abnormal", "1", "true")
    }
    return "exclude", bad


def _keep_lines(
    lines: list[bytes], parser: LineParser, labels: tuple[str, set[str]] | None
) -> tuple[list[bytes], list[Any], int]:
    kept, parsed, unusable = [], [], 0
    for raw in lines:
        try:
            p = parser.parse(raw)
        except LogLineError:
            unusable += 1
            continue
        if labels is not None:
            mode, ids = labels
            ok = all((e in ids) == (mode == "keep") for e in p.entities)
            if not ok:
                continue
        kept.append(raw)
        parsed.append(p)
    return kept, parsed, unusable


@dataclass(frozen=True)
class LogTrainingData:
    """What either log model is fitted and calibrated on: the log stage's rows for the kept lines,
    and which of them belong to the held-out entities."""

    spec: LogModelSpec
    batch: Any  # the LogStage's output: rows, kind, keys, event_time_ms
    is_val: np.ndarray  # [n] bool: the row belongs to a held-out entity
    val_all: np.ndarray  # indices of every scored row of the held-out sessions
    lines: int
    lines_used: int
    lines_unparseable: int
    entities: int
    validation_entities: int
    started: float  # time.perf_counter() when the fit began


def fit_log(s: LogFitSettings, command_line: str | None = None) -> LogFitResult:
    t0 = time.perf_counter()
    counts = s.log_model == "counts"
    timeout = s.session_timeout_s or (86_400.0 if counts else 3_600.0)
    if s.bucket_s is not None and not counts:
        raise LogTrainingError("bucket_s (--bucket) applies only to log_model 'counts'.")
    # with time buckets, idle checks only when asked for: a line is judged against its bucket already
    idle = s.idle_check_s if counts and (s.bucket_s is None or "idle_check_s" in s.model_fields_set) else None
    try:
        parser_cfg = parser_config(s)
        parser = LineParser(parser_cfg)
        feature_cfg = make_feature_config(
            session_timeout_s=timeout, idle_check_s=idle, bucket_s=s.bucket_s if counts else None
        )
        template_cfg = make_template_config()
    except (LogConfigError, LogFeatureConfigError, TemplateConfigError) as e:
        raise LogTrainingError(str(e)) from None
    if s.d_model % s.n_heads:
        raise LogTrainingError(f"d_model ({s.d_model}) must be a multiple of n_heads ({s.n_heads}).")
    labels = read_labels(s.labels) if s.labels is not None else None
    lines = read_lines(s.data)
    try:
        parsed_head, timed_head = check_first_lines(parser, lines, str(s.data))
    except LogConfigError as e:
        raise LogTrainingError(str(e)) from None
    if parsed_head and not timed_head:
        raise LogTrainingError(
            f"the first lines of {s.data} carry no timestamp with these settings, and training needs each line's "
            "time (give the line regex a 'timestamp' group, or set timestamp_field for jsonl/logfmt)."
        )
    kept, parsed, unusable = _keep_lines(lines, parser, labels)
    if not kept:
        raise LogTrainingError(
            f"no usable training lines in {s.data} ({unusable} of {len(lines)} lines do not parse as "
            f"{parser_cfg.format})."
        )
    miner = TemplateMiner(template_cfg)
    for p in parsed:
        miner.learn(p.message)
    templates = miner.freeze()
    layout = (BUCKET_COUNTS_LAYOUT if s.bucket_s is not None else COUNTS_LAYOUT) if counts else LAYOUT
    spec = LogModelSpec(parser_cfg, feature_cfg, templates, 0 if counts else s.context, layout)
    log.info(
        "%s: %d lines, %d used for training (%d unparseable), %d templates",
        s.data,
        len(lines),
        len(kept),
        unusable,
        templates.vocab_size - 1,
    )

    stage = LogStage(spec)
    batch, _ = stage.feed(kept)
    stage.flush()
    first_seen: dict[str, int] = {}
    for k, t in zip(batch.keys, batch.event_time_ms.tolist()):
        first_seen.setdefault(k, t)
    order = sorted(first_seen, key=lambda e: first_seen[e])
    n_val = max(1, int(round(len(order) * s.val_fraction)))
    if len(order) - n_val < 1:
        raise LogTrainingError(
            f"only {len(order)} entities in the training lines: "
            f"too few to hold {s.val_fraction:.0%} out for calibration."
        )
    val_entities = set(order[-n_val:])
    is_val = np.fromiter((k in val_entities for k in batch.keys), dtype=bool, count=batch.n)
    val_all = np.flatnonzero(is_val & (batch.kind != START))  # every scored row of the held-out sessions
    d = LogTrainingData(spec, batch, is_val, val_all, len(lines), len(kept), unusable, len(order), n_val, t0)
    if counts:
        return _fit_counts(s, d, command_line)
    from training.logseq import fit_sequence

    return fit_sequence(s, d, command_line)


def score_rows(session: Any, rows: np.ndarray, idx: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [n], newest output rows [n, F]) of the rows at `idx`, each fed as a window of two
    copies of itself, through ONNX Runtime and the bundle's scoring rule as the service scores."""
    scores = np.zeros(idx.size, dtype=np.float32)
    newest = np.zeros((idx.size, rows.shape[1]), dtype=np.float32)
    for i in range(0, idx.size, chunk):
        part = idx[i : i + chunk]
        x = np.ascontiguousarray(np.stack([rows[part], rows[part]], axis=1))
        r = session.run(None, {"x": x})[0]
        newest[i : i + part.size] = r[:, -1, :]
        scores[i : i + part.size] = LOG_SCORING.scores(x, r)[0]
    return scores, newest


def session_calibration(keys: list[str], scores: np.ndarray, s: LogFitSettings, floor: float) -> Calibration:
    """Calibration per session (an entity is flagged when any of its events alerts): the suggested
    threshold is the `threshold_quantile` quantile of the held-out sessions' largest score times
    `threshold_margin`, at least `floor`. No fitted tail: log bundles use the quantile threshold."""
    from training.logcounts import entity_max

    session_max = entity_max(keys, scores) if scores.size else np.zeros(1)
    threshold = float(np.quantile(session_max, s.threshold_quantile)) * s.threshold_margin
    qs = {str(q): float(np.quantile(scores, q)) for q in (0.9, 0.99, 0.999, 0.9999)} if scores.size else {}
    qs["1.0"] = float(scores.max(initial=0.0))
    qs.update({f"session_{q}": float(np.quantile(session_max, q)) for q in (0.5, 0.9, 0.99, 1.0)})
    return Calibration(qs, max(threshold, floor, 1e-6), int(scores.size))


def write_log_bundle(
    s: LogFitSettings,
    d: LogTrainingData,
    onnx_bytes: bytes,
    prefix: str,
    features: list[str],
    calibration: Calibration,
    arch: dict[str, Any],
    command_line: str | None,
    **extras: Any,
) -> str:
    """Write a log model's bundle (its `logs` section and templates.json, identity normaliser: ids
    and counts reach the graph as they are), check it as the service will; returns the model version."""
    from stream_detector.logs.spec import load_log_spec
    from training.meta import training_meta

    model_version = s.model_version or f"{prefix}-{hashlib.sha256(onnx_bytes).hexdigest()[:12]}"
    extra, extra_files = d.spec.to_extra()
    meta = training_meta(
        data_source=s.data,
        data_format="log",
        rows=d.batch.n,
        entities=d.entities,
        seed=s.seed,
        settings=s,
        command_line=command_line,
        api="training.logs.fit_log()",
        started=d.started,
        model=s.log_model,
        lines=d.lines,
        lines_used=d.lines_used,
        lines_unparseable=d.lines_unparseable,
        labels=None if s.labels is None else str(s.labels),
        validation_entities=d.validation_entities,
        **extras,
    )
    f = len(features)
    identity = Normaliser(np.zeros(f, np.float32), np.ones(f, np.float32), 1e-3)
    write_bundle(
        s.out,
        onnx_bytes,
        model_version=model_version,
        features=features,
        window=WINDOW,
        normaliser=identity,
        scoring=LOG_SCORING,
        calibration=calibration,
        model=arch,
        training=meta,
        extra=extra,
        extra_files=extra_files,
    )
    load_log_spec(load_bundle(s.out))  # the service's own checks, on what was written
    return model_version


def _fit_counts(s: LogFitSettings, d: LogTrainingData, command_line: str | None) -> LogFitResult:
    from training.export import ort_session
    from training.logcounts import count_model_onnx, fit_count_branches, reference_errors

    spec, batch, rows = d.spec, d.batch, d.batch.rows
    try:
        line, idle, info = fit_count_branches(
            rows, batch.kind, batch.keys, d.is_val, s.count_variance, s.count_scale_floor, s.count_min_scale
        )
    except ValueError as e:
        raise LogTrainingError(str(e)) from None
    floor = s.count_threshold_floor if spec.bucketed else 0.0  # see count_model_onnx
    onnx_bytes = count_model_onnx(line, idle, spec.vocab_size, floor)
    scores, newest = score_rows(ort_session(onnx_bytes), rows, d.val_all, 4096)
    parity = 0.0
    for i in range(0, d.val_all.size, 4096):
        part = d.val_all[i : i + 4096]
        diff = np.abs(newest[i : i + part.size] - reference_errors(rows[part], line, idle, floor))
        if floor > 0:  # a row scoring the floor itself within float32 rounding may fall either side of it
            total = reference_errors(rows[part], line, idle).sum(axis=1)
            diff[np.abs(total - floor) <= 1e-4 * (1.0 + floor)] = 0.0
        parity = max(parity, float(diff.max(initial=0.0)))
    if parity > s.parity_tolerance:
        raise LogTrainingError(
            f"the count model's ONNX graph differs from its numpy reference by {parity:.3g} "
            f"(tolerance {s.parity_tolerance})."
        )
    calibration = session_calibration([batch.keys[i] for i in d.val_all.tolist()], scores, s, s.count_threshold_floor)
    arch = {
        "kind": "log_template_counts_pca",
        "templates": spec.vocab_size,
        "variance": s.count_variance,
        "scale_floor": s.count_scale_floor,
        "min_scale": s.count_min_scale,
        **({"bucket_s": s.bucket_s, "score_floor": floor} if spec.bucketed else {}),
        "branches": info,
    }
    n_train = int(((batch.kind != START) & ~d.is_val).sum())
    model_version = write_log_bundle(
        s,
        d,
        onnx_bytes,
        "logcounts",
        spec.feature_names(),
        calibration,
        arch,
        command_line,
        train_rows=n_train,
        val_rows=int(d.val_all.size),
        parity_max_abs_diff=parity,
    )
    return LogFitResult(
        Path(s.out),
        model_version,
        spec.vocab_size - 1,
        n_train,
        int(d.val_all.size),
        math.nan,
        calibration.threshold,
        parity,
        time.perf_counter() - d.started,
    )


# ---------------------------------------------------------------------- command line (fit --format log)
# fit's own flags (training/settings.py) that mean the same for a log model; their dest is the field name
def handle_log_fit(args: argparse.Namespace, command_line: str) -> int:
    import sys

    from stream_detector.core.bundle import BundleError
    from training.export import ExportError

    try:
        res = fit_log(log_settings_from_args(args), command_line)
    except (LogTrainingError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. a label file that is a directory, an output that cannot be written
        print(f"error: {e.filename or 'a file'}: {(e.strerror or str(e)).lower()}.", file=sys.stderr)
        return 2
    print(
        f"wrote {res.bundle_dir} (model_version {res.model_version}): {res.templates} templates, "
        f"{res.train_rows} training / "
        f"{res.val_rows} validation rows, "
        f"{'' if math.isnan(res.best_val_loss) else f'best validation loss {res.best_val_loss:.4g}, '}"
        f"ONNX parity {res.parity_max_abs_diff:.3g}, "
        f"session threshold {res.threshold:.4g}, {res.seconds:.1f} s"
    )
    return 0
