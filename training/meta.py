"""The bundle's `training` section, one builder for every training path (`fit`, `baseline`,
`fit --format log` with either log model): the fields all of them record, then each path's own.

Common fields: data_source, data_format, rows, entities, seed, settings, versions (the libraries
that made the bundle), command_line, created_at and seconds (wall time from the start of the fit
to the writing of the bundle)."""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

_LIBRARIES = ("torch", "onnx", "onnxruntime", "numpy")


def library_versions() -> dict[str, str]:
    """Python, this package and the numeric libraries. A library already imported reports its
    own `__version__`; one that is not (torch for the paths that never train with it) is looked up
    in the installed metadata instead of being imported, and is left out when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("stream-detector")
    except PackageNotFoundError:
        own = "unknown"
    out = {"python": platform.python_version(), "stream_detector": own}
    for name in _LIBRARIES:
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "__version__"):
            out[name] = str(mod.__version__)
            continue
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def training_meta(
    *,
    data_source: str | Path,
    data_format: str,
    rows: int,
    entities: int,
    seed: int | None,
    settings: BaseModel,
    command_line: str | None,
    api: str,
    started: float,
    **extras: Any,
) -> dict[str, Any]:
    """The `training` section: the common fields, then `extras` (the path's own figures). `api`
    names the Python entry point recorded when there is no command line; `started` is the
    `time.perf_counter()` reading taken when the fit began."""
    source = str(data_source)
    dump = settings.model_dump(mode="json")
    dump.pop("kafka", None)  # the run TOML's [kafka] table (fit --kafka-topic) may hold credentials
    common = {
        "data_source": source if source.startswith("kafka:") else str(Path(data_source).resolve()),
        "data_format": data_format,
        "rows": int(rows),
        "entities": int(entities),
        "seed": seed,
        "settings": dump,
        "versions": library_versions(),
        "command_line": command_line or f"python API: {api}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - started, 3),
    }
    clash = sorted(set(common) & set(extras))
    if clash:
        raise ValueError(f"the training metadata's own fields cannot be overridden ({', '.join(clash)}).")
    return {**common, **extras}
