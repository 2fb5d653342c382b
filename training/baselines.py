"""Baseline detectors as ordinary model bundles: `stream-detector-train baseline --kind pca|zscore`.

A baseline is written as an ONNX graph with the bundle's contract (input `x` [batch, W, F] of
normalised rows, output `reconstruction` [batch, W, F]), so `replay` and the service run it with
exactly the same window store, rolling thresholds and alert logic as the Transformer — the
quality table compares models, not harnesses. Both graphs are built by hand with onnx.helper
(numpy fitting, no torch).

- `pca`: reconstruction error of each row from its projection on the top principal components of
  the normalised training rows (numpy SVD), enough components to explain `pca_variance` of the
  variance. Output row = mean + (x - mean) V_k V_k^T; score (mean squared error over features) of
  the newest row. The window is only the row itself plus one (W = 2 is enough).
- `zscore`: per feature, z = (x_newest - mean) / max(std, floor) against the window's earlier W-1
  rows; the graph outputs the earlier rows unchanged and x_newest - z as the newest row, so the
  per-feature squared error is z^2 and the bundle's `max_squared_error` reduction makes the score
  max_f z_f^2 (= (max |z|)^2; the rolling threshold only sees its order). The floor (in units of the
  training standard deviation) keeps a window of constant values from giving infinite z.

Calibration is the Transformer's (training.calibrate): validation windows scored through ONNX
Runtime, score quantiles and the `threshold_quantile` quantile as the suggested threshold.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stream_detector.core.bundle import (
    INPUT_NAME,
    OUTPUT_NAME,
    BundleError,
    Normaliser,
    ScoringRule,
    load_bundle,
    write_bundle,
)
from stream_detector.offline.datafiles import DataFileError, read_table
from training.meta import training_meta as build_training_meta
from training.windows import WindowingError, plan_windows

log = logging.getLogger(__name__)

ONNX_OPSET = 17
ONNX_IR_VERSION = 8  # opset 17 needs IR >= 8; ONNX Runtime 1.31 refuses IR 14 (onnx 1.23's default)


class BaselineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["pca", "zscore"] = Field(description="baseline model")
    data: Path = Field(description="input file of normal operation")
    out: Path = Field(description="bundle directory to write (replaced atomically)")
    format: Literal["auto", "csv", "parquet", "jsonl", "smd"] = Field("auto", description="input format")
    window: int | None = Field(None, ge=2, description="window length W (default: 2 for pca, 64 for zscore)")
    val_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="last fraction of each entity held out for calibration"
    )
    gap_factor: float = Field(3.0, gt=1.0, description="a time step longer than this x the median step is a gap")
    scale_floor: float = Field(1e-3, gt=0.0, description="smallest normaliser scale (constant features)")
    scale_floor_range: float = Field(
        0.03,
        ge=0.0,
        lt=1.0,
        description="also floor each scale at this fraction of the feature's training range (as fit does); 0: off",
    )
    pca_variance: float = Field(
        0.9, gt=0.0, le=1.0, description="pca: fraction of the training variance the kept components explain"
    )
    zscore_floor: float = Field(0.1, gt=0.0, description="zscore: smallest standard deviation, in normalised units")
    threshold_quantile: float = Field(
        0.999, gt=0.0, lt=1.0, description="validation score quantile used as the suggested threshold"
    )
    nan_policy: Literal["ffill", "drop", "error"] = Field(
        "ffill", description="missing values: forward-fill, drop rows, or refuse"
    )

    @property
    def effective_window(self) -> int:
        return self.window if self.window is not None else (2 if self.kind == "pca" else 64)


# ---------------------------------------------------------------------------------------------
# Models as ONNX graphs


def fit_pca(rows: np.ndarray, variance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean [F], components V_k [F, k], explained-variance ratio of each kept component)."""
    rows = np.asarray(rows, dtype=np.float64)
    mean = rows.mean(axis=0)
    _, sing, vt = np.linalg.svd(rows - mean, full_matrices=False)
    var = sing**2
    total = var.sum()
    ratio = var / total if total > 0 else np.zeros_like(var)
    k = int(np.searchsorted(np.cumsum(ratio), variance - 1e-12) + 1)
    k = max(1, min(k, vt.shape[0]))
    return mean, vt[:k].T, ratio[:k]


def pca_onnx(mean: np.ndarray, components: np.ndarray, window: int) -> bytes:
    """reconstruction = mean + (x - mean) @ (V V^T) on every row of the window."""
    from onnx import helper, numpy_helper

    f = mean.shape[0]
    projector = (components @ components.T).astype(np.float32)
    inits = [
        numpy_helper.from_array(mean.astype(np.float32), "mean"),
        numpy_helper.from_array(projector, "projector"),
    ]
    nodes = [
        helper.make_node("Sub", [INPUT_NAME, "mean"], ["centred"]),
        helper.make_node("MatMul", ["centred", "projector"], ["projected"]),
        helper.make_node("Add", ["projected", "mean"], [OUTPUT_NAME]),
    ]
    return _model_bytes(nodes, inits, window, f, "pca-baseline")


