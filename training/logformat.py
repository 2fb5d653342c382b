"""`stream-detector-train logformat`: a dry run of the line parser on the first lines of a log file.

With the same parser flags and the same TOML as `fit --format log` (training/logs.py), it parses the
first `--lines` lines, mines templates on them as training would (drain3), and prints what each of
the first `--show` lines gave per field (timestamp, entity, level, component, message, template),
then per field how many lines had it, and how many lines do not parse, with the first reasons. It is
how a user finds the right regex before training for minutes: it refuses wrong settings with the
same one sentence as `fit`, and reads a whole line regardless of what the model would do with it.

Exit status: 0 when at least one line parses, 1 when none does, 2 for settings that cannot work.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stream_detector.logs.parse import (
    LineParser,
    LogConfigError,
    LogLineError,
    LogParserConfig,
    ParsedLine,
    make_config,
)
from stream_detector.logs.templates import TemplateMiner

DEFAULT_LINES = 1000
DEFAULT_SHOW = 5
MAX_REASONS = 5


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "logformat",
        help="dry run of the log line parser: what each field reads on the first lines of a log file",
        description="Parse the first lines of a log file with the parser settings of `fit --format log` (the same "
        "flags, or the same TOML file with --config) and print, per field (timestamp, entity, level, component, "
        "message, template), what the lines gave, and how many lines do not parse and why. Nothing is trained.",
    )
    p.add_argument("--data", type=Path, default=None, help="log file (or 'data' in the config file)")
    p.add_argument("--config", type=Path, default=None, help="the TOML file of `fit --format log` (its parser keys)")
    p.add_argument("--lines", type=int, default=DEFAULT_LINES, help="lines to parse (default %(default)s)")
    p.add_argument("--show", type=int, default=DEFAULT_SHOW, help="lines to print field by field (default %(default)s)")
    from training.logsettings import add_log_arguments

    add_log_arguments(p, parser_only=True)
    p.set_defaults(func=handle)


def parser_settings(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """(log file, LogParserConfig fields) from the TOML file and the flags; LogTrainingError otherwise."""
    from training.logsettings import PARSER_SETTINGS, LogTrainingError, read_log_toml
    from training.settings import FitSettings

    values: dict[str, Any] = {}
    if args.config is not None:  # fit's TOML: the keys other than the parser's are read by fit, not here
        values = read_log_toml(args.config, extra_keys=frozenset(FitSettings.model_fields))
    for name in PARSER_SETTINGS.values():
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    data = args.data if args.data is not None else values.get("data")
    if data in (None, ""):
        raise LogTrainingError("the option --data is required (or 'data' in the config file).")
    fields = {p: values[k] for p, k in PARSER_SETTINGS.items() if values.get(k) is not None}
    return Path(data), fields


def handle(args: argparse.Namespace) -> int:
    from training.logs import read_lines
    from training.logsettings import LogTrainingError

    try:
        if args.lines < 1 or args.show < 0:
            raise LogTrainingError("--lines must be at least 1 and --show at least 0.")
        path, fields = parser_settings(args)
        parser = LineParser(make_config(**fields))
        lines = read_lines(path)[: args.lines]
    except (LogTrainingError, LogConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.getLogger("drain3").setLevel(logging.WARNING)  # its start-up lines would interleave the report
    report = dry_run(parser, lines)
    print(report.text(path, args.show))
    return 0 if report.parsed else 1


@dataclass
class DryRun:
    """What the parser made of some lines."""

    config: LogParserConfig
    timestamp_format: str
    lines: int = 0
    parsed: int = 0
    failures: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)  # the first (1-based line number, reason)
    results: list[tuple[int, str, ParsedLine, str]] = field(default_factory=list)  # (line no, raw, parsed, template)

    def text(self, path: Path, show: int = DEFAULT_SHOW) -> str:
        cfg = self.config
        out = [
            f"{path}: {self.lines} lines read with format {cfg.format!r}"
            + (f", line regex {cfg.line_regex}" if cfg.line_regex else "")
            + f", timestamps as {self.timestamp_format!r}, entity by {_entity_words(cfg)}",
            "",
        ]
        for n, raw, p, template in self.results[:show]:
            out.append(f"line {n}: {_clip(raw, 160)}")
            out.extend(f"  {name:<10} {value}" for name, value in _fields(p, template))
            out.append("")
        out.append(f"{self.parsed} of {self.lines} lines parse; {self.failures} do not")
        out.extend(f"  line {n}: {reason}" for n, reason in self.failed)
        if self.failures > len(self.failed):
            out.append(f"  ... and {self.failures - len(self.failed)} more")
        if self.results:
            out.append("per field, over the lines that parse:")
            parsed = [p for _, _, p, _ in self.results]
            templates = [t for _, _, _, t in self.results]
            out.extend(f"  {name:<10} {summary}" for name, summary in _summaries(parsed, templates))
        return "\n".join(out)


def dry_run(parser: LineParser, lines: list[bytes]) -> DryRun:
    """Parse `lines`; mine templates on the messages of those that parse (as training would)."""
    r = DryRun(parser.config, parser.timestamp_format)
    ok: list[tuple[int, str, ParsedLine]] = []
    for i, raw in enumerate(lines, 1):
        r.lines += 1
        try:
            p = parser.parse(raw)
        except LogLineError as e:
            r.failures += 1
            if len(r.failed) < MAX_REASONS:
                r.failed.append((i, str(e)))
            continue
        r.parsed += 1
        ok.append((i, raw.decode("utf-8", "replace").rstrip("\r\n"), p))
    miner = TemplateMiner()
    for _, _, p in ok:
        miner.learn(p.message)
    templates = miner.freeze()
    r.results = [(i, raw, p, templates.template(templates.match(p.message))) for i, raw, p in ok]
    return r


def _fields(p: ParsedLine, template: str) -> list[tuple[str, str]]:
    return [
        ("timestamp", "(none: the Kafka timestamp is used)" if p.timestamp_ms is None else _when(p.timestamp_ms)),
        ("entity", ", ".join(p.entities)),
        ("level", "(none)" if p.level is None else p.level),
        ("component", "(none)" if p.component is None else p.component),
        ("message", _clip(p.message, 160)),
        ("template", template),
    ]


def _summaries(parsed: list[ParsedLine], templates: list[str]) -> list[tuple[str, str]]:
    n = len(parsed)
    times = [p.timestamp_ms for p in parsed if p.timestamp_ms is not None]
    entities = Counter(e for p in parsed for e in p.entities)
    out = [
        (
            "timestamp",
            f"{len(times)} of {n} lines"
            + (f", {_when(min(times))} .. {_when(max(times))}" if times else " (training needs each line's time)"),
        ),
        ("entity", f"{n} of {n} lines, {len(entities)} distinct: {_top(entities)}"),
    ]
    for name, values in (("level", [p.level for p in parsed]), ("component", [p.component for p in parsed])):
        have = [v for v in values if v is not None]
        out.append(
            (
                name,
                f"{len(have)} of {n} lines" + (f", {len(set(have))} distinct: {_top(Counter(have))}" if have else ""),
            )
        )
    empty = sum(not p.message for p in parsed)
    out.append(("message", f"{n - empty} of {n} lines non-empty"))
    counts = Counter(templates)
    out.append(
        ("template", f"{len(counts)} templates on these lines (drain3, as training mines them): {_top(counts, 3)}")
    )
    return out


def _top(c: Counter[Any], k: int = 5) -> str:
    items = [f"{_clip(str(v), 60)} ({n})" for v, n in c.most_common(k)]
    return ", ".join(items) + (", ..." if len(c) > k else "")


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z ({ms} ms)"


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[:n] + "…"


def _entity_words(cfg: LogParserConfig) -> str:
    if cfg.entity == "regex":
        return f"regex {cfg.entity_regex} in the message"
    if cfg.entity in ("field", "json-field"):
        return f"field {cfg.entity_field!r}"
    return "the Kafka message key (none in a file: default_entity or refused)"
