"""What tells a replay's true alert openings from its false ones, and where the bar stood at the false ones.

    .venv/bin/python bench/opening_anatomy.py --work WORK --datasets smd-series:machine-1-7 [--detector 'new default'] [--seed 0]

Reads what `bench/generality.py` replayed (same --work, dataset name, detector label and seed): each
entity's scores.csv, alerts.jsonl and labels. An opening is true when a labelled row of its entity lies
in the 100 rows before it or the 10 after (bench/false_bursts.py's rule). Per dataset and kind of
opening it prints: how many; the quantiles of the calibrated value over the alert level; the share
followed by at least 3 crossings of the bar in its first 20 rows; the share with another opening of
the entity one day (--period rows, +-15) before it, and, as a control, --control rows before it; the
share opened by a single score past the bar (the rest by the entity's run of scores).
For the false openings it also replays the entity's recorded raw scores through the calibrated
threshold (the bundle's calibration, the default [detection] settings, `alert_opened` at each
recorded opening) and says where the entity's bar stood: at its start (nothing asks for more), set
by its level, set by its own tail, or capped at its bound. On `smd-series:MACHINE` it also counts the
false openings that lie (by the same rule) at an incident of the machine that its interpretation label
attributes to other metrics only: alerts on a real incident that the series' own labels do not name.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from false_bursts import AFTER, BEFORE  # noqa: E402
from generality import (  # noqa: E402
    EPOCHS,
    MAX_WINDOWS_PER_EPOCH,
    default_variant,
    interpretation_spans,
    replay_folder,
    train,
    trial_history_rows,
)
from held_open import dataset  # noqa: E402

from stream_detector.core.bundle import load_bundle  # noqa: E402
from stream_detector.core.calibration import ScoreReference  # noqa: E402
from stream_detector.core.thresholds import Calibrated, ThresholdParams  # noqa: E402
from stream_detector.offline.evalinputs import read_labels, read_scores  # noqa: E402

FOLLOW, NEAR = 20, 15  # rows after an opening searched for more crossings; +- rows of "a day before"


def where_the_bar_stood(t: Calibrated) -> str:
    if t.shift >= t._start + t._bound - 1e-9:
        return "bound"
    if t.shift <= t._start + t._lowest + 1e-9:
        return "start"
    level = t._hist.quantile(0.9) - t.reference.anchor if t._hist.n else -math.inf
    return "own tail" if t._tail_shift > level else "level"


def machine_incident_rows(name: str, data: Path) -> np.ndarray | None:
    """For `smd-series:MACHINE`, whether each replayed row lies in any incident of the machine (its
    interpretation label, every metric); None for other datasets."""
    kind, _, machine = name.partition(":")
    if kind != "smd-series":
        return None
    n = sum(1 for _ in (data / "smd" / "test" / f"{machine}.txt").open())
    h = trial_history_rows(n)
    rows = np.zeros(n, dtype=bool)
    for spans in interpretation_spans(data / "smd" / "interpretation_label" / f"{machine}.txt").values():
        for a, b in spans:
            rows[a:b] = True
    return rows[h:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--datasets", required=True)
    p.add_argument("--detector", default="new default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--period", type=int, default=1440, help="rows in a day (SMD: one a minute)")
    p.add_argument("--control", type=int, default=1000, help="a lag that is no period, for comparison")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = p.parse_args(argv)
    budget = argparse.Namespace(  # bench/generality.py's own defaults: the bundles its replays used
        fit_budget=False,
        epochs=EPOCHS,
        max_windows_per_epoch=MAX_WINDOWS_PER_EPOCH,
        train_seed=args.seed,
        work=args.work,
    )
    for name in [n.strip() for n in args.datasets.split(",") if n.strip()]:
        ds = dataset(name, args.seed, args.work, args.data)
        kinds: dict[bool, list[tuple[float, bool, bool, bool, bool]]] = {True: [], False: []}
        stood = {"start": 0, "level": 0, "own tail": 0, "bound": 0}
        machine_incident = machine_incident_rows(name, args.data)
        at_machine_incident = 0
        for key, _, labels_path in ds.parts:
            folder = replay_folder(args.work, ds.name, args.seed, args.detector, key)
            if not (folder / "alerts.jsonl").is_file():
                raise SystemExit(
                    f"{folder / 'alerts.jsonl'} does not exist; run bench/generality.py with detector "
                    f"{args.detector!r} and seed {args.seed} first."
                )
            st = read_scores(folder / "scores.csv")
            order = np.argsort(st.row, kind="stable")
            rows, scores, bars = st.row[order], st.score[order], st.threshold[order]
            labels = read_labels(labels_path, st.n).astype(bool)
            opens = [orjson.loads(line) for line in (folder / "alerts.jsonl").read_bytes().splitlines()]
            opens = [a for a in opens if a["state"] == "open"]
            at = np.asarray([int(a["source"]["offset"]) for a in opens])
            false_rows = set()
            for a, r in zip(opens, at):
                true = bool(labels[max(0, r - BEFORE) : r + AFTER].any())
                follow = int(np.sum(scores[r : r + FOLLOW] > bars[r : r + FOLLOW]))
                kinds[true].append(
                    (
                        a["calibrated_score"] / a["calibrated_threshold"],
                        follow >= 3,
                        bool(np.any(np.abs(at - (r - args.period)) <= NEAR)),
                        bool(np.any(np.abs(at - (r - args.control)) <= NEAR)),
                        bool(scores[r] > bars[r]),  # the score alone passed the bar; else the run opened it
                    )
                )
                if not true:
                    false_rows.add(int(r))
                    if machine_incident is not None:
                        at_machine_incident += bool(machine_incident[max(0, r - BEFORE) : r + AFTER].any())
            if not false_rows:
                continue
            history = ds.histories.get(key, ds.train)
            bundle = load_bundle(
                train(default_variant(history, ds.fmt, budget), history, ds.fmt, args.work, budget, cached_only=True)
            )
            reference = ScoreReference.from_calibration(bundle.calibration, bundle.training.get("entities"))
            if reference is None:
                raise SystemExit(f"{key}: the bundle has no calibrated score distribution to replay.")
            t = Calibrated(reference, ThresholdParams(), reference.level_of(key))
            opened = set(at.tolist())
            for r, s in zip(rows, scores):
                if np.isnan(s):
                    continue
                t.observe(float(s))
                if r in false_rows:
                    stood[where_the_bar_stood(t)] += 1
                if r in opened:
                    t.alert_opened()
        for true in (True, False):
            v = kinds[true]
            if not v:
                continue
            z = np.asarray([x[0] for x in v])
            q = np.quantile(z, [0.1, 0.5, 0.9])
            print(
                f"{name} ({args.detector}, seed {args.seed}), {'true' if true else 'false'} openings {len(v)}: "
                f"value / alert level 10/50/90 % {q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f}; >= 3 crossings in the first "
                f"{FOLLOW} rows {np.mean([x[1] for x in v]):.2f}; an opening {args.period} rows before "
                f"{np.mean([x[2] for x in v]):.2f} ({args.control} rows before: {np.mean([x[3] for x in v]):.2f}); "
                f"opened by one score (not its run) {np.mean([x[4] for x in v]):.2f}"
            )
        n_false = sum(stood.values())
        if machine_incident is not None and n_false:
            print(
                f"{name}: false openings at an incident of the machine that its label attributes to other metrics: "
                f"{at_machine_incident} of {n_false} ({at_machine_incident / n_false:.2f})"
            )
        if n_false:
            print(
                f"{name}: the bar at the false openings: "
                + ", ".join(f"{k} {v} ({v / n_false:.2f})" for k, v in stood.items())
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
