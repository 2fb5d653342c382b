"""`Scorer`: one ONNX Runtime session for the bundle's model, and micro-batched scoring.

Provider choice: "cpu", "cuda", or "auto" (CUDA when this onnxruntime build offers it and the
machine has an NVIDIA GPU, else CPU).
Which provider is really active is read back from the session (`session.get_providers()`): the
onnxruntime-gpu wheel lists CUDA in `get_available_providers()` even on a machine without CUDA
libraries, and a session asked for CUDA there quietly runs on the CPU. That answer is logged, and
with `require_cuda` a session that is not on CUDA is refused with one sentence.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from stream_detector.core.bundle import INPUT_NAME, OUTPUT_NAME, Bundle, BundleError

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PROVIDER_CHOICES = ("auto", "cpu", "cuda")


def default_intra_op_threads() -> int:
    """Cores available to this process minus one (for decoding and Kafka), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def nvidia_device_present() -> bool:
    """Whether the kernel shows an NVIDIA GPU. `auto` asks for CUDA only then: on a machine without
    one, onnxruntime-gpu would try, print a page of library errors, and fall back to the CPU."""
    return os.path.exists("/proc/driver/nvidia/gpus") or os.path.exists("/dev/nvidia0")


class ScorerError(Exception):
    """The scorer cannot run as configured; the message is one sentence for the operator."""


class Scorer:
    @classmethod
    def from_settings(cls, bundle: Bundle, settings: Any) -> Scorer:
        """The scorer the service runs (`run`, `check`, a model reload): provider and batch size
        from the settings' `model` and `runtime` sections."""
        model, runtime = settings.model, settings.runtime
        return cls(bundle, provider=model.provider, require_cuda=model.require_cuda, max_batch=runtime.max_batch)

    def __init__(
        self,
        bundle: Bundle,
        provider: str = "auto",
        require_cuda: bool = False,
        max_batch: int = 1024,
        intra_op_threads: int | None = None,
        device_id: int = 0,
    ) -> None:
        import onnxruntime as ort

        if provider not in PROVIDER_CHOICES:
            raise ScorerError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDER_CHOICES)}.")
        if max_batch < 1:
            raise ScorerError(f"max_batch must be at least 1, got {max_batch}.")
        self.bundle = bundle
        self.max_batch = int(max_batch)
        self.requested = provider
        want_cuda = (
            provider == "cuda"
            or require_cuda
            or (provider == "auto" and CUDA in ort.get_available_providers() and nvidia_device_present())
        )
        providers: list[Any] = [(CUDA, {"device_id": device_id}), CPU] if want_cuda else [CPU]
        # A CUDA provider that cannot start logs several lines through ORT's default logger (not
        # the session's); the outcome is reported below in one line, so keep those quiet.
        ort.set_default_logger_severity(3)
        self.device_id = int(device_id)
        self.intra_op_threads = default_intra_op_threads() if intra_op_threads is None else int(intra_op_threads)
        opts = self.session_options()
        try:
            self.session = ort.InferenceSession(str(bundle.model_path), sess_options=opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ScorerError(f"ONNX Runtime cannot open {bundle.model_path}: {str(e).splitlines()[0]}") from None
        try:
            bundle.check_session_io(self.session)
        except BundleError as e:
            raise ScorerError(str(e)) from None
        active = self.session.get_providers()
        self.provider = active[0] if active else "none"
        self.on_cuda = self.provider == CUDA
        if want_cuda and not self.on_cuda:
            if require_cuda:
                raise ScorerError(
                    f"the CUDA execution provider was required but ONNX Runtime runs this model on {self.provider} "
                    "(no usable GPU or CUDA libraries on this machine)."
                )
            level = logging.WARNING if provider == "cuda" else logging.INFO
            log.log(level, "CUDA was requested (provider=%s) but is not active; scoring on %s", provider, self.provider)
        log.info("scorer: model %s on %s (max_batch %d)", bundle.model_version, self.provider, self.max_batch)
        # On CUDA the pipeline keeps windows device-resident (device_windows.py); this session
        # then only serves `reconstruct` and host-gathered scoring (replay, benchmarks).

    def session_options(self) -> Any:
        """Options of every session of this scorer (device_windows.py builds two more with them).
        Sequential execution (the model is a chain), all graph optimisations, and an intra-op
        pool that leaves one core to decoding and Kafka: the service decodes the next batch on
        the main thread while this session runs (bench/e2e.py measured both settings on 2 cores).
        The pool's threads do not spin between runs: spinning steals that core from the decoder."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # a failed CUDA start is reported by us, in one line
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts

    def warm_up(self, windows: int = 8) -> None:
        """Score a small batch of normalised zeros and check what comes back, before a service
        consumes with this scorer or a reload swaps it in: a model that returns NaN or the wrong
        shape is refused in one sentence (ScorerError), and the session's first run (kernel and
        buffer set-up) is not paid by the first events. Deliberately not a full max_batch: ONNX
        Runtime would keep the activation memory of that batch size for the life of the process
        (~0.8 GB for the reference model at 1,024 windows: bench/e2e.py's soak at hop 16 went from
        ~0.3 to ~1.2 GB of RSS at start when it did)."""
        n, f = max(1, min(int(windows), self.max_batch)), self.bundle.n_features
        scores, errors = self.score(np.zeros((n, self.bundle.window, f), dtype=np.float32))
        if np.shape(scores) != (n,) or np.shape(errors) != (n, f):
            raise ScorerError(
                f"model {self.bundle.model_version} returned scores of shape {np.shape(scores)} for {n} windows."
            )
        if not (np.all(np.isfinite(scores)) and np.all(np.isfinite(errors))):
            raise ScorerError(
                f"model {self.bundle.model_version} produced NaN or infinite scores for windows of zeros."
            )

    def reconstruct(self, windows: np.ndarray) -> np.ndarray:
        """Model output for normalised windows [n, W, F], in chunks of max_batch."""
        windows = np.ascontiguousarray(windows, dtype=np.float32)
        n = windows.shape[0]
        if n <= self.max_batch:
            return self.session.run([OUTPUT_NAME], {INPUT_NAME: windows})[0]
        out = np.empty_like(windows)
        for start in range(0, n, self.max_batch):
            stop = min(n, start + self.max_batch)
            out[start:stop] = self.session.run([OUTPUT_NAME], {INPUT_NAME: windows[start:stop]})[0]
        return out

    def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [n], per-feature errors float32 [n, F]) of normalised windows [n, W, F],
        by the bundle's scoring rule."""
        w, f = self.bundle.window, self.bundle.n_features
        if windows.ndim != 3 or windows.shape[1:] != (w, f):
            raise ValueError(f"windows must have shape [n, {w}, {f}], got {list(windows.shape)}.")
        n = windows.shape[0]
        if n == 0:
            return np.zeros(0, np.float32), np.zeros((0, f), np.float32)
        scores = np.empty(n, dtype=np.float32)
        errors = np.empty((n, f), dtype=np.float32)
        for start in range(0, n, self.max_batch):
            stop = min(n, start + self.max_batch)
            x = np.ascontiguousarray(windows[start:stop], dtype=np.float32)
            r = self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
            s, fe = self.bundle.scoring.scores(x, r)
            scores[start:stop] = s
            errors[start:stop] = fe
        return scores, errors
