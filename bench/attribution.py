"""Do an alert's `top_features` name the metrics that explain the incident? SMD's interpretation labels.

    .venv/bin/python bench/attribution.py [--machines machine-1-7,machine-2-1] [--seeds 0,1,2] [--work DIR]

For each machine and seed, the Transformer is trained as `bench/generality.py` trains it (the same
cached bundles, `fit` defaults with the bench's training length), once with absolute per-feature
errors (`fit`'s default) and once with relative ones (`--feature-errors relative`); every test row
of a labelled incident is scored, and its per-feature errors (the ranking an alert's
`top_features` comes from) are compared with the features SMD's `interpretation_label/` names for
that incident: HitRate@P% (OmniAnomaly, Su et al. 2019), the share of an incident's n named
features found among the P% x n highest-ranked ones, averaged over the rows. The point-wise
AUC-PR of the two scores is printed beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stream_detector.core.bundle import load_bundle  # noqa: E402
from stream_detector.core.scorer import Scorer  # noqa: E402
from stream_detector.offline.datafiles import read_table  # noqa: E402
from stream_detector.offline.measures import average_precision  # noqa: E402

from generality import train  # noqa: E402  (bench/generality.py: the same cached bundles)

VARIANTS = {"absolute (default)": "transformer", "relative": "transformer:feature_errors=relative"}


def interpretation(path: Path, n_rows: int) -> list[tuple[int, int, np.ndarray]]:
    """(first row, end row exclusive, 0-based feature indices) per line `start-end:dim,dim`: rows as
    `read_labels` reads these files (0-based, end exclusive), dimensions 1-based."""
    out = []
    for line in path.read_text().split():
        span, dims = line.split(":")
        start, end = (int(v) for v in span.split("-"))
        out.append((start, min(end, n_rows), np.array([int(d) - 1 for d in dims.split(",")])))
    return out


def hit_rate(errors: np.ndarray, incidents: list[tuple[int, int, np.ndarray]], window: int, percent: float) -> float:
    """Mean over the scored rows of every incident of |top(P% x n) ∩ named| / n."""
    rates = []
    for start, end, named in incidents:
        k = int(np.floor(percent / 100.0 * named.size))
        for row in range(max(start, window - 1), end):
            top = np.argsort(-errors[row - window + 1], kind="stable")[:k]
            rates.append(np.isin(named, top).mean())
    return float(np.mean(rates))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--machines", default="machine-1-7,machine-2-1")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="folder holding smd/")
    p.add_argument("--work", type=Path, default=Path("/tmp/stream-detector-generality"), help="bench/generality.py's --work (bundle cache)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--max-windows-per-epoch", type=int, default=4096)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    root = args.data / "smd"
    print("| machine | feature errors | HitRate@100% | HitRate@150% | AUC-PR | seeds |")
    print("|---|---|---|---|---|---|")
    for machine in args.machines.split(","):
        test = root / "test" / f"{machine}.txt"
        labels = np.loadtxt(root / "test_label" / f"{machine}.txt").astype(bool)
        for name, variant in VARIANTS.items():
            h100, h150, auc = [], [], []
            for seed in (int(s) for s in args.seeds.split(",")):
                args.train_seed = seed
                bundle = load_bundle(train(variant, root / "train" / f"{machine}.txt", "smd", args.work, args))
                x = bundle.normaliser.apply(read_table(test, "smd", features=bundle.features).values)
                w = bundle.window
                windows = np.lib.stride_tricks.sliding_window_view(x, w, axis=0).transpose(0, 2, 1)
                scores, errors = Scorer(bundle, provider="cpu", intra_op_threads=1).score(windows)
                incidents = interpretation(root / "interpretation_label" / f"{machine}.txt", x.shape[0])
                h100.append(hit_rate(errors, incidents, w, 100))
                h150.append(hit_rate(errors, incidents, w, 150))
                auc.append(average_precision(labels[w - 1 :], scores) or 0.0)
            print(f"| {machine} | {name} | {np.mean(h100):.3f} | {np.mean(h150):.3f} | {np.mean(auc):.3f} | {args.seeds} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
