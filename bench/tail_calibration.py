"""How often normal scores pass a calibrated bar when the tail is fitted to few validation scores.

Draws `--draws` sets of n validation scores from a known distribution (exponential(1), or
Student-t(3) magnitudes), calibrates each as `fit` does (core/calibration.describe_distribution),
and prints the true probability that a fresh normal score passes the bar of each surprise level,
averaged over the draws: what the alert level promises (10 ** -level) against what it delivers.
Three tails for the small-sample case (under 500 scores): the predictive one `fit` uses
(`predictive_tail`), the exponential fitted to the same excesses (its estimation uncertainty left
out), and the exponential through the 90 and 95 % quantiles (`fit` before 2026-12-06).

    .venv/bin/python bench/tail_calibration.py
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stream_detector.core.calibration import ScoreDistribution, describe_distribution  # noqa: E402


def survival(kind: str, x: float) -> float:
    if kind == "exponential":
        return math.exp(-x)
    r = x / math.sqrt(3.0)  # |T|, Student-t with 3 degrees of freedom: its distribution in closed form
    return 1.0 - 2.0 / math.pi * (r / (1.0 + r * r) + math.atan(r))


def draw(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.exponential(1.0, size=n) if kind == "exponential" else np.abs(rng.standard_t(3, size=n))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="60,150,450", help="validation scores per draw (under 500: the small-sample tail)")
    p.add_argument("--levels", default="3,4")
    p.add_argument("--draws", type=int, default=2000)
    p.add_argument("--kinds", default="exponential,t3")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    levels = [float(v) for v in a.levels.split(",")]
    print("| scores | level | promised | predictive (fit) | exponential, same excesses | exponential through 90/95 % (old) |")
    print("|---|---|---|---|---|---|")
    for kind in a.kinds.split(","):
        for n in (int(v) for v in a.sizes.split(",")):
            rates: dict[str, dict[float, list[float]]] = {k: {lv: [] for lv in levels} for k in ("pred", "plain", "old")}
            for _ in range(a.draws):
                s = draw(kind, rng, n)
                q, tail = describe_distribution(s)
                u, mid = q["0.9"], q["0.95"]
                old_scale = max(mid - u, 1e-12) / math.log(2.0)
                tails = {"pred": tail, "plain": {**tail, "shape": 0.0}, "old": {**tail, "shape": 0.0, "scale": old_scale}}
                for k, t in tails.items():
                    d = ScoreDistribution.from_json(q, t)
                    for lv in levels:
                        rates[k][lv].append(survival(kind, math.exp(d.log_score_at(lv))))
            for lv in levels:
                print(f"| {kind} {n} | {lv:g} | {10 ** -lv:.0e} | " + " | ".join(f"{np.mean(rates[k][lv]):.1e}" for k in ("pred", "plain", "old")) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
