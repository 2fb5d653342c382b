"""How many of the incidents a replay counts as alerted were alerted by an alert opened before them
and still open (an alert held open longer covers more of them), against those with an alert
opening inside them: the stricter reading of event recall, for choosing how long alerts stay open.

    .venv/bin/python bench/held_open.py --work WORK --datasets univariate,smd:machine-1-7 \
        --detectors 'new default|new default, resolve_after=150' [--seeds 0,1,2]

Reads what `bench/generality.py` replayed (same --work, dataset names, detector labels and seeds)
and prints, per dataset and detector, pooled over the seeds: incidents, alerted (an alert episode
within `--tolerance` rows of the incident, as the generality table counts them) and of those, the
ones with no alert *opening* within the incident (plus tolerance): held open from before it; then the
false openings (episodes near no incident, as the table counts them) and the event F1 of the strict
reading: incidents with an opening inside, against them plus the false openings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from generality import Dataset, replay_folder, smd, smd_series, synthetic  # noqa: E402

from stream_detector.offline.evalinputs import read_labels, read_scores  # noqa: E402
from stream_detector.offline.measures import event_metrics, segments  # noqa: E402


def dataset(name: str, seed: int, work: Path, data: Path) -> Dataset:
    kind, _, machine = name.partition(":")
    if kind == "smd":
        return smd(machine, data / "smd")
    if kind == "smd-series":
        return smd_series(machine, data / "smd", work)
    return synthetic(name, seed, work)


def held_open(ds: Dataset, work: Path, seed: int, label: str, tolerance: int) -> tuple[int, int, int, int]:
    """(incidents, alerted, alerted only by an alert opened before them, false episodes) over a
    dataset's entities."""
    incidents = alerted = held = false = 0
    for key, _, labels_path in ds.parts:
        scores_csv = replay_folder(work, ds.name, seed, label, key) / "scores.csv"
        if not scores_csv.is_file():
            raise SystemExit(f"{scores_csv} does not exist; run bench/generality.py with detector {label!r} first.")
        st = read_scores(scores_csv)
        order = np.argsort(st.row, kind="stable")
        open_rows = np.asarray([e == "open" for e in st.event], dtype=bool)[order]
        on = st.alert[order] | open_rows
        labels = read_labels(labels_path, st.n).astype(bool)
        false += event_metrics(labels, on, tolerance)["false_episodes"]
        for a, b in segments(labels):
            lo, hi = max(0, a - tolerance), min(labels.size, b + tolerance)
            incidents += 1
            if on[lo:hi].any():
                alerted += 1
                held += int(not open_rows[lo:hi].any())
    return incidents, alerted, held, false


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--datasets", required=True)
    p.add_argument("--detectors", default="new default", metavar="LABEL[|LABEL]")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tolerance", type=int, default=5)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = p.parse_args(argv)
    print("| dataset | detector | incidents | alerted | of them held open from before | alerted with an opening inside "
          "| false openings | event F1, strict |")
    print("|---|---|---|---|---|---|---|---|")
    for name in [n.strip() for n in args.datasets.split(",") if n.strip()]:
        for label in [d.strip() for d in args.detectors.split("|") if d.strip()]:
            total = [0, 0, 0, 0]
            for seed in (int(s) for s in args.seeds.split(",")):
                counts = held_open(dataset(name, seed, args.work, args.data), args.work, seed, label, args.tolerance)
                total = [t + c for t, c in zip(total, counts)]
            n, hit, held, false = total
            strict = hit - held
            recall, precision = strict / max(n, 1), strict / max(strict + false, 1)
            f1 = 2 * precision * recall / (precision + recall) if strict else 0.0
            print(f"| {name} | {label} | {n} | {hit} | {held} | {strict} ({recall:.2f}) | {false} | {f1:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
