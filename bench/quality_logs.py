"""Block-level detection quality on the labelled HDFS logs (issue 8), model and baselines in one harness.

Protocol (the issue's): training = the Normal blocks whose first line falls in the first 30 % of the
log's time span (all their lines; templates are mined on those lines only); the whole log is then
replayed in time order as one stream through the log stage and the scoring core (`replay --format
log`'s code path); evaluated = the blocks whose first line comes after the training period. A block
is flagged if it had an alert. Baselines, same split and same template set:
- "unknown template seen": a block is flagged when one of its lines matches no learned template;
- PCA on per-block template-count vectors (loglizer style: tf-idf weighting, centring, k components
  for 95 % of the variance, SPE above the Q-statistic at alpha = 0.001).

    .venv/bin/python bench/quality_logs.py [--data ../shared/data] [--work /tmp/quality_logs] [--markdown]

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

from stream_detector.alerts import AlertParams  # noqa: E402
from stream_detector.bundle import load_bundle  # noqa: E402
from stream_detector.logbundle import load_log_spec  # noqa: E402
from stream_detector.logeval import format_session_summary, prf, read_entities, session_metrics  # noqa: E402
from stream_detector.logfeatures import LogFeaturizer, make_feature_config  # noqa: E402
from stream_detector.logparse import LineParser, make_config  # noqa: E402
from stream_detector.logreplay import replay_log  # noqa: E402
from stream_detector.pipeline import DetectionSettings  # noqa: E402
from stream_detector.scorer import Scorer  # noqa: E402
from stream_detector.thresholds import ThresholdParams  # noqa: E402


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=Path("/tmp/quality_logs"))
    ap.add_argument("--train-fraction", type=float, default=0.3)
    ap.add_argument("--session-timeout", type=float, default=3600.0)
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--threshold-margin", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse-model", action="store_true", help="skip training when WORK/bundle exists")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)

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
    order = np.argsort(t, kind="stable")  # the stream, in time order
    stream = a.work / "hdfs_stream.log"
    stream.write_bytes(b"\n".join(lines[i] for i in order.tolist()) + b"\n")
    train_file = a.work / "hdfs_train.log"
    train_file.write_bytes(b"\n".join(lines[i] for i in order.tolist() if parsed[i].entities[0] in train_blocks) + b"\n")
    print(f"{len(lines)} lines, {len(first)} blocks; training: {len(train_blocks)} normal blocks starting in the first "
          f"{a.train_fraction:.0%} of the time span; evaluated: {len(test_blocks)} blocks starting after "
          f"({sum(labels[b] for b in test_blocks)} anomalous)")

    bundle_dir = a.work / "bundle"
    if not (a.reuse_model and bundle_dir.is_dir()):
        from training.logs import LogFitSettings, fit_log

        r = fit_log(LogFitSettings(data=train_file, out=bundle_dir, session_timeout_s=a.session_timeout, context=a.context,
                                   epochs=a.epochs, threads=a.threads, seed=a.seed, threshold_margin=a.threshold_margin))
        print(f"trained: {r.templates} templates, {r.train_rows} training rows, val loss {r.best_val_loss:.4f}, "
              f"threshold {r.threshold:.3f}, {r.seconds:.0f} s")
    bundle = load_bundle(bundle_dir)
    spec = load_log_spec(bundle)
    settings = DetectionSettings(idle_timeout_ms=None, threshold=ThresholdParams(warmup=1000, history=1000), alerts=AlertParams())
    scorer = Scorer(bundle, provider="cpu", intra_op_threads=a.threads)
    out = a.work / "replay"
    s = replay_log(bundle, spec, scorer, settings, stream, out)
    print(f"replay: {s.lines} lines, {s.rows} rows, {s.scored} scored, {s.lines_per_s:,.0f} lines/s end to end "
          f"(log stage {s.stage_seconds:.1f} s of {s.seconds:.1f} s)")
    dec = read_entities(out / "entities.csv")
    model_m = session_metrics(dec, labels, start_after_ms=cut)
    print("model:", format_session_summary(model_m))

    # Baselines on the same split and template set: per-block template counts of the whole log.
    ts = spec.templates
    V = ts.vocab_size
    ids = np.array([ts.match(p.message) for p in parsed], dtype=np.int32)
    fz = LogFeaturizer(V, make_feature_config(session_timeout_s=1e12, max_session_events=10**7, max_entities=10**7))
    fz.add_batch([parsed[i].entities[0] for i in order.tolist()], t[order], ids[order])
    counts = {x.entity: x.counts(V).astype(np.float64) for x in fz.close_all().sessions}
    Xtr = np.stack([counts[b] for b in sorted(train_blocks)])
    Xte = np.stack([counts[b] for b in test_blocks])
    yte = np.array([labels[b] for b in test_blocks])
    unk = prf(Xte[:, 0] > 0, yte)
    pca_flag, _, k = pca_baseline(Xtr, Xte)
    pca = prf(pca_flag, yte)
    # The same scores without the session-end rows, at the same calibrated threshold (diagnosis).
    line_max: dict[str, float] = {}
    with open(out / "scores.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["kind"] == "line":
                line_max[r["key"]] = max(line_max.get(r["key"], 0.0), float(r["score"]))
    thr = bundle.calibration.threshold
    lines_only = prf(np.array([line_max.get(b, 0.0) > thr for b in test_blocks]), np.array([labels[b] for b in test_blocks]))
    rows = [
        ("Transformer on template sequences (per-event NLL + session end), streamed", model_m),
        ("same scores, line rows only (no session-end rows), same threshold", lines_only),
        ("unknown template seen", unk),
        (f"PCA on per-block count vectors (tf-idf, k={k}, SPE > Q_0.001)", pca),
    ]
    print(f"\n{'detector':76s}  P      R      F1")
    for name, m in rows:
        print(f"{name:76s}  {m['precision']:.3f}  {m['recall']:.3f}  {m['f1']:.3f}   (tp {m['tp']}, fp {m['fp']}, fn {m['fn']})")
    results = {"split": {"cut_ms": cut, "train_blocks": len(train_blocks), "test_blocks": len(test_blocks), "test_anomalous": int(yte.sum())},
               "model": model_m, "model_lines_only": lines_only, "unknown_template": unk, "pca": pca, "replay_lines_per_s": s.lines_per_s,
               "bundle": str(bundle_dir), "threshold": bundle.calibration.threshold, "created": time.strftime("%Y-%m-%d %H:%M")}
    (a.work / "results.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    if a.markdown:
        print("\n| detector (block level, held-out blocks) | precision | recall | F1 |\n|---|---|---|---|")
        for name, m in rows:
            print(f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
