"""Why a pooled bundle is calibrated in each entity's own frame: the bars its validation scores give,
pooled raw against per entity (core/calibration.py, `entity_frame`).

    .venv/bin/python bench/entity_frame.py [--work /tmp/g17] [--datasets trend,heavy_tails] [--level 4]

For every Transformer bundle that bench/generality.py cached in --work for these datasets, the
validation windows are scored again as `fit` scored them (the same plan, ONNX Runtime) and, per
entity, it prints the 1-in-10^level bar read from a tail fitted to the pooled raw scores (moved by
the entity's level, as the service moves it), from a tail fitted to that entity's scores alone,
and from a tail fitted to the scores in each entity's frame (the calibration `fit` now writes),
with the fitted tail shapes. Data and models only: no replay.

With --unknown it also prices the one case the frame makes worse, an entity the bundle never saw:
the raw scores that bench/generality.py's replays recorded ("new default") are judged again by each
entity's calibrated threshold as a known entity (its level from the bundle), as an unknown one (the
calibration's level, its own after 100 scores) and with the calibration pooled raw (the code before
the frame), and it prints the false openings (away from incidents, crossings more than
generality.OPENING_GAP rows apart) in the first 1,000 rows and in all, and the incidents with a
score judged anomalous (within 5 rows). An estimate: the alert lifecycle's re-baselining per alert is
left out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from stream_detector.core.bundle import load_bundle  # noqa: E402
from stream_detector.core.calibration import (  # noqa: E402
    TAIL_LEVEL,
    ScoreDistribution,
    ScoreReference,
    describe_distribution,
    entity_frame,
)
from stream_detector.core.thresholds import Calibrated, ThresholdParams  # noqa: E402
from stream_detector.offline.measures import segments  # noqa: E402
from training.calibrate import score_windows  # noqa: E402
from training.settings import FitSettings  # noqa: E402
from training.sizing import size_to_data  # noqa: E402
from training.source import read_training_table  # noqa: E402


def validation_scores(bundle_dir: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(validation scores, each one's entity, the windows' start rows) of a bundle, as `fit` computed them."""
    bundle = load_bundle(bundle_dir)
    given = json.loads((bundle_dir / "bundle.json").read_bytes())["training"]["settings"]
    settings = FitSettings(**{k: v for k, v in given.items() if v is not None})
    plan = size_to_data(settings, read_training_table(settings)).plan
    data = bundle.normaliser.apply(plan.data.astype(np.float32))
    scores = score_windows(bundle.model_path.read_bytes(), data, plan.val_starts, bundle.window, bundle.scoring).scores
    return scores.astype(np.float64), plan.entities_of(plan.val_starts), plan.val_starts


def newest_bundles(work: Path, datasets: list[str]) -> list[Path]:
    """Per dataset and seed, the "new default" bundle (the detectors `fit` chooses for the history, e.g.
    transformer+zscore for one feature) that bench/generality.py trained last in `work` (older code
    leaves others), in name order."""
    from types import SimpleNamespace

    from generality import default_variant

    newest: dict[str, Path] = {}
    for name in datasets:
        for history in sorted((work / "data").glob(f"{name}-seed*/history.csv")):
            variant = default_variant(history, "csv", SimpleNamespace(work=work))
            cached = (work / "bundles").glob(f"{history.parent.name}-history-{variant}-*")
            for d in sorted(cached, key=lambda d: d.stat().st_mtime):
                if (d / "bundle.json").is_file():
                    newest[history.parent.name] = d
    return [newest[k] for k in sorted(newest)]


