"""The count-vector log model (`fit --format log --log-model counts`, layout `template-counts/1`).

Input rows (stream_detector/logs/spec.py): the cumulative template counts of an entity's session
and the row's kind. The model is a PCA reconstruction in a standardised space, one subspace per
row kind, fitted on the training entities' rows exactly as the log stage produces them:
- line rows: the counts after each line; the normal prefixes of a session span a subspace, and a
  count pattern that leaves it (a template that never or rarely occurs, too many of one kind, a
  deletion before the write finished) scores at the line that makes it leave;
- idle-check rows: the counts of an entity at rest (inactive for `idle_check_s`); a write that
  stopped half way rests in a state normal entities never rest in.

Per feature: z = (log1p(count) - mean) / max(std, scale_floor) (the floor makes a template that was
constant in training, e.g. exactly 3 replicas, or absent, count heavily when it deviates); then
the squared residual outside the k leading principal components (k for `variance` of the
variance), divided by the row kind's calibration scale (the largest residual among held-out
training entities, at least `min_scale`), so one threshold serves both kinds. Start rows score 0.
Layout `template-bucket-counts/1` (`--bucket`): the same model on the counts of the current time
bucket; its graph also zeroes a row scoring below `count_threshold_floor` (`score_floor`), so a score
is exactly 0 or at least the floor.

The graph is built by hand with onnx.helper (a few MatMul/Where nodes); its output at [-1, :V] is
each template's share of the score (reduction `model_error`), so an alert's `top_features` name
the templates whose counts are off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_detector.core.bundle import INPUT_NAME, OUTPUT_NAME
from stream_detector.logs.stage import IDLE, LINE, START

ONNX_OPSET = 17
ONNX_IR_VERSION = 8  # ONNX Runtime 1.31 refuses IR 14 (onnx 1.23's default)


@dataclass(frozen=True)
class Branch:
    """One row kind's standardisation, residual projector and calibration scale."""

    mean: np.ndarray  # [V] of log1p(counts)
    scale: np.ndarray  # [V], floored
    residual: np.ndarray  # [V, V] = I - P_k P_k^T
    k: int
    q: float  # calibration scale: residual sum of squares that scores 1.0
    rows: int

    def spe(self, counts: np.ndarray) -> np.ndarray:
        """Per-feature squared residual [n, V] (not yet divided by q)."""
        z = (np.log1p(np.maximum(counts, 0.0)) - self.mean) / self.scale
        r = z @ self.residual
        return r * r


def fit_branch(counts: np.ndarray, variance: float, scale_floor: float) -> Branch:
    x = np.log1p(np.asarray(counts, dtype=np.float64))
    mean = x.mean(axis=0)
    scale = np.maximum(x.std(axis=0), scale_floor)
    z = (x - mean) / scale
    _, sing, vt = np.linalg.svd(z, full_matrices=False)
    var = sing**2
    total = var.sum()
    if total <= 0:  # every row identical: nothing is explained, everything off the point is residual
        k = 0
    else:
        k = int(np.searchsorted(np.cumsum(var) / total, variance - 1e-12) + 1)
        k = min(k, vt.shape[0])
    p = vt[:k].T
    residual = np.eye(x.shape[1]) - p @ p.T
    return Branch(mean, scale, residual, k, 1.0, int(x.shape[0]))


def with_scale(b: Branch, per_entity_max: np.ndarray, min_scale: float) -> Branch:
    q = float(per_entity_max.max()) if per_entity_max.size else 0.0
    return Branch(b.mean, b.scale, b.residual, b.k, max(q, min_scale), b.rows)


def entity_max(keys: list[str], scores: np.ndarray) -> np.ndarray:
    best: dict[str, float] = {}
    for k, s in zip(keys, scores.tolist()):
        best[k] = max(best.get(k, 0.0), s)
    return np.asarray(list(best.values()), dtype=np.float64)


def fit_count_branches(
    rows: np.ndarray,
    kinds: np.ndarray,
    keys: list[str],
    is_val: np.ndarray,
    variance: float,
    scale_floor: float,
    min_scale: float,
) -> tuple[Branch, Branch, dict[str, Any]]:
    """(line branch, idle branch, figures). Fitted on the training entities' rows, scaled on the
    held-out entities' rows. Without idle-check rows to learn from, idle rows use the line branch."""
    counts = rows[:, :-1].astype(np.float64)
    out: dict[str, Branch] = {}
    info: dict[str, Any] = {}
    for name, kind in (("line", LINE), ("idle", IDLE)):
        fit_rows = (kinds == kind) & ~is_val
        if fit_rows.sum() < 2:
            info[name] = {"rows": int(fit_rows.sum()), "uses": "line"}
            continue
        b = fit_branch(counts[fit_rows], variance, scale_floor)
        val_rows = np.flatnonzero((kinds == kind) & is_val)
        spe = b.spe(counts[val_rows]).sum(axis=1)
        out[name] = with_scale(b, entity_max([keys[i] for i in val_rows.tolist()], spe), min_scale)
        info[name] = {"rows": b.rows, "k": b.k, "scale": out[name].q, "validation_rows": int(val_rows.size)}
    if "line" not in out:
        raise ValueError(
            "too few training lines to fit a count model (need at least 2 line rows of training entities)."
        )
    return out["line"], out.get("idle", out["line"]), info


