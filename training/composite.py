"""Composite detectors: the Transformer and simple, robust detectors in one ONNX graph.

Published benchmarks (TSB-AD, NeurIPS 2024) rank plain PCA reconstruction ahead of Transformer
autoencoders, and a reconstruction model cannot see a sensor that froze at a plausible value (its
context shows the frozen value, so it predicts it). So a bundle may score every window with
several detectors and keep the largest, each first divided by its own 99 % quantile on the
validation windows ("calibrated"), so that a score of 3 means "three times this detector's normal
high" whichever detector it came from:

- `transformer`: the autoencoder's squared error at its scoring positions, mean over features.
  With `fit --feature-errors relative` each feature's error is first divided by its mean on the
  validation windows (`error_scale`, floored at `ERROR_SCALE_FLOOR`), so that every feature's
  normal error is 1 (the diagonal of the Mahalanobis distance of the errors that EncDec-AD,
  Malhotra et al. 2016, scores with): a feature the model predicts closely then weighs as much
  when it breaks as a noisy one. Measured on SMD it ranks incidents better but alerts and
  attributes worse (docs/quality.md), so it is not the default;
- `pca`: the squared residual of the newest row outside the principal subspace of the normalised
  training rows (enough components for 90 % of the variance), mean over features: a broken
  relation between features (training/baselines.py fits the same subspace);
- `zscore`: per feature, the newest row's z against the window's earlier rows (their standard
  deviation floored at 0.1, in normalised units), squared, largest over features: a level shift or
  a spike relative to the recent past (training/baselines.py's z-score baseline, as a detector);
- `flatline`: a sensor stuck at one value. Per feature, the rows at the end of the window that
  repeat the newest value exactly, minus the longest such run in any training window (features
  that are constant in training never count); the largest excess over the features, divided by
  `FLAT_ROWS`, times `FLAT_RATIO`: a feature frozen 16 rows longer than it ever was in training
  scores 10 times the other detectors' normal high. Its normal score is exactly 0, so it has no
  validation scale. Meant for sensor fleets, where a frozen reading is a fault; server metrics
  plateau legitimately (SMD's do), so it is not a default.

The graph keeps the bundle contract (input `x` [batch, W, F], output [batch, W, F], the scoring
rule `model_error` at position -1): the output's newest row holds the winning detector's
per-feature shares of the combined score (so `top_features` names that detector's features) and
its earlier rows are zeros. The service needs nothing new; calibration (core/calibration.py) then
describes the combined score like any other.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from stream_detector.core.bundle import INPUT_NAME, OUTPUT_NAME, ScoringRule
from training.baselines import fit_pca

DETECTORS = ("transformer", "pca", "zscore", "flatline")
ZSCORE_FLOOR = 0.1  # smallest standard deviation of the earlier rows, in normalised units (as the z-score baseline)
SCORING = ScoringRule(positions=(-1,), reduction="model_error")
FLAT_ROWS = 16  # rows of exact repeats beyond the training maximum that score FLAT_RATIO
FLAT_RATIO = 10.0
PCA_VARIANCE = 0.9
# Smallest per-feature normal error (squared, normalised units): an error of a tenth of the feature's
# training standard deviation, the z-score detector's floor. A feature the model reconstructs almost
# exactly (a near-constant one) would otherwise turn any small legitimate move into a huge score.
ERROR_SCALE_FLOOR = ZSCORE_FLOOR**2
_TINY = 1e-12


@dataclass(frozen=True)
class Components:
    detectors: tuple[str, ...]  # "transformer" first
    positions: tuple[int, ...]  # the Transformer's scoring positions
    window: int
    scales: dict[str, float]  # each detector's 99 % quantile on the validation windows
    pca_mean: np.ndarray | None = None  # [F]
    pca_projector: np.ndarray | None = None  # [F, F]: V_k V_k^T
    flat_max_run: np.ndarray | None = None  # [F]: longest run of exact repeats in a training window (W: never counts)
    error_scale: np.ndarray | None = None  # [F]: the Transformer's mean squared error per feature, validation (floored)

    def describe(self) -> dict[str, Any]:
        """For bundle.json's model section."""
        d: dict[str, Any] = {
            "detectors": list(self.detectors),
            "scales": self.scales,
            "combine": "max of score / scale",
        }
        if self.pca_projector is not None:
            d["pca_components"] = int(round(float(np.trace(self.pca_projector))))
        if self.error_scale is not None:
            d["transformer_error_scale"] = {
                "rule": "squared error per feature / its validation mean",
                "floor": ERROR_SCALE_FLOOR,
                "floored_features": int(np.count_nonzero(self.error_scale <= ERROR_SCALE_FLOOR)),
            }
        if self.flat_max_run is not None:
            d["flatline_rows"] = FLAT_ROWS
            d["flatline_features"] = int(np.count_nonzero(self.flat_max_run < self.window))
        return d