def zscore_onnx(window: int, n_features: int, floor: float) -> bytes:
    """Earlier rows unchanged; newest row x_newest - z with z against the earlier rows."""
    from onnx import helper, numpy_helper

    i64 = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    inits = [
        numpy_helper.from_array(i64([0]), "zero"),
        numpy_helper.from_array(i64([window - 1]), "last_start"),
        numpy_helper.from_array(i64([window]), "window_end"),
        numpy_helper.from_array(i64([1]), "time_axis"),
        numpy_helper.from_array(np.asarray(floor, dtype=np.float32), "floor"),
    ]
    nodes = [
        helper.make_node("Slice", [INPUT_NAME, "zero", "last_start", "time_axis"], ["earlier"]),
        helper.make_node("Slice", [INPUT_NAME, "last_start", "window_end", "time_axis"], ["newest"]),
        helper.make_node("ReduceMean", ["earlier"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["earlier", "mean"], ["dev"]),
        helper.make_node("Mul", ["dev", "dev"], ["dev2"]),
        helper.make_node("ReduceMean", ["dev2"], ["var"], axes=[1], keepdims=1),
        helper.make_node("Sqrt", ["var"], ["std"]),
        helper.make_node("Max", ["std", "floor"], ["std_floored"]),
        helper.make_node("Sub", ["newest", "mean"], ["newest_dev"]),
        helper.make_node("Div", ["newest_dev", "std_floored"], ["z"]),
        helper.make_node("Sub", ["newest", "z"], ["newest_out"]),
        helper.make_node("Concat", ["earlier", "newest_out"], [OUTPUT_NAME], axis=1),
    ]
    return _model_bytes(nodes, inits, window, n_features, "zscore-baseline")


def _model_bytes(nodes: list[Any], inits: list[Any], window: int, n_features: int, name: str) -> bytes:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", window, n_features])
    y = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", window, n_features])
    graph = helper.make_graph(nodes, name, [x], [y], initializer=inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="stream-detector"
    )
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


# ---------------------------------------------------------------------------------------------
# Fitting a bundle


def fit_baseline(s: BaselineSettings, command_line: str | None = None) -> Path:
    from training.calibrate import calibrate, score_windows

    t0 = time.perf_counter()
    window = s.effective_window
    table = read_table(s.data, s.format, None, None, None, s.nan_policy)
    plan = plan_windows(table, window, s.val_fraction, s.gap_factor)
    if plan.val_starts.size == 0:
        raise WindowingError(
            f"{table.source} leaves no validation window of {window} rows to calibrate on; use more rows."
        )
    normaliser = Normaliser.fit(plan.data[plan.train_rows], s.scale_floor, s.scale_floor_range)
    data = normaliser.apply(plan.data)
    f = len(table.features)
    if s.kind == "pca":
        mean, comps, ratio = fit_pca(data[plan.train_rows], s.pca_variance)
        onnx_bytes = pca_onnx(mean, comps, window)
        scoring = ScoringRule((-1,), "mean_squared_error")
        model_meta = {
            "kind": "pca-baseline",
            "components": int(comps.shape[1]),
            "explained_variance": float(ratio.sum()),
            "pca_variance": s.pca_variance,
        }
    else:
        onnx_bytes = zscore_onnx(window, f, s.zscore_floor)
        scoring = ScoringRule((-1,), "max_squared_error")
        model_meta = {"kind": "zscore-baseline", "zscore_floor": s.zscore_floor, "score": "max over features of z^2"}
    val = score_windows(onnx_bytes, data, plan.val_starts, window, scoring)
    calibration = calibrate(val.scores, s.threshold_quantile, plan.val_starts, plan.entities_of(plan.val_starts))
    sha = hashlib.sha256(onnx_bytes).hexdigest()
    model_version = f"{s.kind}-{sha[:12]}"
    training_meta = build_training_meta(
        data_source=table.source,
        data_format=s.format,
        rows=table.n_rows,
        entities=len(set(table.keys)),
        seed=None,  # deterministic: no randomness in either baseline
        settings=s,
        command_line=command_line,
        api="training.baselines.fit_baseline()",
        started=t0,
        train_rows=int(plan.train_rows.sum()),
        val_windows=int(plan.val_starts.size),
        missing_values=table.cleaning.to_json(),
        epochs=0,
        threshold_quantile=s.threshold_quantile,
    )
    write_bundle(
        s.out,
        onnx_bytes,
        model_version=model_version,
        features=list(table.features),
        window=window,
        normaliser=normaliser,
        scoring=scoring,
        calibration=calibration,
        model=model_meta,
        training=training_meta,
    )
    load_bundle(s.out)  # the service's own checks, on what was written
    log.info("%s baseline: %s, threshold %.5g", s.kind, model_meta, calibration.threshold)
    return Path(s.out)


# ---------------------------------------------------------------------------------------------
# Command line


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "baseline",
        help="fit a PCA or rolling z-score baseline and write it as a model bundle",
        description="Fit a baseline detector on normal data and write it as an ordinary model bundle, so replay and "
        "the service run it with the same windows, thresholds and alerts as the Transformer.",
    )
    for name, info in BaselineSettings.model_fields.items():
        default = "" if info.is_required() else f" (default {info.default})"
        p.add_argument(
            "--" + name.replace("_", "-"), dest=name, required=info.is_required(), help=f"{info.description}{default}"
        )
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    values = {k: getattr(args, k) for k in BaselineSettings.model_fields if getattr(args, k, None) is not None}
    try:
        settings = BaselineSettings(**values)
    except ValidationError as e:
        err = e.errors()[0]
        print(
            f"error: setting {'.'.join(str(p) for p in err['loc'])!r}: {err['msg']} (got {err.get('input')!r}).",
            file=sys.stderr,
        )
        return 2
    try:
        out = fit_baseline(settings, command_line=shlex.join(["stream-detector-train", *sys.argv[1:]]))
    except (DataFileError, WindowingError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({settings.kind} baseline)")
    return 0