def reference_errors(rows: np.ndarray, line: Branch, idle: Branch, score_floor: float = 0.0) -> np.ndarray:
    """What the graph outputs at [-1, :] for rows [n, V+1] (numpy; the parity reference)."""
    counts = rows[:, :-1].astype(np.float64)
    kind = rows[:, -1]
    e = np.where((kind == IDLE)[:, None], idle.spe(counts) / idle.q, line.spe(counts) / line.q)
    e[kind == START] = 0.0
    if score_floor > 0:
        e[e.sum(axis=1) < score_floor] = 0.0
    return np.concatenate([e, np.zeros((len(rows), 1))], axis=1).astype(np.float32)


def count_model_onnx(line: Branch, idle: Branch, vocab_size: int, score_floor: float = 0.0) -> bytes:
    """x [b, 2, V+1] -> [b, 2, V+1]: zeros, except [-1, :V] = the newest row's per-template error.
    `score_floor` > 0: a row whose errors sum to less is all zeros (its score is exactly 0), so that a
    per-entity rolling threshold of the service never learns from numerical noise (bucketed layout)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    v, f = vocab_size, vocab_size + 1
    c = lambda a, name: numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)  # noqa: E731
    i64 = lambda a, name: numpy_helper.from_array(np.asarray(a, dtype=np.int64), name)  # noqa: E731
    inits = [
        i64(1, "newest"),
        i64(0, "oldest"),
        i64([0], "c0"),
        i64([v], "cv"),
        i64([f], "cf"),
        i64([1], "ax1"),
        i64([1], "unsq"),
        c(1.0, "one"),
        c(0.0, "zero"),
        c(float(IDLE), "idle_kind"),
        c(float(START), "start_kind"),
    ]
    nodes = [
        helper.make_node("Gather", [INPUT_NAME, "newest"], ["row"], axis=1),  # [b, F]
        helper.make_node("Gather", [INPUT_NAME, "oldest"], ["row0"], axis=1),
        helper.make_node("Mul", ["row0", "zero"], ["zeros_f"]),  # [b, F] of zeros (inputs are finite counts)
        helper.make_node("Slice", ["row", "c0", "cv", "ax1"], ["counts"]),
        helper.make_node("Slice", ["row", "cv", "cf", "ax1"], ["kind"]),  # [b, 1]
        helper.make_node("Relu", ["counts"], ["counts_pos"]),
        helper.make_node("Add", ["counts_pos", "one"], ["counts_1"]),
        helper.make_node("Log", ["counts_1"], ["log_counts"]),
        helper.make_node("Slice", ["zeros_f", "c0", "cv", "ax1"], ["zeros_v"]),
    ]
    for name, b in (("line", line), ("idle", idle)):
        inits += [
            c(b.mean, f"{name}_mean"),
            c(1.0 / b.scale, f"{name}_inv_scale"),
            c(b.residual, f"{name}_residual"),
            c(1.0 / b.q, f"{name}_inv_q"),
        ]
        nodes += [
            helper.make_node("Sub", ["log_counts", f"{name}_mean"], [f"{name}_centred"]),
            helper.make_node("Mul", [f"{name}_centred", f"{name}_inv_scale"], [f"{name}_z"]),
            helper.make_node("MatMul", [f"{name}_z", f"{name}_residual"], [f"{name}_r"]),
            helper.make_node("Mul", [f"{name}_r", f"{name}_r"], [f"{name}_r2"]),
            helper.make_node("Mul", [f"{name}_r2", f"{name}_inv_q"], [f"{name}_err"]),
        ]
    nodes += [
        helper.make_node("Equal", ["kind", "idle_kind"], ["is_idle"]),
        helper.make_node("Equal", ["kind", "start_kind"], ["is_start"]),
        helper.make_node("Where", ["is_idle", "idle_err", "line_err"], ["err_kind"]),
        helper.make_node("Where", ["is_start", "zeros_v", "err_kind"], ["err_raw" if score_floor > 0 else "err_v"]),
    ]
    if score_floor > 0:
        inits.append(c(score_floor, "score_floor"))
        nodes += [
            helper.make_node("ReduceSum", ["err_raw", "ax1"], ["err_sum"], keepdims=1),  # [b, 1]
            helper.make_node("Less", ["err_sum", "score_floor"], ["below_floor"]),
            helper.make_node("Where", ["below_floor", "zeros_v", "err_raw"], ["err_v"]),
        ]
    nodes += [
        helper.make_node("Slice", ["zeros_f", "cv", "cf", "ax1"], ["zero_col"]),
        helper.make_node("Concat", ["err_v", "zero_col"], ["err_f"], axis=1),
        helper.make_node("Unsqueeze", ["err_f", "unsq"], ["err_row"]),
        helper.make_node("Unsqueeze", ["zeros_f", "unsq"], ["zero_row"]),
        helper.make_node("Concat", ["zero_row", "err_row"], [OUTPUT_NAME], axis=1),
    ]
    x = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 2, f])
    y = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 2, f])
    graph = helper.make_graph(nodes, "log-template-counts", [x], [y], initializer=inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="stream-detector"
    )
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()
