"""`stream-detector-train fit`: data file or topic range -> windows -> Transformer autoencoder -> ONNX -> bundle.

Python API: `fit(settings: FitSettings) -> FitResult` (the bundle path and the figures). Steps:
read the file (stream_detector.offline.datafiles), size the settings not given to the data and plan
windows per entity (training.sizing, training.windows), fit the
`Normaliser` on training rows only, train (training.trainer), export and prove ONNX parity
(training.export), calibrate on validation windows through ONNX Runtime (training.calibrate),
then write model.onnx + bundle.json + report.png in one atomic `write_bundle`. Any failure
leaves BUNDLE_DIR as it was.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stream_detector.core.bundle import (
    INPUT_NAME,
    OUTPUT_NAME,
    SCHEMA_VERSION,
    Bundle,
    BundleError,
    Normaliser,
    ScoringRule,
    load_bundle,
    write_bundle,
)
from stream_detector.offline.datafiles import DataFileError
from training.meta import training_meta as build_training_meta
from training.settings import FitSettings, SettingsError, add_fit_arguments, read_toml, settings_from_args
from training.sizing import size_to_data
from training.source import read_training_table
from training.windows import WindowingError

log = logging.getLogger(__name__)

PARITY_WINDOWS = 1024  # held-out windows compared between ONNX Runtime and PyTorch


@dataclass(frozen=True)
class FitResult:
    bundle_dir: Path
    model_version: str
    best_val_loss: float
    parity_max_abs_diff: float
    threshold: float
    epochs_run: int
    train_windows_per_s: float
    seconds: float
    model: Any = None  # the trained torch module (CPU, eval mode), for callers that compare with ONNX


def fit(settings: FitSettings, command_line: str | None = None) -> FitResult:
    import torch

    from training.calibrate import calibrate, score_histogram, score_windows
    from training.export import check_parity, export_onnx
    from training.model import TransformerAutoencoder
    from training.report import render_report_png
    from training.trainer import pick_device, train

    t0 = time.perf_counter()
    s = settings
    _check_output(Path(s.out))  # fail before training, not after it
    table = read_training_table(s)  # a file, or a range of a topic read as the service reads it
    sizing = size_to_data(s, table)  # the settings not given, sized to what the data holds (training/sizing.py)
    s, plan = sizing.settings, sizing.plan
    normaliser = Normaliser.fit(plan.data[plan.train_rows], s.scale_floor, s.scale_floor_range)
    data = normaliser.apply(plan.data)
    n_entities = len(set(table.keys))
    log.info(
        "%s: %d rows, %d features, %d entities, %d segments (%d gaps); %d training / %d validation windows of %d",
        table.source,
        table.n_rows,
        len(table.features),
        n_entities,
        plan.n_segments,
        plan.n_gaps,
        plan.train_starts.size,
        plan.val_starts.size,
        s.window,
    )

    device = pick_device(s.device)
    if device.type == "cpu":
        torch.set_num_threads(s.threads or os.cpu_count() or 1)
    torch.manual_seed(s.seed)
    model = TransformerAutoencoder(
        len(table.features), s.window, s.d_model, s.n_heads, s.n_layers, s.ff_dim, s.dropout, s.variant, s.mask_steps
    )
    result = train(
        model,
        data,
        plan.train_starts,
        plan.val_starts,
        epochs=s.epochs,
        patience=s.patience,
        batch_size=s.batch_size,
        lr=s.lr,
        weight_decay=s.weight_decay,
        grad_clip=s.grad_clip,
        max_windows_per_epoch=s.max_windows_per_epoch,
        seed=s.seed,
        device=device,
        progress=s.progress,
    )
    model.to("cpu").eval()

    onnx_bytes = export_onnx(model, s.window, len(table.features), s.opset)
    sample = np.random.default_rng(s.seed).choice(
        plan.val_starts, size=min(PARITY_WINDOWS, plan.val_starts.size), replace=False
    )
    parity_windows = data[np.sort(sample)[:, None] + np.arange(s.window)]
    parity = check_parity(onnx_bytes, model, parity_windows, s.parity_tolerance)
    log.info("ONNX parity on %d held-out windows: max |ORT - PyTorch| = %.3g", len(parity_windows), parity)

    scoring = ScoringRule(model.scoring_positions)
    architecture = model.architecture()
    # The Transformer's relative errors and any simple detectors are computed in one graph (with one
    # feature, relative errors are the same score times a constant: nothing to compute)
    relative = s.feature_errors == "relative" and len(table.features) > 1
    if tuple(s.detectors) != ("transformer",) or relative:
        onnx_bytes, scoring, composite = build_composite(
            onnx_bytes, s.detectors, model.scoring_positions, data, plan, s, relative
        )
        architecture = {**architecture, "composite": composite}
    val = score_windows(onnx_bytes, data, plan.val_starts, s.window, scoring)
    calibration = calibrate(val.scores, s.threshold_quantile, plan.val_starts, plan.entities_of(plan.val_starts))
    if (level_range := calibration.level_range()) is not None:
        log.info(
            "calibrated in each entity's own frame: %d entities at %.3g to %.3g x the calibration's level",
            len(calibration.entity_levels or ()),
            *level_range,
        )

    import hashlib

    sha = hashlib.sha256(onnx_bytes).hexdigest()
    model_version = s.model_version or f"{s.variant}-{sha[:12]}"
    training_meta = build_training_meta(
        data_source=table.source,
        data_format=s.format,
        rows=table.n_rows,
        entities=n_entities,
        seed=s.seed,
        settings=s,
        command_line=command_line,
        api="training.fit.fit()",
        started=t0,
        segments=plan.n_segments,
        gaps=plan.n_gaps,
        missing_values=table.cleaning.to_json(),
        train_windows=int(plan.train_starts.size),
        val_windows=int(plan.val_starts.size),
        epochs=len(result.train_loss),
        best_epoch=result.best_epoch,
        best_val_loss=result.best_val_loss,
        interrupted=result.interrupted,
        early_stopped=result.early_stopped,
        history={"train_loss": result.train_loss, "val_loss": result.val_loss},
        device=result.device,
        train_seconds=round(result.seconds, 2),
        train_windows_per_s=round(result.windows_per_s, 1),
        parity_max_abs_diff=parity,
        parity_windows=int(len(parity_windows)),
        threshold_quantile=s.threshold_quantile,
        validation={
            "score_histogram": score_histogram(val.scores),
            "feature_error_mean": [float(v) for v in val.feature_errors.mean(axis=0)],
        },
        sized_to_data=sizing.chosen,  # settings not given and chosen unlike the defaults (a short history)
    )
    bundle = Bundle(
        path=Path(s.out),
        schema_version=SCHEMA_VERSION,
        model_version=model_version,
        features=table.features,
        window=s.window,
        normaliser=normaliser,
        scoring=scoring,
        calibration=calibration,
        model_sha256=sha,
        model=architecture,
        training=training_meta,
    )
    from training.export import ort_session

    bundle.check_session_io(ort_session(onnx_bytes))  # what the service's loader will check
    try:
        extra_files = {"report.png": render_report_png(bundle)}
    except ImportError:
        log.warning("matplotlib is not installed: no report.png")
        extra_files = {}
    write_bundle(
        s.out,
        onnx_bytes,
        model_version=model_version,
        features=list(table.features),
        window=s.window,
        normaliser=normaliser,
        scoring=scoring,
        calibration=calibration,
        model=architecture,
        training=training_meta,
        extra_files=extra_files,
    )
    load_bundle(s.out)  # the service's own checks, on what was written
    return FitResult(
        bundle_dir=Path(s.out),
        model_version=model_version,
        best_val_loss=result.best_val_loss,
        parity_max_abs_diff=parity,
        threshold=calibration.threshold,
        epochs_run=len(result.train_loss),
        train_windows_per_s=result.windows_per_s,
        seconds=time.perf_counter() - t0,
        model=model,
    )


def build_composite(
    onnx_bytes: bytes,
    detectors: tuple[str, ...],
    positions: tuple[int, ...],
    data: np.ndarray,
    plan: Any,
    s: FitSettings,
    relative: bool,
) -> tuple[bytes, ScoringRule, dict[str, Any]]:
    """The composite graph (training/composite.py): detectors fitted on the training windows,
    scaled on the validation windows, and proven against their numpy reference."""
    from training.composite import (
        SCORING,
        combined,
        composite_onnx,
        fit_components,
        with_error_scale,
        with_scales,
    )
    from training.export import ort_session

    rng = np.random.default_rng(s.seed)
    offsets = np.arange(s.window)
    train = (
        plan.train_starts
        if plan.train_starts.size <= 20000
        else np.sort(rng.choice(plan.train_starts, 20000, replace=False))
    )
    comps = fit_components(tuple(detectors), data[train[:, None] + offsets], positions)
    session = ort_session(onnx_bytes)
    val_x = np.ascontiguousarray(data[plan.val_starts[:, None] + offsets], dtype=np.float32)
    val_r = np.concatenate(
        [session.run([OUTPUT_NAME], {INPUT_NAME: val_x[i : i + 1024]})[0] for i in range(0, len(val_x), 1024)]
    )
    if relative:
        comps = with_error_scale(comps, val_x, val_r)
    comps = with_scales(comps, val_x, val_r)
    graph = composite_onnx(onnx_bytes, comps, data.shape[1])
    k = min(len(val_x), PARITY_WINDOWS)
    got = ort_session(graph).run([OUTPUT_NAME], {INPUT_NAME: val_x[:k]})[0]
    want = combined(comps, val_x[:k], val_r[:k])
    diff = float(np.max(np.abs(got - want) / (1.0 + np.abs(want)))) if k else 0.0
    if diff > 1e-3:
        raise BundleError(
            f"the composite graph differs from its numpy reference by {diff:.3g} (relative); not written."
        )
    log.info(
        "detectors %s, each divided by its validation 99%% quantile %s",
        ", ".join(comps.detectors),
        {k: round(v, 6) for k, v in comps.scales.items()},
    )
    return graph, SCORING, comps.describe()


def _check_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SettingsError(f"the output {out} exists and is not a directory.")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SettingsError(
            f"cannot create the output's parent directory {parent} ({(e.strerror or str(e)).lower()})."
        ) from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SettingsError(f"cannot write in {parent}, where the bundle would go.")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fit",
        help="train on a file of normal data and write a model bundle",
        description="Train a Transformer autoencoder on normal data, export it to ONNX, check parity, calibrate "
        "a threshold and write the bundle (model.onnx, bundle.json, report.png). Options can also come from a "
        "TOML file (--config); flags override it. Options given neither way are sized to the data: the window is "
        "the largest of 64, 32, 16, 8 that leaves at least 4 x W training and 20 validation windows, d_model the "
        "largest of 64, 32, 16, 8 whose square is at most the number of rows (ff_dim twice that), and a history "
        "of fewer than 2,048 training windows gets a smaller batch (8 or more steps an epoch); "
        "with plenty of data these are the defaults listed below. bundle.json records what was chosen.",
    )
    add_fit_arguments(p)
    from training.logsettings import add_log_arguments

    add_log_arguments(p)  # --format log: raw log lines (issue 8), trained by training/logs.py
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from training.export import ExportError
    from training.logsettings import log_only_options_given
    from training.trainer import TrainingInterrupted

    fmt = getattr(args, "format", None)
    if fmt is None and getattr(args, "config", None) is not None:
        try:  # format = "log" in the TOML file selects the log path too
            fmt = read_toml(args.config).get("format")
        except SettingsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if fmt == "log":
        from training.logs import handle_log_fit

        return handle_log_fit(args, shlex.join(["stream-detector-train", *sys.argv[1:]]))
    given = log_only_options_given(args)
    if given:
        print(f"error: the option {given[0]} applies only to --format log.", file=sys.stderr)
        return 2
    try:
        settings = settings_from_args(args)
        res = fit(settings, command_line=shlex.join(["stream-detector-train", *sys.argv[1:]]))
    except (SettingsError, DataFileError, WindowingError, BundleError, TrainingInterrupted) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. the bundle's parent directory is not writable, an unreadable file
        print(f"error: {e.filename or 'a file'}: {(e.strerror or str(e)).lower()}.", file=sys.stderr)
        return 2
    print(
        f"wrote {res.bundle_dir} (model_version {res.model_version}): best validation loss {res.best_val_loss:.5g} "
        f"after {res.epochs_run} epochs, ONNX parity {res.parity_max_abs_diff:.3g}, threshold {res.threshold:.5g}, "
        f"{res.train_windows_per_s:.0f} training windows/s, {res.seconds:.1f} s"
    )
    return 0
