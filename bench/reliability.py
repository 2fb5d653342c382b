"""Run the fault-injection suite (tests/test_reliability_faults.py) against the real broker and print
its results table (markdown); `--write docs/reliability.md` replaces the table between the markers
there, so the document's figures are produced by this command, never typed.

    .venv/bin/python bench/reliability.py [--write docs/reliability.md] [--from rows.jsonl] [-k EXPR]

The suite itself passes or fails on its assertions; this script only collects the figures each
scenario records (SD_RELIABILITY_REPORT). `--from` renders rows collected earlier.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
START, END = "<!-- reliability-table:start -->", "<!-- reliability-table:end -->"


def table(rows: list[dict]) -> str:
    head = "| scenario | guarantee | events in | alerts out | duplicates | lost | recovery (s) | notes |\n|---|---|---:|---:|---:|---:|---:|---|\n"
    lines = []
    for r in rows:
        rec = "-" if r["recovery_s"] is None else f"{r['recovery_s']:.1f}"
        lines.append(f"| {r['scenario']} | {r['guarantee']} | {r['events_in']:,} | {r['alerts_out']:,} | {r['duplicates']} | {r['lost']} | {rec} | {r['notes']} |\n")
    return head + "".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", type=Path, help="markdown file whose table (between the markers) is replaced")
    ap.add_argument("--from", dest="rows", type=Path, help="render rows from this JSON-lines file instead of running the suite")
    ap.add_argument("-k", dest="select", help="pytest -k expression (a subset of the scenarios)")
    args = ap.parse_args(argv)
    if args.rows is None:
        fd, path = tempfile.mkstemp(prefix="reliability-", suffix=".jsonl")
        os.close(fd)
        cmd = [sys.executable, "-m", "pytest", "tests/test_reliability_faults.py", "-q", "-p", "no:cacheprovider",
               "--basetemp", tempfile.mkdtemp(prefix="reliability-pytest-")]
        if args.select:
            cmd += ["-k", args.select]
        rc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "SD_RELIABILITY_REPORT": path}).returncode
        if rc != 0:
            print(f"reliability: the fault suite failed (pytest exit {rc}); rows so far are in {path}", file=sys.stderr)
            return 1
        rows_path = Path(path)
    else:
        rows_path = args.rows
    try:
        rows = [orjson.loads(line) for line in rows_path.read_bytes().splitlines() if line.strip()]
    except (OSError, orjson.JSONDecodeError) as e:
        print(f"reliability: cannot read rows from {rows_path} ({e}).", file=sys.stderr)
        return 2
    text = table(rows)
    print(text)
    if args.write is not None:
        doc = args.write.read_text(encoding="utf-8")
        if START not in doc or END not in doc:
            print(f"reliability: {args.write} has no {START} ... {END} markers.", file=sys.stderr)
            return 2
        before, rest = doc.split(START, 1)
        _, after = rest.split(END, 1)
        args.write.write_text(f"{before}{START}\n{text}{END}{after}", encoding="utf-8")
        print(f"wrote the table into {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
