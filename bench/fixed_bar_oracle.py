"""What any fixed bar on a replay's raw scores could reach: an upper bound for threshold rules, not
a detector.

    .venv/bin/python bench/fixed_bar_oracle.py [--work /tmp/stream-detector-generality] [--datasets smd:machine-3-2]
                                               [--detectors 'new default,pca (new thresholds)'] [--seeds 0,1,2]

Reads the raw scores that `bench/generality.py` replayed (its --work) and, for every bar among the
distinct levels of the scores (at most --bars of them, spread over their upper quantiles), alerts
as the service's lifecycle would with that one bar: an alert opens at a crossing, stays open until
`resolve_after` scores in a row are below the bar, and no alert opens in the `cooldown` rows after
it resolves. Counted strictly, by the pages: an incident is alerted when an alert opens within
--tolerance rows of it, and every other opening is false (contract 4 also counts an incident that
an alert already open covers, which a bar low enough to hold one alert open all along would turn
into recall 1 at precision 1). Pooled over the dataset's entities.

The bar is chosen knowing the labels (an oracle no service has). Every calibrated threshold of the
service is a fixed bar on the raw score as long as the entity's level does not move, so when no
fixed bar reaches a target, no threshold rule on these scores reaches it without moving its bar at
the right moments. Printed per detector and seed: the best event F1 over the bars, the highest
event recall at alert precision >= --precision, and the highest alert precision at event recall
>= --recall.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from generality import replayed_series, unknown_dataset  # noqa: E402
from held_open import dataset  # noqa: E402

from stream_detector.core.alerts import AlertParams  # noqa: E402
from stream_detector.offline.evalinputs import Series  # noqa: E402
from stream_detector.offline.measures import segments, summarise_events  # noqa: E402


def opening_rows(crossed: np.ndarray, hold: int, cooldown: int) -> list[int]:
    """The rows where an alert opens with this bar: at a crossing, when no alert is open (one
    resolves after `hold` scores in a row below the bar) and the `cooldown` rows after the last one
    resolved have passed."""
    opened = []
    rows = np.flatnonzero(crossed)
    i = 0
    while i < rows.size:
        opened.append(int(rows[i]))
        last = rows[i]
        i += 1
        while i < rows.size and rows[i] - last <= hold:  # fewer than `hold` scores below the bar between
            last = rows[i]
            i += 1
        end = last + hold
        while i < rows.size and rows[i] <= end + cooldown:  # crossings during the cool-down open nothing
            i += 1
    return opened


def page_counts(labels: np.ndarray, opened: list[int], tolerance: int) -> dict:
    """Incidents, those with an opening within `tolerance` rows, and openings near no incident."""
    incidents = segments(labels)
    at = np.asarray(opened, dtype=np.int64)
    near = (at[:, None] >= incidents[None, :, 0] - tolerance) & (at[:, None] <= incidents[None, :, 1] + tolerance)
    return {"incidents": len(incidents), "incidents_alerted": int(near.any(axis=0).sum()),
            "episodes": len(opened), "false_episodes": int((~near.any(axis=1)).sum()), "delays": []}


def candidate_bars(series: list[Series], n_bars: int) -> np.ndarray:
    """Up to n_bars bars among the pooled scores' upper levels (from their 90 % quantile up), each
    just below a score so that the score crosses it."""
    pooled = np.concatenate([s.score[~np.isnan(s.score)] for s in series])
    levels = np.unique(np.quantile(pooled, 1.0 - np.geomspace(0.1, 0.5 / pooled.size, n_bars)))
    return np.nextafter(levels, -np.inf)


def pooled(series: list[Series], openings, tolerance: int, bar: float) -> dict:
    """`page_counts` of `openings(s)` summed over the series, summarised as `evaluate` does, with the bar."""
    counts = {"incidents": 0, "incidents_alerted": 0, "episodes": 0, "false_episodes": 0, "delays": []}
    for s in series:
        c = page_counts(s.labels, openings(s), tolerance)
        for k in ("incidents", "incidents_alerted", "episodes", "false_episodes"):
            counts[k] += c[k]
    return {"bar": bar, **summarise_events(counts)}


def sweep(series: list[Series], bars: np.ndarray, hold: int, cooldown: int, tolerance: int) -> list[dict]:
    """The pooled counts of every bar."""
    return [pooled(series, lambda s: opening_rows(np.nan_to_num(s.score, nan=-np.inf) > bar, hold, cooldown),
                   tolerance, float(bar)) for bar in bars]


def replay_counts(series: list[Series], tolerance: int) -> dict:
    """The replay's own alerts counted the same way (its openings), with no bar."""
    return pooled(series, lambda s: [int(a) for a, _ in segments(s.alerted)], tolerance, float("nan"))


