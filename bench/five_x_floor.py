"""What the issue's 5x rule costs in false alerts, from the data alone: per dataset, the false
openings of a bar at exactly 5x each entity's normal scores (the lowest bar that alerts on every
incident whose raw score passes 5x them), against the issue's limit of 1 per 5,000 rows.

    .venv/bin/python bench/five_x_floor.py [--work /tmp/stream-detector-generality] [--datasets heavy_tails,trend]

Reads the raw scores that `bench/generality.py` replayed (its --work, the detector's label, the
seeds) and counts, per entity, the rows away from every incident (`normal_level`) whose score passes
5x the normal scores, as the service would open them: a crossing more than `generality.OPENING_GAP` rows after the
previous one (the service's resolve-after plus cool-down: 150 + 60). Any bar low enough for the 5x rule opens at least
these; a dataset whose floor is above the limit cannot meet both targets with one bar.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from generality import FIVE_X, MAX_FALSE_PER_ROWS, normal_level, openings, replayed_series, synthetic  # noqa: E402

from stream_detector.offline.series import SUITE  # noqa: E402

def floor_openings(labels: np.ndarray, scores: np.ndarray, window: int, tolerance: int) -> tuple[int, int]:
    """(false openings of a bar at 5x the entity's normal scores, rows away from incidents)."""
    near, level = normal_level(labels, scores, window, tolerance)
    if level is None:
        return 0, 0
    opens = openings(~near & (np.nan_to_num(scores, nan=-np.inf) > FIVE_X * level)).size
    return opens, int((~near & ~np.isnan(scores)).sum())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/stream-detector-generality"))
    p.add_argument("--datasets", default=",".join(SUITE), help="synthetic datasets that generality.py replayed")
    p.add_argument("--detector", default="new default", help="the detector's label in generality.py's table")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--window", type=int, default=64, help="rows after an incident that still count as near it")
    p.add_argument("--tolerance", type=int, default=5)
    args = p.parse_args(argv)
    print(f"| dataset | false openings of a bar at {FIVE_X:g}x normal | rows | per 1,000 rows (limit {1000 / MAX_FALSE_PER_ROWS:.1f}) |")
    print("|---|---|---|---|")
    for name in args.datasets.split(","):
        opens = rows = 0
        for seed in (int(s) for s in args.seeds.split(",")):
            for s in replayed_series(args.work, synthetic(name, seed, args.work), seed, args.detector):
                o, r = floor_openings(s.labels, s.score, args.window, args.tolerance)
                opens, rows = opens + o, rows + r
        print(f"| {name} | {opens} | {rows} | {1000 * opens / max(rows, 1):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
