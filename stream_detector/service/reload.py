"""Atomic model hot reload: a new bundle replaces the running one between two batches, or not at all.

Triggers: SIGHUP (`install_sighup`, or `request()` from anywhere), or a change of the watched
bundle path (polled from the loop: the directory's resolved target and the inode/mtime/size of
bundle.json and model.onnx, so both "copy a new bundle over it" and "re-point a `current` symlink
at a new version directory" are seen). A change must hold still for one more poll before it is
loaded, so a bundle that is still being copied is not picked up half-written.

What happens on a trigger, on a background thread so the loop keeps scoring with the old model:
  1. `load_bundle` verifies the new bundle (schema, sha256 of model.onnx, input/output shapes);
  2. it must be compatible with the running one: the same feature names in the same order and the
     same window length (the window store holds raw rows of exactly those columns; anything else
     needs a restart, and the refusal says so);
  3. a new scorer is built with the running provider settings and warmed up on a small batch
     (`Scorer.warm_up`: the first ONNX Runtime call sets up; the output must be finite);
  4. the loop's next `poll()` returns the `LoadedModel`; the loop swaps it in before its next batch.
A failure at any step keeps the old model and logs one sentence saying why. Nothing is half-swapped:
the running model is only replaced by a fully verified, warmed-up one.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stream_detector.core.bundle import BUNDLE_FILE, MODEL_FILE, Bundle, BundleError, load_bundle

log = logging.getLogger(__name__)


class ReloadError(Exception):
    """A new bundle that cannot replace the running one; one sentence for the operator."""


@dataclass(frozen=True)
class LoadedModel:
    bundle: Bundle
    scorer: Any  # stream_detector.core.scorer.Scorer (anything with .score(windows) -> (scores, errors))


def check_compatible(current: Bundle, new: Bundle) -> None:
    """The new bundle must read the same columns into windows of the same length."""
    if tuple(new.features) != tuple(current.features):
        added = [f for f in new.features if f not in current.features]
        removed = [f for f in current.features if f not in new.features]
        if added or removed:
            detail = ", ".join(
                part for part in (f"adds {added}" if added else "", f"removes {removed}" if removed else "") if part
            )
        else:
            detail = "lists the same features in another order"
        raise ReloadError(
            f"the new bundle {detail} compared with model {current.model_version}; "
            "a different feature schema needs a restart, not a reload."
        )
    if new.window != current.window:
        raise ReloadError(
            f"the new bundle has window {new.window} but model {current.model_version} has {current.window}; "
            "a different window length needs a restart, not a reload."
        )


def _signature(path: Path) -> tuple[Any, ...] | None:
    """What identifies the bundle on disk now; None while it is incomplete (mid-swap)."""
    try:
        real = os.path.realpath(path)
        parts: list[Any] = [real]
        for name in (BUNDLE_FILE, MODEL_FILE):
            st = os.stat(os.path.join(real, name))
            parts += [st.st_ino, st.st_mtime_ns, st.st_size]
        return tuple(parts)
    except OSError:
        return None


class ModelReloader:
    """Owned by the loop. `poll()` between batches; everything else runs on a helper thread."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        current: Bundle,
        build_scorer: Callable[[Bundle], Any],
        *,
        watch: bool = True,
        watch_interval_s: float = 2.0,
        on_result: Callable[[bool, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.current = current
        self._build_scorer = build_scorer
        self._watch = watch
        self._watch_interval_s = float(watch_interval_s)
        self._on_result = on_result
        self._clock = clock
        self._requested = threading.Event()
        self._request_reason = "request"
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._ready: LoadedModel | None = None
        self._seen = _signature(self.path)  # the signature of what runs now
        self._candidate: tuple[Any, ...] | None = None
        self._next_watch = clock() + self._watch_interval_s
        self.last_error: str | None = None

    # ---- triggers ----------------------------------------------------------------------------
    def request(self, reason: str = "request") -> None:
        """Ask for a reload at the loop's next poll (safe from a signal handler or another thread)."""
        self._request_reason = reason
        self._requested.set()

    def install_sighup(self) -> Any:
        """SIGHUP requests a reload; returns the previous handler. Main thread only (Python's rule)."""
        return signal.signal(signal.SIGHUP, lambda signum, frame: self.request("SIGHUP"))

    # ---- the loop's side ---------------------------------------------------------------------
    def poll(self) -> LoadedModel | None:
        """Called between batches: notices path changes, starts a load when asked, and hands back
        a verified, warmed-up model once (the caller swaps it in before its next batch)."""
        if self._watch:
            self._check_path()
        if self._requested.is_set() and not self.busy:
            self._requested.clear()
            self._start(self._request_reason)
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is not None:
            self.current = ready.bundle
        return ready

    @property
    def busy(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def wait(self, timeout: float = 30.0) -> None:
        """Wait for a running load to finish (tests, shutdown)."""
        if self._worker is not None:
            self._worker.join(timeout)

    def _check_path(self) -> None:
        now = self._clock()
        if now < self._next_watch:
            return
        self._next_watch = now + self._watch_interval_s
        sig = _signature(self.path)
        if sig is None or sig == self._seen:
            self._candidate = None
            return
        if sig != self._candidate:  # changed since the last look: wait until it holds still
            self._candidate = sig
            return
        self._candidate = None
        self._seen = sig
        self.request(f"{self.path} changed")

    def _start(self, reason: str) -> None:
        self._worker = threading.Thread(target=self._load, args=(reason,), name="model-reload", daemon=True)
        self._worker.start()

    def _load(self, reason: str) -> None:
        old = self.current
        log.info("model reload (%s): loading %s", reason, self.path)
        sig = _signature(self.path)
        try:
            new = load_bundle(self.path)
            if new.model_sha256 == old.model_sha256 and new.model_version == old.model_version:
                log.info(
                    "model reload (%s): %s still holds model %s; nothing to do", reason, self.path, old.model_version
                )
                return
            check_compatible(old, new)
            try:
                scorer = self._build_scorer(new)
                scorer.warm_up()  # verified on real inference before it replaces anything
            except Exception as e:  # ScorerError and the like: one sentence from the scorer
                raise ReloadError(str(e)) from None
        except (BundleError, ReloadError) as e:
            self.last_error = str(e)
            log.error("model reload (%s) failed, keeping model %s: %s", reason, old.model_version, e)
            self._report(False, str(e))
            return
        except Exception as e:  # never let a reload take the service down
            self.last_error = f"{type(e).__name__}: {e}"
            log.error("model reload (%s) failed, keeping model %s: %s", reason, old.model_version, self.last_error)
            self._report(False, self.last_error)
            return
        if sig is not None:
            self._seen = sig
        self.last_error = None
        with self._lock:
            self._ready = LoadedModel(new, scorer)
        log.info(
            "model reload (%s): model %s verified and warmed up; switching at the next batch", reason, new.model_version
        )
        self._report(True, new.model_version)

    def _report(self, ok: bool, detail: str) -> None:
        if self._on_result is not None:
            try:
                self._on_result(ok, detail)
            except Exception:  # a metrics hook must not break reloading
                log.exception("the reload result hook failed")
