"""Where a replay's false alert openings come from: how close each is to the previous false opening
of the same entity, how many came late in a run of them, and how far past the alert level it was.

    .venv/bin/python bench/false_bursts.py --work WORK --datasets smd-series:machine-1-7 [--detector 'new default'] [--seed 0]

Reads what `bench/generality.py` replayed (same --work, dataset name, detector label and seed): each
entity's alerts.jsonl and labels. An opening is false when no labelled row of its entity lies in the
100 rows before it or the 10 after (the window reaches back; the alert may come a little early).
Prints, per dataset: false openings, the share within 300 / 1,000 rows of the previous false
opening of the same entity, the share that were the entity's 10th or later, and the quantiles of
their calibrated value over the alert level (1.0 = just past it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from held_open import dataset  # noqa: E402
from generality import replay_folder  # noqa: E402

from stream_detector.offline.evalinputs import read_labels  # noqa: E402

BEFORE, AFTER = 100, 10  # rows around an opening where a labelled row makes it a true one


def false_openings(alerts_jsonl: Path, labels: np.ndarray) -> list[tuple[int, float]]:
    """(row, calibrated value / alert level) of every false opening of one entity, in order."""
    out = []
    for line in alerts_jsonl.read_bytes().splitlines():
        a = orjson.loads(line)
        if a["state"] != "open":
            continue
        row = int(a["source"]["offset"])
        if not labels[max(0, row - BEFORE) : row + AFTER].any():
            level = a.get("calibrated_threshold") or float("nan")
            out.append((row, (a.get("calibrated_score") or float("nan")) / level))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--datasets", required=True)
    p.add_argument("--detector", default="new default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = p.parse_args(argv)
    for name in [n.strip() for n in args.datasets.split(",") if n.strip()]:
        ds = dataset(name, args.seed, args.work, args.data)
        gaps, late, ratios = [], [], []
        for key, _, labels_path in ds.parts:
            folder = replay_folder(args.work, ds.name, args.seed, args.detector, key)
            if not (folder / "alerts.jsonl").is_file():
                raise SystemExit(f"{folder / 'alerts.jsonl'} does not exist; run bench/generality.py with detector "
                                 f"{args.detector!r} and seed {args.seed} first.")
            labels = read_labels(labels_path, sum(1 for _ in open(folder / "scores.csv")) - 1).astype(bool)
            rows = false_openings(folder / "alerts.jsonl", labels)
            gaps += [b - a for (a, _), (b, _) in zip(rows, rows[1:])] + ([10**9] if rows else [])
            late += [i >= 9 for i in range(len(rows))]
            ratios += [r for _, r in rows]
        g, r = np.asarray(gaps), np.asarray(ratios)
        if not g.size:
            print(f"{name}: no false openings")
            continue
        q = np.nanquantile(r, [0.1, 0.5, 0.9]) if np.isfinite(r).any() else [np.nan] * 3
        print(f"{name} ({args.detector}, seed {args.seed}): {g.size} false openings; within 300 rows of the entity's "
              f"previous one {np.mean(g < 300):.2f}, within 1,000 {np.mean(g < 1000):.2f}; its 10th or later "
              f"{np.mean(late):.2f}; calibrated value / alert level, 10/50/90 %: {q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
