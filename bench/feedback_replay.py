"""What the on-call's false-positive verdicts do: a generality replay again, with a verdict on every
false alert.

    .venv/bin/python bench/feedback_replay.py --work WORK --datasets smd-series:machine-1-7 [--seeds 0,1,2] [--react 60]
                                              [--rescore]

The service takes `false_positive` verdicts on its control topic (`DetectorCore.learn_false_positive`:
the entity stops alerting on scores like that episode's, up to `feedback_max_factor` x its bar).
This replays the recorded raw scores of `bench/generality.py`'s new default (its --work, as
`--scores-from` does) through the same `DetectorCore`, `--react` rows at a time, and after each
stretch sends a verdict on every alert that opened in it with no labelled row near it (false_bursts'
rule: none from BEFORE rows before the opening to AFTER after it): an on-call who answers every
page within `--react` rows and is never wrong. Printed per dataset and seed, without verdicts (which
reproduces the generality table) and with them: event recall, alert precision, event F1, false
alert episodes per 1,000 rows (contract 4, as `evaluate` counts them) over the whole replay and
over its last two thirds, once the first verdicts have been given.

A verdict excuses the features that led its alert at its peak (`AlertState.floor_for`). Recorded
scores carry no per-feature errors, so on a multivariate dataset the replay treats every score as
led by the first feature, i.e. a verdict covers the whole entity, as every verdict did
until 2026-12-07; `--rescore` runs the bundle's model on the windows again (ONNX Runtime on the CPU, the
same scores and their per-feature errors) to replay what the service does now.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from false_bursts import AFTER, BEFORE  # noqa: E402
from generality import (  # noqa: E402
    EPOCHS,
    MAX_WINDOWS_PER_EPOCH,
    NEW,
    RecordedScorer,
    default_variant,
    key_values,
    replay_folder,
    train,
    unknown_dataset,
)
from held_open import dataset  # noqa: E402

from stream_detector.config import ConfigError, load_settings  # noqa: E402
from stream_detector.core.bundle import load_bundle  # noqa: E402
from stream_detector.core.events import NO_TIME, EventBatch  # noqa: E402
from stream_detector.core.pipeline import DetectorCore  # noqa: E402
from stream_detector.core.scorer import Scorer  # noqa: E402
from stream_detector.offline.datafiles import read_table  # noqa: E402
from stream_detector.offline.evalinputs import read_labels  # noqa: E402
from stream_detector.offline.measures import episode_overlap, segments, summarise_events  # noqa: E402

TOLERANCE = 5  # rows, as the generality table counts


def replay(core: DetectorCore, table, labels: np.ndarray, key: str, react: int, verdicts: bool
           ) -> tuple[np.ndarray, int]:
    """(the rows an alert was open, verdicts sent): the table fed `react` rows at a time, a verdict after
    each stretch on every alert that opened in it with no labelled row near it."""
    n = table.n_rows
    rows32 = table.values.astype(np.float32)
    times = table.timestamps_ms if table.timestamps_ms is not None else np.full(n, NO_TIME, dtype=np.int64)
    alerted = np.zeros(n, dtype=bool)
    sent = 0
    for start in range(0, n, react):
        pos = np.arange(start, min(n, start + react))
        batch = EventBatch.build([table.keys[i] for i in pos.tolist()], rows32[pos], times[pos], topic="replay",
                                 partition=0, offset=table.row_index[pos])
        res = core.process(batch, row_alert_state=True)
        assert res.open_after is not None
        alerted[pos] = res.open_after
        if not verdicts:
            continue
        for a in res.alerts:
            r = int(a["source"]["offset"])
            if a["state"] == "open" and not labels[max(0, r - BEFORE) : r + AFTER].any():
                sent += core.learn_false_positive(a["alert_id"], key) is not None
    return alerted, sent


def counts(labels: np.ndarray, alerted: np.ndarray, since: int) -> dict:
    """Contract-4 counts (`event_metrics`) of the incidents and alert episodes that start at row
    `since` or later; an episode opened before it still alerts a later incident it covers."""
    incidents, episodes = segments(labels), segments(alerted)
    overlap = episode_overlap(incidents, episodes, TOLERANCE)
    later_i = incidents[:, 0] >= since if len(incidents) else np.zeros(0, dtype=bool)
    later_e = episodes[:, 0] >= since if len(episodes) else np.zeros(0, dtype=bool)
    return {"incidents": int(later_i.sum()), "incidents_alerted": int(overlap.any(axis=0)[later_i].sum()),
            "episodes": int(later_e.sum()), "false_episodes": int((~overlap.any(axis=1))[later_e].sum())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="generality.py's --work, with its new default replayed")
    p.add_argument("--datasets", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--react", type=int, default=60, help="rows the on-call takes to answer a page")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--detection", default="", metavar="KEY=VALUE[,KEY=VALUE]",
                   help="[detection] settings of the replay with verdicts, e.g. feedback_headroom=1.0")
    p.add_argument("--rescore", action="store_true",
                   help="score the windows with the bundle's model (per-feature errors) instead of the recorded scores")
    args = p.parse_args(argv)
    try:
        with_verdicts = load_settings(None, {"detection": key_values(args.detection)} if args.detection else {}
                                      ).detection.to_core()
    except (ValueError, ConfigError) as e:
        print(f"feedback_replay: --detection {args.detection!r}: {e}", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    if unknown := unknown_dataset(names, args.data):
        print(f"feedback_replay: {unknown}", file=sys.stderr)
        return 2
    if args.react < 1:
        print("feedback_replay: --react must be at least 1 row.", file=sys.stderr)
        return 2
    label = "new default"
    for name in names:
        for seed in (int(s) for s in args.seeds.split(",")):
            budget = argparse.Namespace(fit_budget=False, epochs=EPOCHS, max_windows_per_epoch=MAX_WINDOWS_PER_EPOCH,
                                        train_seed=seed, work=args.work)
            ds = dataset(name, seed, args.work, args.data)
            totals = {mode: {"all": [], "later": []} for mode in ("no verdicts", "a verdict on every false alert")}
            rows = later_rows = sent = 0
            for key, test, labels_path in ds.parts:
                history = ds.histories.get(key, ds.train)
                bundle = load_bundle(train(default_variant(history, ds.fmt, budget), history, ds.fmt, args.work, budget,
                                           cached_only=True))
                keyed = ds.fmt == "csv"
                table = read_table(test, ds.fmt, features=bundle.features, key_field="key" if keyed else None,
                                   timestamp_field="ts" if keyed else None)
                table_labels = read_labels(labels_path, table.n_rows).astype(bool)
                first = table.n_rows // 3
                for mode, verdicts in (("no verdicts", False), ("a verdict on every false alert", True)):
                    scorer = (Scorer(bundle, provider="cpu", intra_op_threads=1) if args.rescore else
                              RecordedScorer(bundle, replay_folder(args.work, ds.name, seed, label, key) / "scores.csv"))
                    core = DetectorCore(bundle, scorer, with_verdicts if verdicts else NEW)  # type: ignore[arg-type]
                    alerted, n_sent = replay(core, table, table_labels, key, args.react, verdicts)
                    totals[mode]["all"].append(counts(table_labels, alerted, 0))
                    totals[mode]["later"].append(counts(table_labels, alerted, first))
                    sent += n_sent
                rows += table.n_rows
                later_rows += table.n_rows - first
            print(f"{name}, seed {seed} ({rows} rows; on-call answers within {args.react} rows; {sent} verdicts"
                  + (f"; with verdicts: {args.detection}" if args.detection else "")
                  + ("; scored again" if args.rescore else "; recorded scores") + "):")
            for mode, parts in totals.items():
                line = []
                for span, n_rows in (("all", rows), ("later", later_rows)):
                    c = {k: sum(x[k] for x in parts[span]) for k in ("incidents", "incidents_alerted", "episodes",
                                                                       "false_episodes")}
                    e = summarise_events({**c, "delays": []})
                    line.append(f"{'whole replay' if span == 'all' else 'last two thirds'}: recall {e['recall']:.2f} "
                                f"({c['incidents_alerted']}/{c['incidents']}), precision "
                                f"{e['alert_precision'] or 0.0:.2f}, F1 {e['f1'] or 0.0:.3f}, "
                                f"{1000 * c['false_episodes'] / n_rows:.2f} false / 1,000 rows")
                print(f"  {mode}: " + "; ".join(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