def fit_components(detectors: tuple[str, ...], train_windows: np.ndarray, positions: tuple[int, ...]) -> Components:
    """The detectors' parameters from normalised training windows [n, W, F] (scales come later)."""
    unknown = [d for d in detectors if d not in DETECTORS]
    if unknown or not detectors or detectors[0] != "transformer":
        raise ValueError(
            f"detectors must start with 'transformer' and come from {', '.join(DETECTORS)}, got {list(detectors)}."
        )
    w = train_windows.shape[1]
    mean = projector = max_run = None
    if "pca" in detectors:
        m, comps, _ = fit_pca(train_windows[:, -1, :], PCA_VARIANCE)
        mean, projector = m.astype(np.float32), (comps @ comps.T).astype(np.float32)
    if "flatline" in detectors:
        max_run = repeat_run(train_windows.astype(np.float32)).max(axis=0).astype(np.float32)
    return Components(tuple(detectors), tuple(positions), w, {}, mean, projector, max_run)


def repeat_run(windows: np.ndarray) -> np.ndarray:
    """Per window and feature, how many rows at the window's end hold exactly the newest value: [n, F]."""
    changed = (windows != windows[:, -1:, :]).astype(np.float32)
    return np.sum(np.cumsum(changed[:, ::-1, :], axis=1) == 0, axis=1).astype(np.float32)


