"""`stream-detector-train report BUNDLE_DIR`: report.png and a short text summary of a bundle.

Everything is drawn from bundle.json (the loss history, the validation score histogram and the
per-feature validation error that `fit` stores there), so a report can be redrawn from the bundle
alone. matplotlib is imported lazily (Agg backend)."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

from stream_detector.core.bundle import Bundle, BundleError, load_bundle

REPORT_FILE = "report.png"


def render_report_png(bundle: Bundle) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = bundle.training
    hist = tr.get("history", {})
    val = tr.get("validation", {})
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    epochs = np.arange(1, len(hist.get("train_loss", [])) + 1)
    ax.plot(epochs, hist.get("train_loss", []), marker="o", label="train")
    ax.plot(epochs, hist.get("val_loss", []), marker="o", label="validation")
    if tr.get("best_epoch"):
        ax.axvline(tr["best_epoch"], color="grey", ls=":", label=f"best epoch {tr['best_epoch']}")
    ax.set_yscale("log")
    ax.set(title="loss (MSE on scored positions)", xlabel="epoch")
    ax.legend()
    ax = axes[1]
    h = val.get("score_histogram")
    if h:
        edges = np.asarray(h["edges"])
        ax.stairs(h["counts"], edges, fill=True, alpha=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.axvline(bundle.calibration.threshold, color="red", label=f"threshold {bundle.calibration.threshold:.4g}")
    ax.set(title=f"validation scores ({bundle.calibration.n_scores} windows)", xlabel="score", ylabel="windows")
    ax.legend()
    ax = axes[2]
    fe = val.get("feature_error_mean", [])
    if fe:
        order = np.argsort(fe)[::-1][:40]
        ax.bar(range(len(order)), np.asarray(fe)[order])
        ax.set_xticks(range(len(order)), [bundle.features[i] for i in order], rotation=90, fontsize=7)
    ax.set(title="mean validation error per feature (top 40)", ylabel="squared error")
    fig.suptitle(
        f"{bundle.path.name}: {bundle.model.get('variant', '?')} model {bundle.model_version}, W={bundle.window}, "
        f"F={bundle.n_features}"
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def summary_text(bundle: Bundle) -> str:
    tr = bundle.training
    val_losses = tr.get("history", {}).get("val_loss", [])
    q = bundle.calibration.quantiles
    lines = [
        f"bundle {bundle.path}: model_version {bundle.model_version}",
        f"  model: {bundle.model.get('variant')} transformer, {bundle.model.get('parameters')} parameters, "
        f"W={bundle.window}, F={bundle.n_features}, scoring positions {list(bundle.scoring.positions)}",
        f"  data: {tr.get('data_source')} ({tr.get('rows')} rows, {tr.get('entities')} entities, "
        f"{tr.get('train_windows')} train / {tr.get('val_windows')} validation windows)",
        f"  training: {len(val_losses)} epochs, best epoch {tr.get('best_epoch')} val loss "
        f"{tr.get('best_val_loss', float('nan')):.5g}"
        f"{', interrupted' if tr.get('interrupted') else ''}{', early stop' if tr.get('early_stopped') else ''}, "
        f"{tr.get('train_seconds', 0):.1f} s on {tr.get('device')}",
        f"  ONNX parity: max |ORT - PyTorch| = {tr.get('parity_max_abs_diff', float('nan')):.3g}",
        "  validation score quantiles: " + ", ".join(f"q{k}={v:.4g}" for k, v in q.items()),
        f"  suggested threshold: {bundle.calibration.threshold:.5g}",
    ]
    if (level_range := bundle.calibration.level_range()) is not None:  # the quantiles above are in each entity's frame
        lines.insert(
            -1,
            f"  (in each entity's own frame; its level, x the calibration's: "
            f"{len(bundle.calibration.entity_levels or ())} entities, {level_range[0]:.3g} to {level_range[1]:.3g})",
        )
    return "\n".join(lines)


def write_report(bundle: Bundle) -> Path:
    out = bundle.path / REPORT_FILE
    tmp = out.with_suffix(".png.tmp")
    tmp.write_bytes(render_report_png(bundle))
    tmp.replace(out)
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="write report.png for a bundle and print a summary", description=__doc__)
    p.add_argument("bundle_dir", type=Path, metavar="BUNDLE_DIR")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    try:
        bundle = load_bundle(args.bundle_dir)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        out = write_report(bundle)
    except ImportError:
        print("report.png needs matplotlib (pip install 'stream-detector[train]'); summary only:", file=sys.stderr)
        out = None
    print(summary_text(bundle))
    if out:
        print(f"  report: {out}")
    return 0
