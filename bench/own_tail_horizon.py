"""The own tail's horizon: re-judge recorded raw scores with other block-maximum statistics.

    .venv/bin/python bench/own_tail_horizon.py --variants 10:0.5,50:0.8 -- --datasets univariate --seeds 0,1,2 \
        --work WORK --detection own_tail=true --only 'new default, own_tail=true' --scores-from 'new default'

`own_tail` (core/thresholds.py) takes the TAIL_QUANTILE (the median) of an entity's last TAIL_BLOCKS
maxima of 100 normal scores as its typical largest score. Each variant BLOCKS:QUANTILE sets those two
and runs bench/generality.py with the arguments after `--` (a `--detection` that changes nothing, such
as own_tail=true, gives the variant its own replay folders). 10:0.5 is the default; a longer horizon
or a higher quantile sees rarer bursts of an entity's noise, and more of an incident's sub-threshold
scores. docs/quality.md, "The own tail's horizon", has what it measured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import generality  # noqa: E402

from stream_detector.core import thresholds  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="10:0.5", help="BLOCKS:QUANTILE[,BLOCKS:QUANTILE] (10:0.5 is the default)")
    args = p.parse_args(ours)
    try:
        variants = [(int(b), float(q)) for b, q in (v.split(":") for v in args.variants.split(","))]
    except ValueError:
        p.error(f"--variants {args.variants!r}: expected BLOCKS:QUANTILE pairs such as 10:0.5,50:0.8")
    if bad := [(b, q) for b, q in variants if b < thresholds.MIN_BLOCKS or not 0.0 < q < 1.0]:
        p.error(f"variant {bad[0][0]}:{bad[0][1]}: BLOCKS must be at least {thresholds.MIN_BLOCKS}, QUANTILE in (0, 1)")
    for blocks, q in variants:
        thresholds.TAIL_BLOCKS, thresholds.TAIL_QUANTILE = blocks, q
        print(f"== own tail: quantile {q} of the last {blocks} block maxima", flush=True)
        if rc := generality.main(rest):
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
