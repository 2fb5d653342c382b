"""How far a short history's tail is from the rest of the series: the smd-series datasets of
bench/generality.py, in the data alone (no model).

    .venv/bin/python bench/smd_series_tails.py [--data ../shared/data] [--machines machine-1-7,machine-2-1]

For every metric that an SMD machine's interpretation labels name (one series of smd-series), with
the history cut as the issue's trial cut it (the first 15 % of the series, at most 750 rows) and the
last `val_fraction` (20 %) of it held out as `fit` holds it out, it prints the largest row-to-row
jump in the history's validation part, in the whole history, and the 99.9 % and 99.99 % quantiles of
the jumps in the replayed rest, each in units of the history's standard deviation. A calibration
sees only the validation part: where the history or the rest jumps much further than that part, no
tail fitted to it describes the series' 1-in-10,000 scores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from generality import interpretation_spans, trial_history_rows  # noqa: E402

VAL_FRACTION = 0.2  # fit's default val_fraction


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="folder holding smd/")
    p.add_argument("--machines", default="machine-1-7,machine-2-1", help="the development machines by default")
    args = p.parse_args(argv)
    root = args.data / "smd"
    print("| machine | metric | validation part: largest jump | history: largest jump | rest: 99.9 % jump | rest: 99.99 % jump |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for machine in args.machines.split(","):
        try:
            values = np.loadtxt(root / "test" / f"{machine}.txt", delimiter=",", ndmin=2)
            dims = sorted(interpretation_spans(root / "interpretation_label" / f"{machine}.txt"))
        except OSError as e:
            print(f"smd_series_tails: cannot read machine {machine!r} under {root} ({str(e).rstrip('.')}).", file=sys.stderr)
            return 2
        h = trial_history_rows(len(values))
        v0 = h - int(VAL_FRACTION * h)
        for d in dims:
            col = values[:, d]
            sd = float(np.std(col[:h]))
            if sd == 0:  # constant history: not a series of smd-series
                continue
            val = np.abs(np.diff(col[v0:h])).max() / sd
            hist = np.abs(np.diff(col[:h])).max() / sd
            rest = np.quantile(np.abs(np.diff(col[h:])), [0.999, 0.9999]) / sd
            ratios.append((hist / max(val, 1e-9), rest[1] / max(val, 1e-9)))
            print(f"| {machine} | {d + 1} | {val:.1f} | {hist:.1f} | {rest[0]:.1f} | {rest[1]:.1f} |")
    r = np.array(ratios)
    print(f"\n{len(r)} series. Median ratio to the validation part's largest jump: history {np.median(r[:, 0]):.1f}x, "
          f"rest's 99.99 % jump {np.median(r[:, 1]):.1f}x; series whose rest's 99.99 % jump passes 3x it: "
          f"{int((r[:, 1] > 3).sum())}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
