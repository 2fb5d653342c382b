"""The model bundle (DESIGN.md contract 1): a directory with `model.onnx` and `bundle.json`.

This module is the single owner of the format. Training writes bundles with `write_bundle`; the
service, `replay` and training's own validation read them with `load_bundle`. numpy and
onnxruntime only: the runtime never imports torch. No pickle anywhere.

Scoring rule: the model maps a normalised window x[W, F] to its reconstruction r[W, F]. The score
of the window's newest event is the squared error averaged over the positions named by
`ScoringRule.positions` (negative indices from the window's end, e.g. [-1]), then reduced over the
features by `ScoringRule.reduction`: `mean_squared_error` (the default: mean over features) or
`max_squared_error` (the largest feature's error, used by the rolling z-score baseline); the
per-feature error at those positions gives the alert's `top_features`. `model_error` is for
models whose output already *is* a per-position, per-feature error (the log sequence model puts
the negative log-likelihood of the observed template there): the per-feature error is the output
averaged over the scoring positions, and the score is its sum over features.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

SCHEMA_VERSION = 1
MODEL_FILE = "model.onnx"
BUNDLE_FILE = "bundle.json"
INPUT_NAME = "x"
OUTPUT_NAME = "reconstruction"


class BundleError(Exception):
    """A bundle that cannot be used; the message is one sentence meant for the operator."""


@dataclass(frozen=True)
class Normaliser:
    """Per-feature affine normalisation fitted on training data: (x - center) / scale."""

    center: np.ndarray  # float32 [F]
    scale: np.ndarray  # float32 [F], already floored (constant features get the floor, never 0)
    scale_floor: float

    @classmethod
    def fit(cls, rows: np.ndarray, scale_floor: float = 1e-3, range_fraction: float = 0.0) -> Normaliser:
        """Mean and std per feature; the std is floored at `scale_floor` and at `range_fraction` x the
        feature's range (max - min) in `rows`: a feature that barely moves in training (but spikes
        now and then) otherwise gets a tiny scale, and any later change dominates every score."""
        rows = np.asarray(rows, dtype=np.float64)
        center = rows.mean(axis=0)
        scale = np.maximum(rows.std(axis=0), scale_floor)
        if range_fraction > 0:
            scale = np.maximum(scale, range_fraction * (rows.max(axis=0) - rows.min(axis=0)))
        return cls(center.astype(np.float32), scale.astype(np.float32), float(scale_floor))

    def apply(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Normalise float rows [..., F] into float32 (into `out` when given)."""
        if out is None:
            out = np.empty(np.shape(rows), dtype=np.float32)
        np.subtract(rows, self.center, out=out, casting="unsafe")
        np.divide(out, self.scale, out=out)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "standard",
            "center": [float(v) for v in self.center],
            "scale": [float(v) for v in self.scale],
            "scale_floor": self.scale_floor,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], n_features: int) -> Normaliser:
        center = np.asarray(d["center"], dtype=np.float32)
        scale = np.asarray(d["scale"], dtype=np.float32)
        floor = float(d["scale_floor"])
        if center.shape != (n_features,) or scale.shape != (n_features,):
            raise BundleError(
                f"the normaliser has {center.size} centres and {scale.size} scales but the bundle lists "
                f"{n_features} features."
            )
        if not (np.all(np.isfinite(center)) and np.all(np.isfinite(scale)) and np.all(scale >= floor) and floor > 0):
            raise BundleError("the normaliser has non-finite values or a scale below its floor.")
        return cls(center, scale, floor)


SCORING_REDUCTIONS = ("mean_squared_error", "max_squared_error", "model_error")


