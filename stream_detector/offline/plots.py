"""`stream-detector evaluate`'s plots: one PNG per series (score and threshold, labelled ranges,
alert episodes, optionally the signal of the features its alerts named most). matplotlib is
imported lazily; without it there are no plots and a warning."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import orjson

from stream_detector.offline.evalinputs import EvaluationError, Series
from stream_detector.offline.measures import segments

log = logging.getLogger(__name__)


def top_features_from_alerts(alerts_path: Path, limit: int = 3) -> dict[str, list[str]]:
    """Per key, the features most often named in its alerts' `top_features` (contract 3)."""
    if not alerts_path.is_file():
        return {}
    counts: dict[str, dict[str, int]] = {}
    for line in alerts_path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            alert = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        names = []
        for item in alert.get("top_features") or []:
            if isinstance(item, str):
                names.append(item)
            elif isinstance(item, dict):
                name = item.get("feature", item.get("name"))
                if name is not None:
                    names.append(str(name))
        per_key = counts.setdefault(str(alert.get("key")), {})
        for n in names:
            per_key[n] = per_key.get(n, 0) + 1
    return {k: [n for n, _ in sorted(c.items(), key=lambda kv: -kv[1])[:limit]] for k, c in counts.items()}


def write_plots(
    series: list[Series],
    out_dir: Path,
    signals: dict[str, tuple[list[str], np.ndarray]] | None = None,
    title: str = "",
) -> list[Path]:
    """One PNG per series: top features' signal (when given: key -> (names, values [m, k]) aligned
    with the series' rows), score and threshold (log scale), label ranges, alert episodes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install 'stream-detector[train]')")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for s in series:
        sig = (signals or {}).get(s.key)
        n_panels = 2 if sig is not None else 1
        fig, axes = plt.subplots(n_panels, 1, figsize=(14, 2.6 * n_panels + 0.6), sharex=True, squeeze=False)
        axes = axes[:, 0]
        x = s.rows
        if sig is not None:
            names, values = sig
            for j, name in enumerate(names):
                axes[0].plot(x, values[:, j], lw=0.6, label=name)
            axes[0].set_ylabel("top features")
            axes[0].legend(loc="upper right", fontsize=7)
        ax = axes[-1]
        positive = s.score[np.isfinite(s.score) & (s.score > 0)]
        floor = float(positive.min()) if positive.size else 1e-6
        ax.plot(x, np.maximum(s.score, floor), lw=0.5, color="tab:blue", label="score")
        ax.plot(x, np.maximum(s.threshold, floor), lw=0.8, color="tab:orange", label="threshold")
        ax.set_yscale("log")
        ax.set_ylabel("score")
        for axis in axes:
            for a, b in segments(s.labels):
                axis.axvspan(x[a], x[b] + 1, color="tab:red", alpha=0.18, lw=0)
        ymin, ymax = ax.get_ylim()
        for a, b in segments(s.alerted):
            ax.hlines(ymax * 0.8, x[a], x[b] + 1, color="black", lw=3)
        ax.plot([], [], color="tab:red", alpha=0.3, lw=6, label="labelled anomaly")
        ax.plot([], [], color="black", lw=3, label="alert episode")
        ax.legend(loc="upper left", fontsize=7, ncol=4)
        ax.set_xlabel("row")
        fig.suptitle(f"{title} {s.key}".strip(), fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{_safe_name(s.key)}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:80] or "series"


def load_signals(
    input_path: str | Path, fmt: str, series: list[Series], top: dict[str, list[str]], default_count: int = 3
) -> dict[str, tuple[list[str], np.ndarray]]:
    """Feature values of the replayed file for each series' top features (those named most often in
    its alerts; else the features with the largest spread inside its labelled ranges)."""
    from stream_detector.offline.datafiles import DataFileError, read_table

    try:
        table = read_table(input_path, fmt)
    except DataFileError as e:
        raise EvaluationError(str(e)) from None
    by_key = {e.key: e for e in table.by_entity()}
    out = {}
    for s in series:
        ent = by_key.get(s.key)
        if ent is None:
            continue
        pos = {int(r): i for i, r in enumerate(ent.row_index)}
        take = np.asarray([pos.get(int(r), -1) for r in s.rows])
        if np.any(take < 0):
            continue
        values = ent.values[take]
        names = [n for n in top.get(s.key, []) if n in table.features]
        if not names:
            inside = values[s.labels] if s.labels.any() else values
            spread = inside.std(axis=0) / (values.std(axis=0) + 1e-9)
            names = [table.features[j] for j in np.argsort(-spread)[:default_count]]
        cols = [table.features.index(n) for n in names]
        out[s.key] = (names, values[:, cols])
    return out