def best(results: list[dict], precision: float, recall: float) -> tuple[dict, dict | None, dict | None]:
    """(the bar of best event F1, the highest recall at precision >= `precision`, the highest
    precision at recall >= `recall`); None where no bar qualifies."""
    f1 = max(results, key=lambda r: r["f1"] or 0.0)
    at_p = [r for r in results if (r["alert_precision"] or 0.0) >= precision]
    at_r = [r for r in results if (r["recall"] or 0.0) >= recall]
    return (f1, max(at_p, key=lambda r: (r["recall"] or 0.0, r["alert_precision"])) if at_p else None,
            max(at_r, key=lambda r: (r["alert_precision"] or 0.0, r["recall"])) if at_r else None)


def _line(r: dict | None) -> str:
    if r is None:
        return "none"
    p = r["alert_precision"]
    return (f"recall {r['recall']:.2f} ({r['incidents_alerted']}/{r['incidents']}), precision "
            f"{'-' if p is None else f'{p:.2f}'} ({r['false_episodes']} false), F1 {r['f1'] or 0.0:.3f}"
            + ("" if np.isnan(r["bar"]) else f", bar {r['bar']:.4g}"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="folder holding smd/")
    p.add_argument("--work", type=Path, default=Path("/tmp/stream-detector-generality"), help="generality.py's --work")
    p.add_argument("--datasets", default="smd:machine-3-2")
    p.add_argument("--detectors", default="new default,old default,pca (new thresholds),zscore (new thresholds)",
                   help="labels of generality.py's table, comma-separated")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--bars", type=int, default=300, help="bars tried per detector and seed")
    p.add_argument("--precision", type=float, default=0.6, help="the alert precision a recall is read at")
    p.add_argument("--recall", type=float, default=0.8, help="the event recall a precision is read at")
    p.add_argument("--tolerance", type=int, default=5)
    p.add_argument("--resolve-after", type=int, default=AlertParams().resolve_after, help="the service's by default")
    p.add_argument("--cooldown", type=int, default=AlertParams().cooldown, help="the service's by default")
    args = p.parse_args(argv)
    print(f"lifecycle: open at a crossing, resolve after {args.resolve_after} scores below the bar, "
          f"cool-down {args.cooldown}; tolerance {args.tolerance} rows")
    names = args.datasets.split(",")
    if unknown := unknown_dataset(names, args.data):
        print(f"fixed_bar_oracle: {unknown}", file=sys.stderr)
        return 2
    table = []  # per dataset and detector: (the replay's F1, the best bar's, the best recall at the precision) per seed
    for name in names:
        for label in args.detectors.split(","):
            per_seed = []
            for seed in (int(s) for s in args.seeds.split(",")):
                series = list(replayed_series(args.work, dataset(name, seed, args.work, args.data), seed, label))
                results = sweep(series, candidate_bars(series, args.bars), args.resolve_after, args.cooldown,
                                args.tolerance)
                own = replay_counts(series, args.tolerance)
                f1, at_p, at_r = best(results, args.precision, args.recall)
                print(f"{name} | {label} | seed {seed}\n  the replay itself: {_line(own)}\n  best F1: {_line(f1)}\n"
                      f"  highest recall at precision >= {args.precision}: {_line(at_p)}\n"
                      f"  highest precision at recall >= {args.recall}: {_line(at_r)}")
                per_seed.append((own["f1"] or 0.0, f1["f1"] or 0.0, at_p["recall"] if at_p else None))
            table.append((name, label, per_seed))
    print(f"\n| dataset | detector | event F1 of the replay, counted by openings | of the best fixed bar | "
          f"highest recall of a bar at precision >= {args.precision} |\n|---|---|---|---|---|")
    for name, label, per_seed in table:
        own, bar, reach = zip(*per_seed)
        print(f"| {name} | {label} | {np.mean(own):.3f} | {np.mean(bar):.3f} | "
              + ("none" if None in reach else f"{np.mean(reach):.2f}") + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