@dataclass(frozen=True)
class ScoringRule:
    """Which window positions score the newest event (negative indices from the end), and how the
    per-feature errors become one score (mean over features by default, or their maximum)."""

    positions: tuple[int, ...] = (-1,)
    reduction: str = "mean_squared_error"

    def validate(self, window: int) -> None:
        if not self.positions or any(not (-window <= p < 0) for p in self.positions):
            raise BundleError(
                f"scoring positions {list(self.positions)} must be negative indices within a window of {window}."
            )
        if self.reduction not in SCORING_REDUCTIONS:
            raise BundleError(
                f"unknown scoring reduction {self.reduction!r}; this version knows {', '.join(SCORING_REDUCTIONS)}."
            )

    def feature_errors(self, x: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
        """Squared error per feature at the scoring positions, averaged over them: [batch, F]."""
        idx = list(self.positions)
        if self.reduction == "model_error":  # the output is the error already
            return np.asarray(np.mean(reconstruction[:, idx, :], axis=1, dtype=np.float32))
        diff = x[:, idx, :] - reconstruction[:, idx, :]
        return np.asarray(np.mean(diff * diff, axis=1, dtype=np.float32))

    def scores(self, x: np.ndarray, reconstruction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(score [batch], per-feature error [batch, F]) for normalised windows and their reconstruction."""
        fe = self.feature_errors(x, reconstruction)
        if self.reduction == "max_squared_error":
            return fe.max(axis=1), fe
        if self.reduction == "model_error":
            return fe.sum(axis=1, dtype=np.float32), fe
        return fe.mean(axis=1), fe

    def to_json(self) -> dict[str, Any]:
        return {"positions": list(self.positions), "reduction": self.reduction}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ScoringRule:
        reduction = str(d.get("reduction", "mean_squared_error"))
        if reduction not in SCORING_REDUCTIONS:
            raise BundleError(
                f"unknown scoring reduction {reduction!r}; this version knows {', '.join(SCORING_REDUCTIONS)}."
            )
        return cls(tuple(int(p) for p in d["positions"]), reduction)


@dataclass(frozen=True)
class Calibration:
    """Score quantiles of held-out normal data, and the suggested initial threshold. Bundles
    written since the calibrated thresholds (core/calibration.py) also carry `tail`, the fitted
    tail of those scores ({"level", "shape", "scale"}), and `run`, the same description of the
    geometric mean of `length` consecutive scores, each floored at its `floor_level` quantile
    ({"length", "floor_level", "quantiles", "tail"}); older bundles
    lack both and still load (their thresholds use the quantile method). A bundle trained on several
    entities also carries `entity_levels` ({entity key: log of its 90 % quantile against the
    calibration's}): its distributions then describe each entity's scores in its own frame."""

    quantiles: dict[str, float]  # e.g. {"0.5": .., "0.9": .., "0.98": .., ..., "1.0": max}
    threshold: float
    n_scores: int
    tail: dict[str, float] | None = None
    run: dict[str, Any] | None = None
    entity_levels: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"quantiles": self.quantiles, "threshold": self.threshold, "n_scores": self.n_scores}
        if self.tail is not None:
            d["tail"] = self.tail
        if self.run is not None:
            d["run"] = self.run
        if self.entity_levels is not None:
            d["entity_levels"] = self.entity_levels
        return d

    def level_range(self) -> tuple[float, float] | None:
        """The lowest and highest entity level as factors of the calibration's level (None without
        entity levels): what `fit` logs and `report` prints."""
        if not self.entity_levels:
            return None
        return math.exp(min(self.entity_levels.values())), math.exp(max(self.entity_levels.values()))

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Calibration:
        q = _numbers(d["quantiles"], "score quantiles")
        thr = float(d["threshold"])
        if not math.isfinite(thr) or thr <= 0:
            raise BundleError(f"the calibrated threshold {thr} is not a positive number.")
        tail = None if d.get("tail") is None else _tail(d["tail"], q)
        run = d.get("run")
        if run is not None:
            try:
                length = int(run["length"])
                rq = _numbers(run["quantiles"], "run quantiles")
                rt = _tail(run["tail"], rq)
            except (KeyError, TypeError, ValueError):
                raise BundleError("the calibration's run section needs a length, quantiles and a tail.") from None
            floor = float(run.get("floor_level", 0.5))
            if length < 2:
                raise BundleError(f"the calibration's run length {length} is below 2.")
            if not 0.0 < floor < 1.0:
                raise BundleError(f"the calibration's run floor level {floor} is not in (0, 1).")
            run = {"length": length, "floor_level": floor, "quantiles": rq, "tail": rt}
        return cls(q, thr, int(d.get("n_scores", 0)), tail, run, _entity_levels(d.get("entity_levels")))


def _entity_levels(levels: Any) -> dict[str, float] | None:
    """{entity key: finite log level}, or None when the calibration has none."""
    if levels is None:
        return None
    try:
        out = {str(k): float(v) for k, v in dict(levels).items()}
    except (TypeError, ValueError):
        raise BundleError("the calibration's entity levels must map entity keys to numbers.") from None
    if not all(math.isfinite(v) for v in out.values()):
        raise BundleError("the calibration's entity levels must be finite numbers.")
    return out


def _numbers(d: Any, what: str) -> dict[str, float]:
    out = {str(k): float(v) for k, v in dict(d).items()}
    if not all(math.isfinite(v) and v >= 0 for v in out.values()):
        raise BundleError(f"the calibration's {what} must be finite and not negative.")
    return out


def _tail(t: Any, quantiles: dict[str, float]) -> dict[str, float]:
    """A fitted tail: its level must be one of the quantiles, its shape >= 0 and its scale > 0."""
    try:
        tail = {"level": float(t["level"]), "shape": float(t["shape"]), "scale": float(t["scale"])}
        if "fit_level" in t:
            tail["fit_level"] = float(t["fit_level"])
    except (KeyError, TypeError, ValueError):
        raise BundleError("the calibration's tail needs a level, a shape and a scale.") from None
    if not (
        0 < tail["level"] < 1
        and math.isfinite(tail["shape"])
        and tail["shape"] >= 0
        and math.isfinite(tail["scale"])
        and tail["scale"] > 0
    ):
        raise BundleError(
            "the calibration's tail has a level outside (0, 1), a negative shape or a scale that is not positive."
        )
    if not any(abs(float(k) - tail["level"]) < 1e-12 for k in quantiles if k.replace(".", "", 1).isdigit()):
        raise BundleError(f"the calibration has no score quantile at its tail level {tail['level']}.")
    return tail


@dataclass(frozen=True)
class Bundle:
    path: Path
    schema_version: int
    model_version: str
    features: tuple[str, ...]
    window: int
    normaliser: Normaliser
    scoring: ScoringRule
    calibration: Calibration
    model_sha256: str
    model: dict[str, Any] = field(default_factory=dict)  # architecture, informational
    training: dict[str, Any] = field(default_factory=dict)  # metadata, informational
    extra: dict[str, Any] = field(default_factory=dict)  # other sections (e.g. a log parser), kept verbatim

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def gap_factor(self) -> float | None:
        """The step (x an entity's typical one) that training treated as a time gap, never windowing
        across it; None when training did not record one (log models, hand-made bundles)."""
        settings = self.training.get("settings")
        value = settings.get("gap_factor") if isinstance(settings, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 1.0:
            return float(value)
        return None

    def check_session_io(self, session: Any) -> None:
        """Check an onnxruntime.InferenceSession against W and F; one sentence on mismatch."""
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            raise BundleError(
                f"model.onnx must have one input named '{INPUT_NAME}', it has {[i.name for i in inputs]}."
            )
        if len(outputs) < 1 or outputs[0].name != OUTPUT_NAME:
            raise BundleError(
                f"model.onnx's first output must be named '{OUTPUT_NAME}', it has {[o.name for o in outputs]}."
            )
        for what, arg in (("input", inputs[0]), ("output", outputs[0])):
            if arg.type != "tensor(float)":
                raise BundleError(f"model.onnx's {what} is {arg.type}, expected float32.")
            shape = list(arg.shape)
            if len(shape) != 3 or shape[1] != self.window or shape[2] != self.n_features:
                raise BundleError(
                    f"model.onnx's {what} shape {shape} does not match the bundle's window {self.window} and "
                    f"{self.n_features} features."
                )
            if isinstance(shape[0], int) and shape[0] > 0 and shape[0] != -1:
                raise BundleError(
                    f"model.onnx's {what} has a fixed batch size {shape[0]}; the batch axis must be dynamic."
                )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_bundle(path: str | os.PathLike[str], check_model: bool = True) -> Bundle:
    """Read and verify a bundle directory. With check_model, also open model.onnx on the CPU and
    check its input/output names and shapes against W and F."""
    path = Path(path)
    meta_path = path / BUNDLE_FILE
    if not path.is_dir():
        raise BundleError(f"model bundle {path} is not a directory.")
    if not meta_path.is_file():
        raise BundleError(f"model bundle {path} has no {BUNDLE_FILE}.")
    if not (path / MODEL_FILE).is_file():
        raise BundleError(f"model bundle {path} has no {MODEL_FILE}.")
    try:
        meta = orjson.loads(meta_path.read_bytes())
    except orjson.JSONDecodeError as e:
        raise BundleError(f"{meta_path} is not valid JSON ({e}).") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path} must hold a JSON object.")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"model bundle {path} has schema version {version!r}; this stream-detector reads version {SCHEMA_VERSION}."
        )
    try:
        features = tuple(str(f) for f in meta["features"])
        window = int(meta["window"])
        expected_sha = str(meta["model_sha256"])
        bundle = Bundle(
            path=path,
            schema_version=version,
            model_version=str(meta["model_version"]),
            features=features,
            window=window,
            normaliser=Normaliser.from_json(meta["normaliser"], len(features)),
            scoring=ScoringRule.from_json(meta["scoring"]),
            calibration=Calibration.from_json(meta["calibration"]),
            model_sha256=expected_sha,
            model=dict(meta.get("model", {})),
            training=dict(meta.get("training", {})),
            extra={k: v for k, v in meta.items() if k not in _KNOWN_KEYS},
        )
    except KeyError as e:
        raise BundleError(f"{meta_path} lacks the required key {e.args[0]!r}.") from None
    except (TypeError, ValueError) as e:
        raise BundleError(f"{meta_path} has a malformed value ({e}).") from None
    if not features or len(set(features)) != len(features):
        raise BundleError(f"{meta_path} must list at least one feature, each name once.")
    if window < 2:
        raise BundleError(f"{meta_path} has window {window}; it must be at least 2.")
    bundle.scoring.validate(window)
    actual_sha = sha256_file(bundle.model_path)
    if actual_sha != expected_sha:
        raise BundleError(
            f"{bundle.model_path} does not match the sha256 recorded in {BUNDLE_FILE} (the model file was "
            f"altered or replaced)."
        )
    if check_model:
        bundle.check_session_io(open_cpu_session(bundle.model_path))
    return bundle


def open_cpu_session(model_path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
        raise BundleError(f"ONNX Runtime cannot load {model_path}: {str(e).splitlines()[0]}") from None


_KNOWN_KEYS = {
    "schema_version",
    "model_version",
    "model_file",
    "model_sha256",
    "features",
    "window",
    "normaliser",
    "scoring",
    "calibration",
    "model",
    "training",
    "input_name",
    "output_name",
}


def write_bundle(
    out_dir: str | os.PathLike[str],
    model_onnx: bytes,
    *,
    model_version: str,
    features: list[str],
    window: int,
    normaliser: Normaliser,
    scoring: ScoringRule,
    calibration: Calibration,
    model: dict[str, Any],
    training: dict[str, Any],
    extra: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a complete bundle atomically: built in a sibling temp dir, then renamed into place,
    so a failure never leaves a half-written BUNDLE_DIR. An existing bundle there is replaced."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "schema_version": SCHEMA_VERSION,
        "model_version": model_version,
        "model_file": MODEL_FILE,
        "model_sha256": hashlib.sha256(model_onnx).hexdigest(),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "features": list(features),
        "window": int(window),
        "normaliser": normaliser.to_json(),
        "scoring": scoring.to_json(),
        "calibration": calibration.to_json(),
        "model": model,
        "training": training,
        **(extra or {}),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        # mkdtemp makes the directory 0700; a bundle must be readable by the service's user.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        (tmp / MODEL_FILE).write_bytes(model_onnx)
        (tmp / BUNDLE_FILE).write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            if old.exists():
                _rmtree(old)
            out_dir.rename(old)
            tmp.rename(out_dir)
            _rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        _rmtree(tmp)
        raise
    return out_dir


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)
