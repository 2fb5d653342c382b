"""ONNX export of a trained autoencoder, then proof that ONNX Runtime computes what PyTorch does.

`torch.onnx.export` (the torch.export-based exporter) with a dynamic batch axis, input `x`,
output `reconstruction`. The IR version is capped at one ONNX Runtime 1.31 accepts (it refuses
IR 14). Validation opens the bytes with ONNX Runtime on the CPU and checks, each with its own
error: input/output names, shapes (W, F, dynamic batch, at two batch sizes), and values
(max |ORT - PyTorch| on held-out windows within a tolerance).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import torch

from stream_detector.core.bundle import INPUT_NAME, OUTPUT_NAME

log = logging.getLogger(__name__)

MAX_IR_VERSION = 10  # ONNX Runtime 1.31 refuses IR 14, which onnx 1.23 writes by default


class ExportError(Exception):
    """Export or its validation failed; one sentence."""


class ExportNameMismatch(ExportError):
    pass


class ExportShapeMismatch(ExportError):
    pass


class ExportValueMismatch(ExportError):
    pass


def export_onnx(model: torch.nn.Module, window: int, n_features: int, opset: int = 18) -> bytes:
    """Export a CPU copy of the model in eval mode; returns the serialised ONNX model."""
    cpu_model = copy.deepcopy(model).to("cpu").eval()
    example = torch.zeros(2, window, n_features)
    batch = torch.export.Dim("batch", min=1, max=1 << 24)
    try:
        with warnings.catch_warnings(), _quiet_loggers("onnx_ir", "onnxscript", "torch.onnx"):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                cpu_model,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
    except Exception as e:  # the exporter raises many types; the first line says what failed
        raise ExportError(f"torch.onnx.export failed: {str(e).splitlines()[0]}") from e
    assert program is not None  # dynamo=True always returns an ONNXProgram
    proto = program.model_proto
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """The exporter's optimiser passes log every rewrite at INFO; keep only their warnings."""
    # The exporter's registry also warns that torchvision ops are unavailable; irrelevant here.
    names = (*names, "torch.onnx._internal.exporter._registration")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR if lg.name.endswith("_registration") else logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def ort_session(onnx_bytes: bytes) -> Any:  # an onnxruntime.InferenceSession (untyped)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


def check_parity(onnx_bytes: bytes, model: torch.nn.Module, windows: np.ndarray, tolerance: float) -> float:
    """Run held-out windows [n, W, F] through ONNX Runtime and PyTorch (CPU, eval); return
    max |difference|. Raises an `ExportError` subclass naming what disagrees."""
    window, n_features = windows.shape[1], windows.shape[2]
    session = ort_session(onnx_bytes)
    in_names = [i.name for i in session.get_inputs()]
    out_names = [o.name for o in session.get_outputs()]
    if in_names != [INPUT_NAME] or not out_names or out_names[0] != OUTPUT_NAME:
        raise ExportNameMismatch(
            f"the exported model has inputs {in_names} and outputs {out_names}; expected ['{INPUT_NAME}'] and "
            f"['{OUTPUT_NAME}']."
        )
    for what, arg in (("input", session.get_inputs()[0]), ("output", session.get_outputs()[0])):
        shape = list(arg.shape)
        if len(shape) != 3 or shape[1:] != [window, n_features] or isinstance(shape[0], int):
            raise ExportShapeMismatch(
                f"the exported model's {what} shape is {shape}; expected [batch, {window}, {n_features}] with a "
                "dynamic batch."
            )
    cpu_model = copy.deepcopy(model).to("cpu").eval()
    x = np.ascontiguousarray(windows, dtype=np.float32)
    worst = 0.0
    # Two batch sizes prove the batch axis really is dynamic.
    for chunk in (1, 512):
        part = x[: max(1, min(len(x), chunk))] if chunk == 1 else x
        for i in range(0, len(part), chunk):
            xb = part[i : i + chunk]
            got = session.run([OUTPUT_NAME], {INPUT_NAME: xb})[0]
            with torch.no_grad():
                want = cpu_model(torch.from_numpy(xb)).numpy()
            if got.shape != want.shape:
                raise ExportShapeMismatch(
                    f"ONNX Runtime returned shape {list(got.shape)} where PyTorch returned {list(want.shape)}."
                )
            if not np.all(np.isfinite(got)):
                raise ExportValueMismatch("ONNX Runtime returned non-finite values on held-out windows.")
            worst = max(worst, float(np.max(np.abs(got - want))))
    if worst > tolerance:
        raise ExportValueMismatch(
            f"ONNX Runtime and PyTorch differ by up to {worst:.3g} on held-out windows, above the tolerance "
            f"{tolerance:g}."
        )
    return worst
