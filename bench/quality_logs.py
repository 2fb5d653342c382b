"""Block-level detection quality on the labelled HDFS logs (issue 8), model and baselines in one harness.

Protocol (the issue's): training = the Normal blocks whose first line falls in the first 30 % of the
log's time span (all their lines; templates are mined on those lines only); the whole log is then
replayed in time order as one stream through the log stage and the scoring core (`replay --format
log`'s code path); evaluated = the blocks whose first line comes after the training period. A block
is flagged if it had an alert. Models: the count-vector model (`fit --format log`'s default,
`--log-model counts`) and the sequence Transformer (`--log-model sequence`), each with its own
bundle, and their combination (a block is flagged when either model's score exceeds its own
calibrated threshold: the max of the two scores divided by their thresholds). Tuning set: the
training period's held-out blocks (the validation entities of `fit`, the newest 20 % of the
training blocks) plus the anomalous blocks that start in the training period; its figures are
printed next to the evaluated ones, and only they may guide settings. Baselines, same split and same
template set:
- "unknown template seen": a block is flagged when one of its lines matches no learned template;
- PCA on per-block template-count vectors (loglizer style: tf-idf weighting, centring, k components
  for 95 % of the variance, SPE above the Q-statistic at alpha = 0.001).

    .venv/bin/python bench/quality_logs.py [--data ../shared/data] [--work /tmp/quality_logs] [--reuse-model] [--markdown]

Prints the table (and with --markdown the rows for docs/quality.md) and writes WORK/results.json.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stream_detector.core.alerts import AlertParams  # noqa: E402
from stream_detector.core.bundle import load_bundle  # noqa: E402
from stream_detector.logs.spec import load_log_spec  # noqa: E402
from stream_detector.offline.logeval import format_session_summary, prf, read_entities, session_metrics  # noqa: E402
from stream_detector.logs.features import LogFeaturizer, make_feature_config  # noqa: E402
from stream_detector.logs.parse import LineParser, make_config  # noqa: E402
from stream_detector.offline.logreplay import replay_log  # noqa: E402
from stream_detector.core.pipeline import DetectionSettings  # noqa: E402
from stream_detector.core.scorer import Scorer  # noqa: E402
from stream_detector.core.thresholds import ThresholdParams  # noqa: E402


def load_hdfs(data: Path) -> tuple[list[bytes], dict[str, bool]]:
    d = data / "logs" / "hdfs_v1_2pct"
    parts = sorted(d.glob("HDFS_2pct.log.part-*"))
    if not parts:
        raise SystemExit(f"no HDFS log parts under {d} (see its README); pass --data")
    lines: list[bytes] = []
    for p in parts:
        lines += p.read_bytes().splitlines()
    with open(d / "anomaly_label.csv", newline="") as f:
        labels = {r["BlockId"]: r["Label"] == "Anomaly" for r in csv.DictReader(f)}
    return lines, labels


def pca_baseline(Xtr: np.ndarray, Xte: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """loglizer-style PCA: tf-idf, centring, k components for 95 % variance, SPE > Q_alpha (alpha 0.001)."""
    df = (Xtr > 0).sum(0)
    idf = np.log(len(Xtr) / np.maximum(df, 1))
    idf[df == 0] = np.log(len(Xtr))
    mu = (Xtr * idf).mean(0)
    Ztr, Zte = Xtr * idf - mu, Xte * idf - mu
    _, s, Vt = np.linalg.svd(Ztr, full_matrices=False)
    var = s**2 / (len(Ztr) - 1)
    k = int(np.searchsorted(np.cumsum(var) / var.sum(), 0.95) + 1)
    Pk = Vt[:k].T
    R = Zte - Zte @ Pk @ Pk.T
    spe = (R * R).sum(1)
    lam = var[k:]
    phi = [float(np.sum(lam**i)) for i in (1, 2, 3)]
    h0 = 1 - 2 * phi[0] * phi[2] / (3 * phi[1] ** 2)
    ca = 3.0902  # z at alpha = 0.001
    q = phi[0] * (ca * np.sqrt(2 * phi[1] * h0**2) / phi[0] + 1 + phi[1] * h0 * (h0 - 1) / phi[0] ** 2) ** (1 / h0)
    return spe > q, spe, k


def train(a: argparse.Namespace, train_file: Path, out: Path, log_model: str) -> None:
    from training.logs import LogFitSettings, fit_log

    extra = {"session_timeout_s": a.session_timeout} if a.session_timeout else {}
    if log_model == "counts":
        extra["idle_check_s"] = a.idle_check
    else:
        extra.update(context=a.context, epochs=a.epochs)
    r = fit_log(LogFitSettings(data=train_file, out=out, log_model=log_model, threads=a.threads, seed=a.seed, threshold_margin=a.threshold_margin, **extra))
    print(f"trained {log_model}: {r.templates} templates, {r.train_rows} training rows, threshold {r.threshold:.3f}, {r.seconds:.0f} s")


def block_scores(scores_csv: Path, kinds: tuple[str, ...]) -> dict[str, float]:
    """Largest score/threshold per block over the rows of the given kinds."""
    best: dict[str, float] = {}
    with open(scores_csv, newline="") as f:
        for r in csv.DictReader(f):
            if r["kind"] in kinds and r["score"]:
                v = float(r["score"]) / float(r["threshold"])
                if v > best.get(r["key"], 0.0):
                    best[r["key"]] = v
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=Path("/tmp/quality_logs"))
    ap.add_argument("--train-fraction", type=float, default=0.3)
    ap.add_argument("--session-timeout", type=float, default=None, help="default: fit's (86,400 s counts, 3,600 s sequence)")
    ap.add_argument("--idle-check", type=float, default=600.0)
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--threshold-margin", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default="counts,sequence", help="comma-separated: counts, sequence")
    ap.add_argument("--reuse-model", action="store_true", help="skip training when WORK/bundle-<model> exists")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    models = [m.strip() for m in a.models.split(",") if m.strip()]

    lines, labels = load_hdfs(a.data)
    parser = LineParser(make_config(format="hdfs"))
    parsed = [parser.parse(x) for x in lines]
    t = np.array([p.timestamp_ms for p in parsed], dtype=np.int64)
    cut = int(t.min() + a.train_fraction * (t.max() - t.min()))
    first: dict[str, int] = {}
    for p in parsed:
        for e in p.entities:
            first.setdefault(e, p.timestamp_ms)
    train_blocks = {b for b, f in first.items() if f <= cut and not labels[b]}
    test_blocks = [b for b, f in first.items() if f > cut]
    # the tuning set: fit's validation entities (newest 20 % of the training blocks by first line, the
    # same rule as training/logs.py) and the anomalous blocks of the training period
    by_first = sorted(train_blocks, key=lambda b: first[b])
    val_blocks = by_first[len(by_first) - max(1, int(round(len(by_first) * 0.2))):]
    tune_blocks = val_blocks + [b for b, f in first.items() if f <= cut and labels[b]]
    order = np.argsort(t, kind="stable")  # the stream, in time order
    stream = a.work / "hdfs_stream.log"
    stream.write_bytes(b"\n".join(lines[i] for i in order.tolist()) + b"\n")
    train_file = a.work / "hdfs_train.log"
    train_file.write_bytes(b"\n".join(lines[i] for i in order.tolist() if parsed[i].entities[0] in train_blocks) + b"\n")
    print(f"{len(lines)} lines, {len(first)} blocks; training: {len(train_blocks)} normal blocks starting in the first "
          f"{a.train_fraction:.0%} of the time span; evaluated: {len(test_blocks)} blocks starting after "
          f"({sum(labels[b] for b in test_blocks)} anomalous); tuning set: {len(val_blocks)} held-out training blocks + "
          f"{len(tune_blocks) - len(val_blocks)} anomalous blocks of the training period")
    y_test = np.array([labels[b] for b in test_blocks])
    y_tune = np.array([labels[b] for b in tune_blocks])

    def both(flag_of) -> tuple[dict, dict]:
        return prf(np.array([flag_of(b) for b in test_blocks]), y_test), prf(np.array([flag_of(b) for b in tune_blocks]), y_tune)

    settings = DetectionSettings(idle_timeout_ms=None, threshold=ThresholdParams(warmup=1000, history=1000), alerts=AlertParams())
    rows: list[tuple[str, dict, dict]] = []
    results: dict = {"split": {"cut_ms": cut, "train_blocks": len(train_blocks), "test_blocks": len(test_blocks),
                               "test_anomalous": int(y_test.sum()), "tune_blocks": len(tune_blocks), "tune_anomalous": int(y_tune.sum())}}
    per_model: dict[str, dict[str, float]] = {}
    spec = None
    for m in models:
        bundle_dir = a.work / f"bundle-{m}"
        if not (a.reuse_model and bundle_dir.is_dir()):
            train(a, train_file, bundle_dir, m)
        bundle = load_bundle(bundle_dir)
        spec = load_log_spec(bundle)
        scorer = Scorer(bundle, provider="cpu", intra_op_threads=a.threads)
        out = a.work / f"replay-{m}"
        s = replay_log(bundle, spec, scorer, settings, stream, out)
        print(f"replay {m}: {s.lines} lines, {s.rows} rows, {s.scored} scored, {s.lines_per_s:,.0f} lines/s end to end "
              f"(log stage {s.stage_seconds:.1f} s of {s.seconds:.1f} s)")
        dec = read_entities(out / "entities.csv")
        mm = session_metrics(dec, labels, start_after_ms=cut)
        print(f"{m}:", format_session_summary(mm))
        alerted = {k for k, al in zip(dec.keys, dec.alerted.tolist()) if al}
        test_m, tune_m = both(lambda b: b in alerted)
        assert (test_m["tp"], test_m["fp"]) == (mm["tp"], mm["fp"])
        if m == "counts":
            name = f"count vectors (cumulative per block, PCA per row kind, idle check {a.idle_check:g} s), streamed"
        else:
            name = "Transformer on template sequences (per-event NLL + session end), streamed"
        rows.append((name, test_m, tune_m))
        results[m] = {**mm, "tune": tune_m, "replay_lines_per_s": s.lines_per_s, "bundle": str(bundle_dir), "threshold": bundle.calibration.threshold}
        per_model[m] = block_scores(out / "scores.csv", ("line",) if m == "sequence" else ("line", "idle-check"))
        if m == "sequence":
            rows.append(("same sequence scores, line rows only (no session-end rows)", *both(lambda b: per_model["sequence"].get(b, 0.0) > 1.0)))
    if "counts" in per_model and "sequence" in per_model:
        pc, ps = per_model["counts"], per_model["sequence"]
        rows.append(("counts + sequence line rows: max of score / own threshold", *both(lambda b: max(pc.get(b, 0.0), ps.get(b, 0.0)) > 1.0)))

    # Baselines on the same split and template set: per-block template counts of the whole log.
    ts = spec.templates
    V = ts.vocab_size
    ids = np.array([ts.match(p.message) for p in parsed], dtype=np.int32)
    fz = LogFeaturizer(V, make_feature_config(session_timeout_s=1e12, max_session_events=10**7, max_entities=10**7))
    fz.add_batch([parsed[i].entities[0] for i in order.tolist()], t[order], ids[order])
    counts = {x.entity: x.counts(V).astype(np.float64) for x in fz.close_all().sessions}
    rows.append(("unknown template seen", *both(lambda b: counts[b][0] > 0)))
    fit_blocks = sorted(train_blocks - set(val_blocks))  # fitted without the tuning set's normal blocks, like the models
    _, _, k = pca_baseline(np.stack([counts[b] for b in fit_blocks]), np.zeros((1, V)))
    pca_flag = {}
    for group in (test_blocks, tune_blocks):
        f, _, _ = pca_baseline(np.stack([counts[b] for b in fit_blocks]), np.stack([counts[b] for b in group]))
        pca_flag.update(zip(group, f.tolist()))
    rows.append((f"PCA on per-block count vectors (tf-idf, k={k}, SPE > Q_0.001), whole block at once", *both(lambda b: pca_flag[b])))

    print(f"\n{'detector':100s}  evaluated P / R / F1 (tp fp fn)      tuning set F1")
    for name, m, tm in rows:
        print(f"{name:100s}  {m['precision']:.3f} {m['recall']:.3f} {m['f1']:.3f} ({m['tp']} {m['fp']} {m['fn']})   {tm['f1']:.3f}")
    results["rows"] = [{"detector": n, "evaluated": m, "tuning_set": tm} for n, m, tm in rows]
    results["created"] = time.strftime("%Y-%m-%d %H:%M")
    (a.work / "results.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    if a.markdown:
        sp = results["split"]
        print(f"\n| detector (block level) | precision | recall | F1 | tuning set F1 ({sp['tune_blocks']} blocks, {sp['tune_anomalous']} anomalous) |")
        print("|---|---|---|---|---|")
        for name, m, tm in rows:
            print(f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {tm['f1']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
