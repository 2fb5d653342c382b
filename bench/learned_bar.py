"""What a bar learned from each entity's own stream could reach on the smd-series datasets: an
upper bound for the next step of issue 17, not a detector.

    .venv/bin/python bench/learned_bar.py [--work /tmp/stream-detector-generality] [--detector 'new default'] [--seed 0]

Reads the raw scores that `bench/generality.py --datasets smd-series:MACHINE` replayed (its --work)
and, per series, fixes one bar from the first N replayed rows (rows of labelled incidents left out:
an oracle, which no service has), then counts over the rows after them: incidents with a score past
the bar, and false openings (a crossing more than `generality.OPENING_GAP` rows after the previous one, the
service's resolve-after plus cool-down, that no incident is near). Bars: the 99.9 % and 99.99 % quantiles of
those N rows' scores and 1.5 x their largest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from generality import openings, replayed_series, smd_series  # noqa: E402

from stream_detector.offline.measures import segments  # noqa: E402

TOLERANCE = 5


def one_series(scores: np.ndarray, labels: np.ndarray, n: int, bar_of: str, window: int) -> tuple[int, int, int, int]:
    """(incidents after row n, of them crossed, false openings, rows after n)."""
    learn = scores[:n][~labels[:n] & ~np.isnan(scores[:n])]
    bar = 1.5 * learn.max() if bar_of == "max" else float(np.quantile(learn, float(bar_of)))
    crossed = np.nan_to_num(scores, nan=-np.inf) > bar
    crossed[:n] = False
    opens = openings(crossed)
    near = np.zeros(labels.size, dtype=bool)
    incidents = [(a, b) for a, b in segments(labels) if a >= n]
    hit = 0
    for a, b in incidents:
        near[max(0, a - TOLERANCE) : b + window + TOLERANCE] = True
        hit += bool(crossed[max(0, a - TOLERANCE) : b + TOLERANCE].any())
    return len(incidents), hit, sum(1 for i in opens if not near[i]), labels.size - n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="folder holding smd/")
    p.add_argument("--machines", default="machine-1-7,machine-2-1", help="the development machines by default")
    p.add_argument("--work", type=Path, default=Path("/tmp/stream-detector-generality"))
    p.add_argument("--detector", default="new default", help="the detector's label in generality.py's table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=64, help="rows after an incident that still count as near it")
    args = p.parse_args(argv)
    series = []  # (scores, labels) of every replayed series
    for machine in args.machines.split(","):
        ds = smd_series(machine, args.data / "smd", args.work)
        series += [(s.score, s.labels) for s in replayed_series(args.work, ds, args.seed, args.detector)]
    print("| rows learned | bar | incidents crossed | false openings | per 1,000 rows |")
    print("|---|---|---|---|---|")
    for n in (2000, 5000):
        for bar_of in ("0.999", "0.9999", "max"):
            totals = np.sum([one_series(scores, labels, n, bar_of, args.window) for scores, labels in series], axis=0)
            inc, hit, false, rows = (int(v) for v in totals)
            shown = "1.5 x largest" if bar_of == "max" else f"{float(bar_of) * 100:g} % quantile"
            print(f"| {n} | {shown} | {hit}/{inc} | {false} | {1000 * false / rows:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