def unknown_entity_table(work: Path, datasets: list[str], window: int = 64, tolerance: int = 5) -> None:
    """The --unknown table (module docstring)."""
    from generality import normal_level, openings, replayed_series, synthetic

    from training.calibrate import calibrate

    print("| dataset | judged as | false openings, first 1,000 rows | false openings, all | incidents alerted |")
    print("|---|---|---|---|---|")
    for name in datasets:
        totals: dict[str, list[int]] = {}
        for d in newest_bundles(work, [name]):
            seed = int(d.name.split("-history")[0].rsplit("seed", 1)[1])
            scores, keys, starts = validation_scores(d)
            n_entities = len(set(keys))
            framed = ScoreReference.from_calibration(load_bundle(d).calibration, n_entities)  # what fit wrote
            pooled = ScoreReference.from_calibration(calibrate(scores, 0.999, starts, None), n_entities)
            refs = {"known (own level)": (framed, True), "unknown (warms up)": (framed, False),
                    "pooled raw (before)": (pooled, False)}
            for series in replayed_series(work, synthetic(name, seed, work), seed, "new default"):
                near, _ = normal_level(series.labels, series.score, window, tolerance)
                for label, (ref, known) in refs.items():
                    assert ref is not None
                    t = Calibrated(ref, ThresholdParams(), ref.level_of(series.key) if known else None)
                    anomalous = np.array([not np.isnan(x) and t.observe(float(x))[1] for x in series.score])
                    opened = openings(anomalous)
                    false = opened[~near[opened]]
                    incidents = segments(series.labels)
                    hit = sum(bool(anomalous[max(0, a - tolerance) : b + tolerance].any()) for a, b in incidents)
                    t_first, t_all, t_hit, t_n = totals.setdefault(label, [0, 0, 0, 0])
                    totals[label] = [t_first + int((false < 1000).sum()), t_all + false.size, t_hit + hit,
                                     t_n + len(incidents)]
        for label, (first, every, hit, n) in totals.items():
            print(f"| {name} | {label} | {first} | {every} | {hit}/{n} |")


def tail(scores: np.ndarray, level: float) -> tuple[float, float]:
    """(fitted tail shape, the score of surprise `level`)."""
    q, t = describe_distribution(scores)
    return t["shape"], math.exp(ScoreDistribution.from_json(q, t).log_score_at(level))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/g17"), help="bench/generality.py's --work")
    p.add_argument("--datasets", default="trend,heavy_tails,seasonal")
    p.add_argument("--level", type=float, default=4.0, help="the alert level (surprise)")
    p.add_argument("--unknown", action="store_true", help="also price an entity the bundle never saw (docstring)")
    args = p.parse_args(argv)
    dirs = newest_bundles(args.work, args.datasets.split(","))
    if not dirs:
        print(f"entity_frame: no cached bundles of {args.datasets} in {args.work}; run bench/generality.py first.")
        return 2
    print("| bundle | entity | own q90 / pooled q90 | pooled raw: shape, bar (x level) | own: shape, bar "
          "| own frame: shape, bar |")
    print("|---|---|---|---|---|---|")
    for d in dirs:
        scores, keys, _ = validation_scores(d)
        framed, levels = entity_frame(scores, keys)
        pooled_shape, pooled_bar = tail(scores, args.level)
        framed_shape, framed_bar = tail(framed, args.level)
        pooled_q90 = float(np.quantile(scores, TAIL_LEVEL))
        for key in sorted(set(keys)):
            own = scores[np.asarray(keys) == key]
            ratio = float(np.quantile(own, TAIL_LEVEL)) / pooled_q90
            own_shape, own_bar = tail(own, args.level)
            frame = f"{framed_shape:.2f}, {framed_bar * math.exp(levels[key]):.3g}" if key in levels else "(not framed)"
            # the service moves the pooled bar by the entity's level, within max_shift (2) either way
            moved = pooled_bar * min(max(ratio, 0.5), 2.0)
            print(f"| {d.name.split('-history')[0]} | {key} | {ratio:.2f} | {pooled_shape:.2f}, {moved:.3g} | "
                  f"{own_shape:.2f}, {own_bar:.3g} | {frame} |")
    if args.unknown:
        print()
        unknown_entity_table(args.work, args.datasets.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
