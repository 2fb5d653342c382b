"""Why a pooled bundle is calibrated in each entity's own frame: the bars its validation scores give,
pooled raw against per entity (core/calibration.py, `entity_frame`).

    .venv/bin/python bench/entity_frame.py [--work /tmp/g17] [--datasets trend,heavy_tails] [--level 4]

For every Transformer bundle that bench/generality.py cached in --work for these datasets, the
validation windows are scored again as `fit` scored them (the same plan, ONNX Runtime) and, per
entity, it prints the 1-in-10^level bar read from a tail fitted to the pooled raw scores (moved by
the entity's level, as the service moves it), from a tail fitted to that entity's scores alone,
and from a tail fitted to the scores in each entity's frame (the calibration `fit` now writes),
with the fitted tail shapes. Data and models only: no replay.
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

from stream_detector.core.bundle import load_bundle  # noqa: E402
from stream_detector.core.calibration import TAIL_LEVEL, ScoreDistribution, describe_distribution, entity_frame  # noqa: E402
from training.calibrate import score_windows  # noqa: E402
from training.settings import FitSettings  # noqa: E402
from training.sizing import size_to_data  # noqa: E402
from training.source import read_training_table  # noqa: E402


def validation_scores(bundle_dir: Path) -> tuple[np.ndarray, list[str]]:
    """(validation scores, each one's entity) of a bundle, as `fit` computed them."""
    bundle = load_bundle(bundle_dir)
    given = json.loads((bundle_dir / "bundle.json").read_bytes())["training"]["settings"]
    settings = FitSettings(**{k: v for k, v in given.items() if v is not None})
    plan = size_to_data(settings, read_training_table(settings)).plan
    data = bundle.normaliser.apply(plan.data.astype(np.float32))
    scores = score_windows(bundle.model_path.read_bytes(), data, plan.val_starts, bundle.window, bundle.scoring).scores
    return scores.astype(np.float64), plan.entities_of(plan.val_starts)


def tail(scores: np.ndarray, level: float) -> tuple[float, float]:
    """(fitted tail shape, the score of surprise `level`)."""
    q, t = describe_distribution(scores)
    return t["shape"], math.exp(ScoreDistribution.from_json(q, t).log_score_at(level))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/g17"), help="bench/generality.py's --work")
    p.add_argument("--datasets", default="trend,heavy_tails,seasonal")
    p.add_argument("--level", type=float, default=4.0, help="the alert level (surprise)")
    args = p.parse_args(argv)
    newest: dict[str, Path] = {}  # per dataset and seed, the bundle trained last (older code leaves others)
    for name in args.datasets.split(","):
        cached = (args.work / "bundles").glob(f"{name}-seed*-history-transformer*")
        for d in sorted(cached, key=lambda d: d.stat().st_mtime):
            if (d / "bundle.json").is_file():
                newest[d.name.split("-history")[0]] = d
    dirs = [newest[k] for k in sorted(newest)]
    if not dirs:
        print(f"entity_frame: no cached bundles of {args.datasets} in {args.work}; run bench/generality.py first.")
        return 2
    print("| bundle | entity | own q90 / pooled q90 | pooled raw: shape, bar (x level) | own: shape, bar "
          "| own frame: shape, bar |")
    print("|---|---|---|---|---|---|")
    for d in dirs:
        scores, keys = validation_scores(d)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