def raw_scores(c: Components, windows: np.ndarray, recon: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per detector: (score [n], per-feature errors [n, F]) of normalised windows and the
    Transformer's output; the numpy reference of the graph."""
    x = windows.astype(np.float32)
    idx = list(c.positions)
    d = x[:, idx, :] - recon[:, idx, :]
    e_t = np.mean(d * d, axis=1)
    if c.error_scale is not None:
        e_t = e_t / c.error_scale
    out = {"transformer": (e_t.mean(axis=1), e_t)}
    if c.pca_projector is not None and c.pca_mean is not None:
        dp = x[:, -1, :] - c.pca_mean
        r = dp - dp @ c.pca_projector
        e_p = r * r
        out["pca"] = (e_p.mean(axis=1), e_p)
    if "zscore" in c.detectors:
        earlier = x[:, :-1, :]
        z = (x[:, -1, :] - earlier.mean(axis=1)) / np.maximum(earlier.std(axis=1), ZSCORE_FLOOR)
        e_z = z * z
        out["zscore"] = (e_z.max(axis=1), e_z)
    if c.flat_max_run is not None:
        e_f = np.maximum(repeat_run(x) - c.flat_max_run, 0.0)
        out["flatline"] = (e_f.max(axis=1), e_f)
    return out


def with_error_scale(c: Components, windows: np.ndarray, recon: np.ndarray) -> Components:
    """The components with the Transformer's per-feature normal error, measured on these
    (validation) windows: the mean over them of each feature's squared error, floored."""
    _, errors = raw_scores(replace(c, error_scale=None), windows, recon)["transformer"]
    return replace(c, error_scale=np.maximum(errors.mean(axis=0), ERROR_SCALE_FLOOR).astype(np.float32))


def with_scales(c: Components, windows: np.ndarray, recon: np.ndarray) -> Components:
    """The components with each detector's scale: its 99 % quantile on these (validation) windows."""
    scales = {
        k: max(float(np.quantile(s, 0.99)), 1e-9)
        for k, (s, _) in raw_scores(c, windows, recon).items()
        if k != "flatline"
    }
    if c.flat_max_run is not None:
        scales["flatline"] = FLAT_ROWS / FLAT_RATIO  # excess rows per unit of ratio (no validation scale: normal is 0)
    return replace(c, scales=scales)


def combined(c: Components, windows: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """The composite graph's output, in numpy: [n, W, F] (zeros but the newest row)."""
    parts = raw_scores(c, windows, recon)
    ratios = np.stack([parts[k][0] / c.scales[k] for k in c.detectors], axis=1)  # [n, K]
    best = ratios.max(axis=1, keepdims=True)
    winner = (ratios == best).astype(np.float32)
    winner /= winner.sum(axis=1, keepdims=True)
    shares = sum(
        winner[:, i : i + 1] * parts[k][1] / (parts[k][1].sum(axis=1, keepdims=True) + _TINY)
        for i, k in enumerate(c.detectors)
    )
    out = np.zeros(windows.shape, dtype=np.float32)
    out[:, -1, :] = best * shares
    return out


# ---------------------------------------------------------------------------------------------
# The graph


def composite_onnx(transformer: bytes, c: Components, n_features: int) -> bytes:
    """The Transformer's graph with the other detectors and the combination appended."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load_from_string(transformer)
    g = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    inner = "transformer_output"
    for existing in g.node:
        existing.output[:] = [inner if o == OUTPUT_NAME else o for o in existing.output]
    del g.output[:]
    consts: list[Any] = []
    nodes: list[Any] = []

    def const(name: str, value: Any, dtype: Any = np.float32) -> str:
        consts.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), f"composite_{name}"))
        return f"composite_{name}"

    def node(op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        out = f"composite_{name}"
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def reduce(op: str, x: str, axis: int, name: str, keepdims: int) -> str:
        if op == "ReduceSum" or opset >= 18:  # axes became an input (ReduceSum: opset 13)
            return node(op, [x, const(f"{name}_axes", [axis], np.int64)], name, keepdims=keepdims)
        return node(op, [x], name, axes=[axis], keepdims=keepdims)

    w = c.window
    pos = const("positions", [w + p for p in c.positions], np.int64)
    xp = node("Gather", [INPUT_NAME, pos], "x_pos", axis=1)
    rp = node("Gather", [inner, pos], "r_pos", axis=1)
    d = node("Sub", [xp, rp], "t_diff")
    errors = {"transformer": reduce("ReduceMean", node("Mul", [d, d], "t_sq"), 1, "t_err", 0)}
    if c.error_scale is not None:
        errors["transformer"] = node("Div", [errors["transformer"], const("t_error_scale", c.error_scale)], "t_rel_err")
    row_shape = const("row_shape", [-1, n_features], np.int64)
    newest = node(
        "Reshape",
        [node("Gather", [INPUT_NAME, const("last", [w - 1], np.int64)], "x_last3", axis=1), row_shape],
        "x_last",
    )
    if c.pca_projector is not None:
        dp = node("Sub", [newest, const("pca_mean", c.pca_mean)], "p_centred")
        r = node("Sub", [dp, node("MatMul", [dp, const("pca_projector", c.pca_projector)], "p_proj")], "p_resid")
        errors["pca"] = node("Mul", [r, r], "p_err")
    if "zscore" in c.detectors:
        earlier = node(
            "Slice",
            [
                INPUT_NAME,
                const("z_zero", [0], np.int64),
                const("z_end", [w - 1], np.int64),
                const("z_axis", [1], np.int64),
            ],
            "z_earlier",
        )
        mean = reduce("ReduceMean", earlier, 1, "z_mean3", 1)  # [B, 1, F]
        dev = node("Sub", [earlier, mean], "z_dev")
        std = node("Sqrt", [reduce("ReduceMean", node("Mul", [dev, dev], "z_sq"), 1, "z_var", 0)], "z_std")  # [B, F]
        z = node(
            "Div",
            [
                node("Sub", [newest, node("Reshape", [mean, row_shape], "z_mean")], "z_num"),
                node("Max", [std, const("z_floor", ZSCORE_FLOOR)], "z_std_floored"),
            ],
            "z",
        )
        errors["zscore"] = node("Mul", [z, z], "z_err")
    if c.flat_max_run is not None:
        # changed[t] = x[t] != x[newest]; the trailing rows with no change since are the run
        changed = node(
            "Cast",
            [
                node(
                    "Not",
                    [
                        node(
                            "Equal",
                            [
                                INPUT_NAME,
                                node("Gather", [INPUT_NAME, const("newest", [w - 1], np.int64)], "f_newest", axis=1),
                            ],
                            "f_same",
                        )
                    ],
                    "f_diff",
                )
            ],
            "f_changed",
            to=onnx.TensorProto.FLOAT,
        )
        since = node("CumSum", [changed, const("f_axis", 1, np.int64)], "f_since", reverse=1)
        run = reduce(
            "ReduceSum",
            node(
                "Cast",
                [node("Equal", [since, const("f_zero", 0.0)], "f_unchanged")],
                "f_unchanged_f",
                to=onnx.TensorProto.FLOAT,
            ),
            1,
            "f_run",
            0,
        )
        errors["flatline"] = node(
            "Relu", [node("Sub", [run, const("flat_max_run", c.flat_max_run)], "f_excess_raw")], "f_excess"
        )
    ratios, shares = [], []
    for k in c.detectors:
        e = errors[k]
        score = reduce("ReduceMax" if k in ("flatline", "zscore") else "ReduceMean", e, 1, f"{k}_score", 1)  # [B, 1]
        ratios.append(node("Div", [score, const(f"{k}_scale", c.scales[k])], f"{k}_ratio"))
        total = node("Add", [reduce("ReduceSum", e, 1, f"{k}_total", 1), const(f"{k}_tiny", _TINY)], f"{k}_total_eps")
        shares.append(node("Div", [e, total], f"{k}_share"))
    stacked = node("Concat", ratios, "ratios", axis=1)  # [B, K]
    best = reduce("ReduceMax", stacked, 1, "best", 1)  # [B, 1]
    win = node("Cast", [node("Equal", [stacked, best], "is_best")], "win", to=onnx.TensorProto.FLOAT)
    win = node("Div", [win, reduce("ReduceSum", win, 1, "n_best", 1)], "win_norm")
    parts = [
        node("Mul", [node("Gather", [win, const(f"k{i}", [i], np.int64)], f"win_{i}", axis=1), sh], f"share_{i}")
        for i, sh in enumerate(shares)
    ]  # each detector's shares, weighted by whether it won ([B, 1] x [B, F])
    mixed = parts[0]
    for i, part in enumerate(parts[1:], 1):
        mixed = node("Add", [mixed, part], f"mixed_{i}")
    last = node(
        "Reshape",
        [node("Mul", [best, mixed], "contrib"), const("last_shape", [-1, 1, n_features], np.int64)],
        "contrib3",
    )
    earlier = node(
        "Slice",
        [
            INPUT_NAME,
            const("zero", [0], np.int64),
            const("before_last", [w - 1], np.int64),
            const("axis1", [1], np.int64),
        ],
        "earlier",
    )
    zeros = node("Mul", [earlier, const("zero_f", 0.0)], "zeros")
    nodes.append(helper.make_node("Concat", [zeros, last], [OUTPUT_NAME], name="composite_output", axis=1))
    g.node.extend(nodes)
    g.initializer.extend(consts)
    g.output.append(helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, ["batch", w, n_features]))
    onnx.checker.check_model(model)
    return model.SerializeToString()
