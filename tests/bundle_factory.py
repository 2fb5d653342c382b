"""Tiny valid model bundles for tests, built without torch.

`make_bundle(tmp_path, features=["a", "b"], window=8)` writes a bundle whose model.onnx is a small
hand-built ONNX graph (onnx package, IR version 10, opset 17, dynamic batch axis) and returns the
loaded `Bundle`. Model kinds:

- "mean": reconstructs every position as the window's per-feature mean, so a value far from the
  recent level (a spike, a level shift) scores high while steady noise scores about its variance.
- "identity": reconstructs the input exactly; every score is 0.
- "zeros": reconstructs zeros; the score is the mean square of the normalised newest row.

Normalised inputs are (x - center) / scale with center 0 and scale 1 unless given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from stream_detector.core.bundle import (
    INPUT_NAME,
    OUTPUT_NAME,
    Bundle,
    Calibration,
    Normaliser,
    ScoringRule,
    load_bundle,
    write_bundle,
)

ONNX_IR_VERSION = 10  # onnxruntime 1.31 refuses IR 14, onnx 1.23's default for hand-built graphs
ONNX_OPSET = 17


def model_bytes(window: int, n_features: int, kind: str = "mean", *, input_name: str = INPUT_NAME,
                output_name: str = OUTPUT_NAME, fixed_batch: int | None = None) -> bytes:
    """Serialized ONNX model mapping x [batch, W, F] -> reconstruction [batch, W, F]."""
    batch: int | str = fixed_batch if fixed_batch is not None else "batch"
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, window, n_features])
    y = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, window, n_features])
    if kind == "mean":
        nodes = [
            helper.make_node("ReduceMean", [input_name], ["m"], axes=[1], keepdims=1),
            helper.make_node("Shape", [input_name], ["s"]),
            helper.make_node("Expand", ["m", "s"], [output_name]),
        ]
        inits = []
    elif kind == "identity":
        nodes = [helper.make_node("Identity", [input_name], [output_name])]
        inits = []
    elif kind in ("zeros", "nan"):  # "nan": a broken model whose every output is NaN
        nodes = [helper.make_node("Mul", [input_name, "c"], [output_name])]
        inits = [helper.make_tensor("c", TensorProto.FLOAT, [], [0.0 if kind == "zeros" else float("nan")])]
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    graph = helper.make_graph(nodes, f"test_{kind}", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="bundle_factory")
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_bundle(
    tmp_path: str | Path,
    features: Sequence[str] = ("a", "b", "c", "d"),
    window: int = 8,
    kind: str = "mean",
    threshold: float = 5.0,
    *,
    name: str = "bundle",
    center: Sequence[float] | None = None,
    scale: Sequence[float] | None = None,
    positions: Sequence[int] = (-1,),
    model_version: str | None = None,
    calibration: Calibration | None = None,
    training: dict[str, Any] | None = None,
) -> Bundle:
    """Write a bundle under tmp_path/name and return it loaded (and verified) by `load_bundle`. The
    calibration is a single threshold (the quantile method's) unless `calibration` is given."""
    features = list(features)
    f = len(features)
    normaliser = Normaliser(
        np.asarray(center if center is not None else np.zeros(f), dtype=np.float32),
        np.asarray(scale if scale is not None else np.ones(f), dtype=np.float32),
        1e-3,
    )
    out = write_bundle(
        Path(tmp_path) / name,
        model_bytes(window, f, kind),
        model_version=model_version or f"test-{kind}-w{window}-f{f}",
        features=features,
        window=window,
        normaliser=normaliser,
        scoring=ScoringRule(tuple(positions)),
        calibration=calibration or Calibration({"0.999": threshold, "1.0": threshold}, float(threshold), 1000),
        model={"kind": kind, "source": "tests/bundle_factory.py"},
        training=training or {"data": "none (hand-built test model)"},
    )
    return load_bundle(out)
