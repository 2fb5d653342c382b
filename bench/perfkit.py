"""Shared pieces of the benchmarks: broker start, reference bundle, standalone ONNX Runtime rate,
pre-encoded messages, and CPU accounting per pipeline stage.

Imports only numpy, orjson, onnxruntime and the repository (no confluent-kafka, no pydantic), so
`bench/inprocess.py` also runs on a GPU host where only those are installed.

CPU accounting: `StageClock.wrap(obj, "method", "stage")` replaces a method of one object with a
version that adds the calling thread's CPU time (`time.thread_time`) to a stage; nested stages are
subtracted by the caller. `thread_cpu()` reads every thread's CPU time from /proc (Linux), which
is how the CPU of threads we do not run ourselves (ONNX Runtime's pool, librdkafka's `rdk:*`
threads) is counted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
REFERENCE_BUNDLE = REPO / "bench" / "reference_bundle"  # F=38, W=64, d_model=64, 2 layers (DESIGN.md)

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def start_broker() -> str:
    """Start (or find) the local development broker; returns its bootstrap address."""
    r = subprocess.run(["bash", str(REPO / "deploy/kafka/broker.sh"), "start"], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        sys.exit(f"bench: could not start the local broker: {r.stderr.strip()}")
    return [ln for ln in r.stdout.splitlines() if ln.startswith("bootstrap=")][-1].split("=", 1)[1]


def reference_bundle(work: Path, features: int = 38, window: int = 64) -> Path:
    """The committed reference bundle when it matches, else the reference architecture trained for
    one short epoch on simulated normal data (throughput does not depend on how well it is trained)."""
    if features == 38 and window == 64 and (REFERENCE_BUNDLE / "bundle.json").exists():
        return REFERENCE_BUNDLE
    from stream_detector.offline.simulate import SimConfig, Simulator, write_file

    data = work / "normal.csv"
    write_file(Simulator(SimConfig(entities=40, features=features, seed=5), 400), data)
    out = work / "bundle"
    cmd = [sys.executable, "-m", "training.cli", "--log-level", "WARNING", "fit", "--data", str(data), "--out", str(out),
           "--window", str(window), "--d-model", "64", "--n-layers", "2", "--epochs", "1", "--max-windows-per-epoch", "2048",
           "--threads", "2", "--no-progress"]
    subprocess.run(cmd, check=True, timeout=1800, cwd=REPO)
    return out


def standalone_ort(bundle_path: Path, provider: str, batch: int, seconds: float, threads: int | None = None) -> tuple[float, str, float]:
    """(windows/s, active provider, process CPU seconds per 1,000 windows) of the bundle's model
    alone through `Scorer.score` (host arrays in, scores out) on random windows of `batch`."""
    from stream_detector.core.bundle import load_bundle
    from stream_detector.core.scorer import Scorer

    bundle = load_bundle(bundle_path)
    scorer = Scorer(bundle, provider=provider, max_batch=batch, intra_op_threads=threads)
    x = np.random.default_rng(0).normal(size=(batch, bundle.window, bundle.n_features)).astype(np.float32)
    scorer.score(x)  # warm-up
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        scorer.score(x)
        n += batch
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return n / wall, scorer.provider, 1000 * cpu / n


class FakeMessage:
    """The part of confluent_kafka.Message the decoder reads, for benchmarks without a broker."""

    __slots__ = ("_value", "_key", "_ts", "_topic", "_partition", "_offset")

    def __init__(self, value: bytes, key: bytes, ts: int, topic: str, partition: int, offset: int) -> None:
        self._value, self._key, self._ts = value, key, ts
        self._topic, self._partition, self._offset = topic, partition, offset

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes:
        return self._key

    def timestamp(self) -> tuple[int, int]:
        return (1, self._ts)  # TIMESTAMP_CREATE_TIME

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def headers(self) -> None:
        return None

    def error(self) -> None:
        return None


def simulated_messages(entities: int, ticks: int, features: int = 38, partitions: int = 4, seed: int = 11,
                       topic: str = "bench") -> tuple[list[FakeMessage], list[str]]:
    """Contract-2 JSON events of a simulated fleet (tick-major), as messages; plus the feature names."""
    from stream_detector.offline.simulate import SimConfig, Simulator

    sim = Simulator(SimConfig(entities=entities, features=features, anomaly_rate=1.0, warmup=0, seed=seed), ticks)
    offsets = [0] * partitions
    out = []
    for key, ts, value in sim.events():
        p = hash_partition(key, partitions)
        out.append(FakeMessage(value, key.encode(), ts, topic, p, offsets[p]))
        offsets[p] += 1
    return out, list(sim.features)


def hash_partition(key: str, partitions: int) -> int:
    return int.from_bytes(key.encode()[-4:].rjust(4, b"\0"), "big") % partitions


def input_settings(timestamp_field: str | None = "ts", key_field: str | None = None) -> Any:
    """`config.InputSettings` when pydantic is installed, else an object with the same fields."""
    try:
        from stream_detector.config import InputSettings

        return InputSettings(timestamp_field=timestamp_field, key_field=key_field)
    except ImportError:
        from types import SimpleNamespace

        return SimpleNamespace(key_field=key_field, timestamp_field=timestamp_field, timestamp_unit="ms", max_message_bytes=65536)


class StageClock:
    """Thread CPU seconds per named stage, accumulated by wrapped methods (thread-safe)."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.threads: dict[str, set[int]] = defaultdict(set)
        self._lock = threading.Lock()

    def wrap(self, obj: Any, attr: str, stage: str) -> None:
        inner: Callable[..., Any] = getattr(obj, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                dt = time.thread_time() - t
                with self._lock:
                    self.cpu[stage] += dt
                    self.calls[stage] += 1
                    self.threads[stage].add(threading.get_native_id())

        object.__setattr__(obj, attr, timed)  # frozen dataclasses (the normaliser) too


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc's unit of CPU time


def stat_cpu_s(stat_file: Path) -> float:
    """User + system CPU seconds from a /proc/PID/stat or /proc/PID/task/TID/stat file."""
    stat = stat_file.read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def thread_cpu() -> dict[int, tuple[str, float]]:
    """{native thread id: (thread name, CPU seconds)} of this process, from /proc (empty elsewhere)."""
    out: dict[int, tuple[str, float]] = {}
    base = Path(f"/proc/{os.getpid()}/task")
    if not base.exists():
        return out
    for d in base.iterdir():
        try:
            out[int(d.name)] = ((d / "comm").read_text().strip(), stat_cpu_s(d / "stat"))
        except (OSError, ValueError, IndexError):
            continue
    return out


def cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[int, tuple[str, float]]:
    return {tid: (name, cpu - before.get(tid, (name, 0.0))[1]) for tid, (name, cpu) in after.items()}


def settled_rss_bytes() -> int:
    """RSS after a full garbage collection and glibc's malloc_trim: memory an earlier run freed
    is given back first, so that runs in one process do not inherit each other's footprint."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    return rss_bytes()


def rss_bytes() -> int:
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def prepare_cuda() -> dict[str, Any]:
    """Load the CUDA libraries onnxruntime-gpu links against before any session is created:
    `import torch` (its wheels carry cuBLAS/cuDNN) and, where this onnxruntime has it,
    `onnxruntime.preload_dlls()`. Returns what was found, for the result files."""
    import platform

    info: dict[str, Any] = {"python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = bool(torch.cuda.is_available())
        if info["torch_cuda"]:
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception as e:  # no torch: onnxruntime must find the CUDA libraries by itself
        info["torch"] = f"not usable: {type(e).__name__}: {e}"
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_file"] = str(Path(ort.__file__).parent)
        if hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()
            except Exception as e:
                info["preload_dlls"] = f"failed: {e}"
        info["available_providers"] = ort.get_available_providers()
    except Exception as e:
        info["onnxruntime"] = f"not usable: {type(e).__name__}: {e}"
    return info


class ThreadCpuSampler:
    """Per-thread CPU seconds over an interval, threads that exit during it included: /proc is
    sampled every `period` seconds and each thread's last reading kept (a thread's CPU after its
    last sample, at most `period` of it, is missed)."""

    def __init__(self, period: float = 0.25) -> None:
        self.period = period
        self._before = thread_cpu()
        self._last: dict[int, tuple[str, float]] = dict(self._before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._last.update(thread_cpu())

    def stop(self) -> dict[int, tuple[str, float]]:
        self._stop.set()
        self._thread.join()
        self._last.update(thread_cpu())
        me = self._thread.native_id
        return {tid: v for tid, v in cpu_delta(self._before, self._last).items() if tid != me}
