"""The generality suite: detection quality on data no setting was tuned on.

    .venv/bin/python bench/generality.py [--datasets univariate,trend] [--seeds 0,1,2] [--work DIR]
                                         [--candidates] [--detection max_shift=2 ...] [--fit variant=plain ...]
                                         [--markdown] [--out docs/quality.md]

Synthetic datasets (stream_detector/offline/series.py, `SUITE`: univariate, level shifts, variance
changes, daily seasonality, heavy tails, a trend, 300-row histories), each generated with every
seed: the models are trained on every entity's normal history (`fit` with the defaults but the
bench's training length, the PCA and z-score baselines with theirs) and each entity's test part,
with its labelled incidents, is replayed through `replay_table` — the very `DetectorCore` of the
service — once with the new default detection settings and once with the old default (rolling
quantile 0.99 x 4.0, no bound), then evaluated (contract 4: event recall, alert precision, event
F1, false alert episodes per 1,000 rows, median delay; AUC-PR and VUS-PR on the raw score).

The issue's check, per dataset: every incident whose largest raw score is more than 5x the entity's
normal scores (their 99th percentile on rows whose window holds no incident) must open an alert,
and false alert openings must stay under 1 per 5,000 rows. Both are printed per detector.

With --markdown, the table (mean over the seeds, and the spread min-max of event F1) is written
into OUT between the generality markers. Bundles are cached in --work by a hash of their settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stream_detector.config import ConfigError, load_settings  # noqa: E402
from stream_detector.core.alerts import AlertParams  # noqa: E402
from stream_detector.core.bundle import load_bundle  # noqa: E402
from stream_detector.core.pipeline import DetectionSettings, DetectorCore  # noqa: E402
from stream_detector.core.scorer import Scorer  # noqa: E402
from stream_detector.core.thresholds import ThresholdParams  # noqa: E402
from stream_detector.offline.datafiles import read_table  # noqa: E402
from stream_detector.offline.evalinputs import Series as Series_  # noqa: E402  (series.Series is the generator's)
from stream_detector.offline.evalinputs import build_series, read_labels, read_scores  # noqa: E402
from stream_detector.offline.evaluate import EvaluationSettings, evaluate_series  # noqa: E402
from stream_detector.offline.replay import replay_table  # noqa: E402
from stream_detector.offline.measures import segments  # noqa: E402
from stream_detector.offline.series import SUITE, Incident, Series, generate, write_dataset  # noqa: E402

from quality import MemoScorer  # noqa: E402  (bench/quality.py: scores each distinct batch once)

log = logging.getLogger("bench.generality")

BEGIN, END = "<!-- generality-table:begin -->", "<!-- generality-table:end -->"
# detector = (model variant, detection settings)
NEW = DetectionSettings()
OLD = DetectionSettings(threshold=ThresholdParams(method="quantile", quantile=0.99, multiplier=4.0, max_shift=1e12, max_shift_down=1e12),
                        alerts=AlertParams(resolve_after=30, cooldown=60, resolve_backoff=0))  # the lifecycle until 2026-12-06
DETECTORS = {
    "new default": ("default", NEW),  # fit's defaults (its detectors for this data) and the new detection defaults
    "old default": ("transformer", OLD),  # the Transformer alone, rolling quantile 0.99 x 4.0 without a bound
    "pca (new thresholds)": ("pca", NEW),
    "zscore (new thresholds)": ("zscore", NEW),
}
CANDIDATES = {  # --candidates: the composites measured to choose fit's default detectors
    "transformer, new thresholds": ("transformer", NEW),
    "transformer+pca, new thresholds": ("transformer+pca", NEW),
    "transformer+zscore, new thresholds": ("transformer+zscore", NEW),
    "default, relative errors": ("default:feature_errors=relative", NEW),  # fit --feature-errors relative
}
FIVE_X = 5.0
SMD_MACHINES = ("machine-1-7", "machine-2-1", "machine-3-2")  # 3-2 is the held-out check: settings come from 1-7 and 2-1
MAX_FALSE_PER_ROWS = 5000
TRIAL_HISTORY = (0.15, 750)  # smd-series: the trial trained on the first 15 % of a series, at most 750 rows
EPOCHS, MAX_WINDOWS_PER_EPOCH = 8, 4096  # the Transformer's budget here (fit's own defaults since 2026-12-06)
# a cached bundle is refit when these change: the calibration and every file of training/
CODE = ("stream_detector/core/calibration.py", *sorted(str(p.relative_to(REPO)) for p in (REPO / "training").glob("*.py")))


def train(variant: str, data: Path, fmt: str, work: Path, args: argparse.Namespace, cached_only: bool = False) -> Path:
    """The bundle of `variant` trained on `data` in `work`, trained now unless cached; with `cached_only`
    a missing one is a SystemExit with one sentence instead."""
    if variant.startswith("transformer"):
        detectors, _, options = variant.partition(":")  # "transformer+zscore:variant=plain": fit --variant plain
        budget = {} if args.fit_budget else dict(epochs=args.epochs, max_windows_per_epoch=args.max_windows_per_epoch)
        params: dict[str, Any] = dict(**budget, seed=args.train_seed, threads=1, detectors=detectors.split("+"),
                                      **key_values(options))
    elif variant == "pca":
        params = dict(kind="pca", pca_variance=0.9)
    else:
        params = dict(kind="zscore", window=64, zscore_floor=0.1)
    content = hashlib.sha256(data.read_bytes()).hexdigest()
    code = hashlib.sha256(b"".join((REPO / f).read_bytes() for f in CODE)).hexdigest()  # their changes: refit
    tag = hashlib.sha256(json.dumps([variant, content, fmt, params, code], sort_keys=True).encode()).hexdigest()[:10]
    out = work / "bundles" / f"{data.parent.name}-{data.stem}-{variant}-{tag}"
    if (out / "bundle.json").is_file():
        return out
    if cached_only:
        raise SystemExit(f"{out} is not in {work}; run bench/generality.py on {data} with the same code and seed first.")
    if variant.startswith("transformer"):
        from training.fit import fit
        from training.settings import make_settings

        fit(make_settings({"data": data, "out": out, "format": fmt, "progress": False, **params}))
    else:
        from training.baselines import BaselineSettings, fit_baseline

        fit_baseline(BaselineSettings(data=data, out=out, format=fmt, **params))
    return out


def key_values(spec: str) -> dict[str, str]:
    """Settings from "KEY=VALUE[,KEY=VALUE]" (--detection, --fit, a model's suffix after ':')."""
    items = [kv for kv in spec.split(",") if kv]
    if bad := [kv for kv in items if "=" not in kv]:
        raise ValueError(f"{bad[0]!r} is not KEY=VALUE.")
    return dict(kv.split("=", 1) for kv in items)


@dataclass
class Outcome:
    """One detector on one dataset and seed."""

    metrics: dict[str, Any]
    rows: int
    strong: int = 0  # incidents whose raw score passed 5x the entity's normal scores
    strong_alerted: int = 0
    strong_missed: list[str] = field(default_factory=list)


def normal_level(labels: np.ndarray, scores: np.ndarray, window: int, tolerance: int) -> tuple[np.ndarray, float | None]:
    """(rows whose window, or tolerance, reaches an incident; the 99 % quantile of the other rows'
    scores, the "normal scores" of the 5x rule, or None below 100 such rows) for one entity's replay."""
    near = np.zeros(labels.size, dtype=bool)
    for a, b in segments(labels.astype(bool)):
        near[max(0, a - tolerance) : min(labels.size, b + window + tolerance)] = True
    normal = scores[~near & ~np.isnan(scores)]
    return near, (float(np.quantile(normal, 0.99)) if normal.size >= 100 else None)


# rows between crossings for a new alert opening: the service's resolve-after plus cool-down (150 + 60;
# an entity whose alerts flap waits longer, `resolve_backoff`, which this count leaves out)
OPENING_GAP = AlertParams().resolve_after + AlertParams().cooldown


def openings(crossed: np.ndarray) -> np.ndarray:
    """Rows where a bar crossing would open an alert: the first crossing, and every one more than
    OPENING_GAP rows after the previous crossing (the service's resolve-after and cool-down)."""
    rows = np.flatnonzero(crossed)
    return rows[np.diff(rows, prepend=-(10**9)) > OPENING_GAP]


def strong_incidents(key: str, labels: np.ndarray, scores: np.ndarray, alerted: np.ndarray, window: int, tolerance: int) -> tuple[int, int, list[str]]:
    """(incidents whose peak raw score passed 5x the entity's normal scores, of them alerted, the
    missed ones) for one entity's replay (`normal_level`)."""
    incidents = segments(labels.astype(bool))
    _, level = normal_level(labels, scores, window, tolerance)
    if level is None:
        return 0, 0, []
    n = hit = 0
    missed = []
    for a, b in incidents:
        b = min(labels.size, b + tolerance)
        peak = np.nanmax(scores[a:b]) if np.any(~np.isnan(scores[a:b])) else np.nan
        if peak > FIVE_X * level:
            n += 1
            if alerted[max(0, a - tolerance) : b].any():
                hit += 1
            else:
                missed.append(f"{key} rows {a}-{b - tolerance} peak {peak / level:.1f}x")
    return n, hit, missed


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Path  # normal history of every entity
    fmt: str
    parts: tuple[tuple[str, Path, Path], ...]  # (entity, test file, labels file: 0/1 per row)
    histories: dict[str, Path] = field(default_factory=dict)  # --per-entity: each entity's own history, its own model


def synthetic(name: str, seed: int, work: Path, per_entity: bool = False) -> Dataset:
    return _dataset(name, write_dataset(generate(SUITE[name], seed), work / "data" / f"{name}-seed{seed}"), per_entity)


def _dataset(name: str, paths: dict[str, Path], per_entity: bool) -> Dataset:
    keys = [k[len("test-"):] for k in paths if k.startswith("test-")]
    histories = {}
    if per_entity:  # as a user with one series trains: history-KEY.csv holds that entity's rows only
        header, *lines = paths["history"].read_text().splitlines(keepends=True)
        for k in keys:
            histories[k] = paths["history"].with_name(f"history-{k}.csv")
            histories[k].write_text(header + "".join(ln for ln in lines if ln.startswith(f"{k},")))
    return Dataset(name, paths["history"], "csv", tuple((k, paths[f"test-{k}"], paths[f"labels-{k}"]) for k in keys), histories)


def trial_history_rows(n_rows: int) -> int:
    """Rows the issue's trial trained on for a series of `n_rows` (`TRIAL_HISTORY`)."""
    share, cap = TRIAL_HISTORY
    return min(int(share * n_rows), cap)


def interpretation_spans(path: Path) -> dict[int, list[tuple[int, int]]]:
    """An SMD interpretation_label file (`start-end:dim,dim,...`, 1-based and inclusive) as 0-based
    column -> [(first row, end row exclusive)] of the incidents that name it."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for line in path.read_text().split():
        span, dims = line.split(":")
        a, b = (int(v) for v in span.split("-"))
        for d in dims.split(","):
            spans.setdefault(int(d) - 1, []).append((a - 1, b))
    return spans


def smd_series(machine: str, root: Path, work: Path) -> Dataset:
    """Real one-feature series, trained the way the issue's trial trained: every metric of an SMD
    machine's test half that its interpretation labels name is one series, with its own model
    trained on the first 15 % of the series, at most 750 rows (`TRIAL_HISTORY`), and the rest
    replayed. Its incidents are those whose interpretation names that metric; the machine's other
    incidents count as normal rows for it. Metrics constant over their history are left out (a
    one-value history has nothing to learn: `fit` refuses it)."""
    values = np.loadtxt(root / "test" / f"{machine}.txt", delimiter=",", ndmin=2)
    h = trial_history_rows(len(values))
    spans = interpretation_spans(root / "interpretation_label" / f"{machine}.txt")
    series = [
        Series(f"dim{d + 1}", values[:h, d : d + 1], values[h:, d : d + 1],
               [Incident("labelled", max(0, a - h), b - h, (0,), 0.0) for a, b in spans[d] if b > h])
        for d in sorted(spans)
        if np.ptp(values[:h, d]) > 0
    ]
    return _dataset(f"smd-series {machine}", write_dataset(series, work / "data" / f"smd-series-{machine}"), per_entity=True)


class RecordedScorer:
    """The raw scores a replay of the same model recorded (its scores.csv, row order), served in the
    order the pipeline asks for them instead of running the model (`--scores-from`): other detection
    settings are judged on exactly the same scores, in seconds. Per-feature errors are zeros (they
    only name an alert's top features)."""

    def __init__(self, bundle: Any, scores_csv: Path) -> None:
        if not scores_csv.is_file():
            raise SystemExit(f"generality: --scores-from needs {scores_csv}; run that detector on this dataset and seed first.")
        self.bundle, self.provider, self.on_cuda = bundle, "recorded", False
        st = read_scores(scores_csv)
        s = st.score[np.argsort(st.row, kind="stable")]
        self._scores, self._next = s[~np.isnan(s)].astype(np.float32), 0

    def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = windows.shape[0]
        out = self._scores[self._next : self._next + n]
        if out.size != n:
            raise SystemExit("generality: --scores-from: the recorded replay scored fewer windows than this one asks for "
                             "(a detector with another model or window?).")
        self._next += n
        return out, np.zeros((n, self.bundle.n_features), dtype=np.float32)


def replay_folder(work: Path, dataset: str, seed: int, label: str, key: str) -> Path:
    """Where `run_dataset` replays one entity of a dataset with one detector (scores.csv, alerts.jsonl)."""
    return work / "replay" / f"{dataset}-seed{seed}".replace(" ", "_") / label.replace(" ", "_").replace(",", "") / key


def replayed_series(work: Path, ds: Dataset, seed: int, label: str) -> Iterator[Series_]:
    """Each entity's series as `run_dataset` replayed it with detector `label` (its scores.csv and
    labels); SystemExit with one sentence when that replay is not in `work`."""
    for key, _, labels_path in ds.parts:
        scores_csv = replay_folder(work, ds.name, seed, label, key) / "scores.csv"
        if not scores_csv.is_file():
            raise SystemExit(f"{scores_csv} does not exist; run bench/generality.py on {ds.name!r} with seed {seed}, "
                             f"detector {label!r} and --work {work} first.")
        st = read_scores(scores_csv)
        yield build_series(st, read_labels(labels_path, st.n))[0]


def unknown_dataset(names: list[str], data: Path) -> str | None:
    """One sentence naming the first of `names` that is no dataset of this suite (None: all are)."""
    test = data / "smd" / "test"
    for n in names:
        kind, _, machine = n.partition(":")
        if n not in SUITE and not (kind in ("smd", "smd-series") and (test / f"{machine}.txt").is_file()):
            return (f"unknown dataset {n!r}; choose from {', '.join(SUITE)}, smd:MACHINE or smd-series:MACHINE "
                    f"with MACHINE.txt in {test}.")
    return None


def smd(machine: str, root: Path) -> Dataset:
    """An SMD machine: train/ is the history, test/ and test_label/ the replay (one entity)."""
    return Dataset(f"smd {machine}", root / "train" / f"{machine}.txt", "smd",
                   ((machine, root / "test" / f"{machine}.txt", root / "test_label" / f"{machine}.txt"),))


def default_variant(train: Path, fmt: str, args: argparse.Namespace) -> str:
    """The detectors `fit` chooses for this history when none are given (training/sizing.py)."""
    from training.settings import make_settings
    from training.sizing import size_to_data

    settings = make_settings({"data": train, "out": args.work / "unused", "format": fmt})
    return "+".join(size_to_data(settings, read_table(train, fmt)).settings.detectors)


def run_dataset(ds: Dataset, seed: int, args: argparse.Namespace) -> dict[str, Outcome]:
    eval_settings = EvaluationSettings(tolerance=args.tolerance, vus_max_buffer=args.vus_max_buffer)
    scorers: dict[tuple[str, Path], MemoScorer] = {}
    out: dict[str, Outcome] = {}
    tables = {}
    chosen: dict[Path, str] = {}  # history -> the detectors fit chooses for it (reads and sizes the history once)
    for label, (named, settings) in args.detectors.items():
        all_series, strong, strong_hit, missed, rows = [], 0, 0, [], 0
        for key, test, labels_path in ds.parts:
            history = ds.histories.get(key, ds.train)
            if named.startswith("default") and history not in chosen:
                chosen[history] = default_variant(history, ds.fmt, args)
            variant = chosen[history] + named[len("default"):] if named.startswith("default") else named
            if (variant, history) not in scorers:
                bundle = load_bundle(train(variant, history, ds.fmt, args.work, args))
                scorers[variant, history] = MemoScorer(Scorer(bundle, provider="cpu", intra_op_threads=1))
            scorer = scorers[variant, history]
            if named in args.scores_from:  # the same model's scores, as an earlier replay recorded them
                recorded = replay_folder(args.work, ds.name, seed, args.scores_from[named], key) / "scores.csv"
                scorer = RecordedScorer(scorer.bundle, recorded)  # type: ignore[assignment]
            if test not in tables:
                keyed = ds.fmt == "csv"
                tables[test] = read_table(test, ds.fmt, features=scorer.bundle.features, key_field="key" if keyed else None,
                                          timestamp_field="ts" if keyed else None)
            replay_dir = replay_folder(args.work, ds.name, seed, label, key)
            core = DetectorCore(scorer.bundle, scorer, settings)  # type: ignore[arg-type]
            replay_table(core, tables[test], replay_dir)
            st = read_scores(replay_dir / "scores.csv")
            labels = read_labels(labels_path, st.n)
            ser = build_series(st, labels)
            all_series += ser
            rows += st.n
            n, hit, miss = strong_incidents(key, labels, ser[0].score, ser[0].alerted, scorer.bundle.window, args.tolerance)
            strong, strong_hit, missed = strong + n, strong_hit + hit, missed + miss
            if key in ds.histories:  # that entity's own model: not needed again (an ONNX session holds its arena)
                del scorers[variant, history]
        ev = evaluate_series(all_series, eval_settings)
        out[label] = Outcome(ev.overall, rows, strong, strong_hit, missed)
    return out


def summarise(results: dict[str, dict[int, dict[str, Outcome]]]) -> list[dict[str, Any]]:
    rows = []
    for name, by_seed in results.items():
        for label in next(iter(by_seed.values())):
            outs = [by_seed[s][label] for s in sorted(by_seed)]
            ev = [o.metrics["event"] for o in outs]
            incidents = sum(e["incidents"] for e in ev)
            alerted = sum(e["incidents_alerted"] for e in ev)
            false = sum(e["false_episodes"] for e in ev)
            n_rows = sum(o.rows for o in outs)
            f1s = [e["f1"] or 0.0 for e in ev]
            recall = alerted / incidents if incidents else None
            precision = alerted / (alerted + false) if alerted + false else None
            f1 = 2 * recall * precision / (recall + precision) if recall and precision else 0.0
            delays = [e["delay_median"] for e in ev if e["delay_median"] is not None]
            rows.append({
                "dataset": name, "detector": label, "seeds": len(outs), "incidents": incidents, "alerted": alerted,
                "recall": recall, "precision": precision, "f1": f1, "f1_min": min(f1s), "f1_max": max(f1s),
                "false": false, "false_per_1000": 1000.0 * false / n_rows, "rows": n_rows,
                "delay": float(np.median(delays)) if delays else None,
                "auc_pr": float(np.mean([o.metrics["auc_pr"] or 0 for o in outs])),
                "vus_pr": float(np.mean([o.metrics["vus_pr"] or 0 for o in outs])),
                "strong": sum(o.strong for o in outs), "strong_alerted": sum(o.strong_alerted for o in outs),
                "strong_missed": [m for o in outs for m in o.strong_missed],
            })
    return rows


def _f(v: float | None, d: int = 3) -> str:
    return "–" if v is None else f"{v:.{d}f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ["dataset", "detector", "event recall", "alert precision", "event F1 (seeds min–max)", "false alerts / 1,000 rows",
            "median delay", "AUC-PR", "VUS-PR", "incidents > 5x normal alerted"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append("| " + " | ".join([
            r["dataset"], r["detector"], f"{_f(r['recall'], 2)} ({r['alerted']}/{r['incidents']})",
            f"{_f(r['precision'], 2)} ({r['false']} false)", f"{_f(r['f1'])} ({_f(r['f1_min'], 2)}–{_f(r['f1_max'], 2)})",
            _f(r["false_per_1000"], 2), _f(r["delay"], 0), _f(r["auc_pr"]), _f(r["vus_pr"]),
            f"{r['strong_alerted']}/{r['strong']}",
        ]) + " |")
    return "\n".join(out)


def write_markdown(path: Path, table: str, command: str, wall_s: float, args: argparse.Namespace) -> None:
    block = "\n".join([
        BEGIN, "", "Generated by `bench/generality.py`; rerunning the command reproduces it (fixed seeds):", "", "```", command, "```", "",
        f"Wall time {wall_s / 60:.1f} min. Seeds {args.seeds} (data and training); the Transformer is `fit` with its defaults "
        + ("and its training budget" if args.fit_budget else f"but {args.epochs} epochs x {args.max_windows_per_epoch} windows")
        + "; rows are pooled over the seeds' entities.", "",
        table, "", END,
    ])
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--datasets", default=",".join([*SUITE, *(f"smd:{m}" for m in SMD_MACHINES)]),
                   help="synthetic datasets (series.SUITE), smd:MACHINE and smd-series:MACHINE (its labelled metrics as "
                        "one-feature series, trained as the issue's trial trained)")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="folder holding smd/")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--work", type=Path, default=Path("/tmp/stream-detector-generality"))
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--max-windows-per-epoch", type=int, default=MAX_WINDOWS_PER_EPOCH)
    p.add_argument("--per-entity", action="store_true", help="synthetic datasets: one model per entity, trained on "
                   "that entity's history alone (as a user with one series trains), instead of one on the three together")
    p.add_argument("--fit-budget", action="store_true", help="train with fit's own epochs and windows per epoch (sized "
                   "to the data for short histories) instead of --epochs and --max-windows-per-epoch")
    p.add_argument("--tolerance", type=int, default=5)
    p.add_argument("--vus-max-buffer", type=int, default=20)
    p.add_argument("--candidates", action="store_true", help="also the Transformer alone and its composites with pca and "
                   "zscore, all with the new thresholds (how fit's default detectors were chosen)")
    p.add_argument("--detection", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="also the new default with these [detection] settings (the service's names, e.g. "
                        "max_shift=2); repeat for more candidates")
    p.add_argument("--fit", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="also the new default trained with these `fit` settings (training/settings.py's names, e.g. "
                        "variant=plain); repeat for more candidates")
    p.add_argument("--only", default="", metavar="LABEL[|LABEL]",
                   help="run only these detectors, by their labels in the table ('new default|transformer, new thresholds')")
    p.add_argument("--scores-from", default="", metavar="LABEL[|LABEL]",
                   help="do not run these detectors' models: every detector with the same model as one of them judges the "
                        "raw scores that its earlier replay (same --work, dataset and seed) recorded, e.g. to measure other "
                        "detection settings in seconds")
    p.add_argument("--markdown", action="store_true", help="write the table into --out")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "quality.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(1)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    if unknown := unknown_dataset(names, args.data):
        print(f"generality: {unknown}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    args.detectors = {**DETECTORS, **(CANDIDATES if args.candidates else {})}
    for spec in args.detection:
        try:
            overrides = key_values(spec)
            settings = load_settings(None, {"detection": overrides}).detection.to_core()
        except (ValueError, ConfigError) as e:
            print(f"generality: --detection {spec!r}: {e}", file=sys.stderr)
            return 2
        args.detectors[f"new default, {spec}"] = ("default", settings)
    from training.settings import SettingsError, make_settings

    for spec in args.fit:
        try:
            make_settings({"data": args.work, "out": args.work, **key_values(spec)})
        except (ValueError, SettingsError) as e:  # ValueError: an item without '='
            print(f"generality: --fit {spec!r}: {e}", file=sys.stderr)
            return 2
        args.detectors[f"new default, fit {spec}"] = (f"default:{spec}", NEW)
    every_detector = {**DETECTORS, **CANDIDATES, **args.detectors}
    if args.only:
        wanted = [w.strip() for w in args.only.split("|")]
        if unknown_only := [w for w in wanted if w not in args.detectors]:
            print(f"generality: --only {unknown_only[0]!r} is not a detector of this run; choose from "
                  f"{' | '.join(args.detectors)}.", file=sys.stderr)
            return 2
        args.detectors = {k: v for k, v in args.detectors.items() if k in wanted}
    sources = [w.strip() for w in args.scores_from.split("|") if w.strip()]
    if unknown_source := [w for w in sources if w not in every_detector]:
        print(f"generality: --scores-from {unknown_source[0]!r} is not a detector; choose from {' | '.join(every_detector)}.",
              file=sys.stderr)
        return 2
    args.scores_from = {every_detector[w][0]: w for w in sources}  # model -> the label whose replay recorded its scores
    command = shlex.join([".venv/bin/python", "bench/generality.py", *(argv if argv is not None else sys.argv[1:])])
    t0 = time.perf_counter()
    results: dict[str, dict[int, dict[str, Outcome]]] = {}
    for name in names:
        kind, _, machine = name.partition(":")
        shown = f"{name}, per entity" if args.per_entity and name in SUITE else name
        results[shown] = {}
        for seed in seeds:
            args.train_seed = seed
            if kind == "smd":
                ds = smd(machine, args.data / "smd")
            elif kind == "smd-series":
                ds = smd_series(machine, args.data / "smd", args.work)
            else:
                ds = synthetic(name, seed, args.work, args.per_entity)
            results[shown][seed] = run_dataset(ds, seed, args)
            print(f"{name} seed {seed}: " + "; ".join(
                f"{k}: F1 {_f(o.metrics['event']['f1'])} ({o.metrics['event']['false_episodes']} false)" for k, o in results[shown][seed].items()), flush=True)
    rows = summarise(results)
    table = markdown(rows)
    print()
    print(table)
    for r in rows:
        if r["strong_missed"]:
            print(f"{r['dataset']} / {r['detector']}: missed above 5x: {'; '.join(r['strong_missed'][:6])}")
        if r["false_per_1000"] >= 1000.0 / MAX_FALSE_PER_ROWS:
            print(f"{r['dataset']} / {r['detector']}: {r['false_per_1000']:.2f} false alerts per 1,000 rows (limit {1000 / MAX_FALSE_PER_ROWS:.1f})")
    wall = time.perf_counter() - t0
    print(f"\nwall time {wall / 60:.1f} min")
    if args.markdown:
        write_markdown(args.out, table, command, wall, args)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
