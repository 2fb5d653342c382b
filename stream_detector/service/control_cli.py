"""`stream-detector silence` and `stream-detector feedback`: write to the control topic.

    stream-detector silence --entities 'web-*' --for 2h --reason "deploy" [--starts-at ISO] [--id ID]
    stream-detector silence --delete ID
    stream-detector silence --list
    stream-detector feedback ALERT_ID --verdict false_positive|true_positive [--key ENTITY] [--comment TEXT]

Each takes the service's settings (`--config`, env, flags) and needs `[kafka] control_topic`. The
topic is created compacted when missing, or checked (service/control.py `ensure_control_topic`), and
a record counts as written once the broker acknowledged it (within `kafka.timeout_s`). The record
format is ingest/control.py's. `--for` takes a duration: 90s, 30m, 2h, 1d, 1w. `--list` reads the
topic to its end and prints the silences in force, then the scheduled ones. Exit 0, or 2 with one
sentence (settings, arguments, broker).
"""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import sys
import time
import uuid

from stream_detector.config import ConfigError, Settings, add_settings_arguments, settings_from_args
from stream_detector.core.alerts import iso_utc
from stream_detector.ingest.control import (
    VERDICTS,
    ControlRecordError,
    Feedback,
    Silence,
    SilenceTable,
    encode_feedback,
    encode_silence,
    encode_silence_deleted,
    parse_time,
)
from stream_detector.ingest.topic_range import duration_ms
from stream_detector.service.control import ControlReader, ensure_control_topic, write_control
from stream_detector.service.kafka_errors import KafkaIOError


def parse_duration(text: str) -> int:
    """`90s`, `30m`, `2h`, `1d`, `1w` as milliseconds (> 0); ConfigError otherwise."""
    ms = duration_ms(text) or 0
    if ms <= 0:
        raise ConfigError(f"--for {text!r} is not a duration such as 90s, 30m, 2h or 1d.")
    return ms


def default_creator() -> str:
    try:
        user = os.environ.get("USER") or getpass.getuser()
    except (OSError, KeyError):  # no USER and no passwd entry (a container)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _describe(s: Silence) -> str:
    return (
        f"silence {s.id}: entities {s.pattern!r} from {iso_utc(s.starts_ms)} to {iso_utc(s.ends_ms)}, "
        f"by {s.created_by or '?'}: {s.reason}"
    )


def add_silence(settings: Settings, args: argparse.Namespace) -> str:
    if args.duration is None or args.reason is None:
        raise ConfigError("a new silence needs --for DURATION and --reason TEXT (with --entities GLOB).")
    length = parse_duration(args.duration)
    now = _now_ms()
    try:
        starts = now if args.starts_at is None else parse_time(args.starts_at)
    except ControlRecordError as e:
        raise ConfigError(f"--starts-at: {e}.") from None
    if starts + length <= now:
        raise ConfigError(f"a silence from {iso_utc(starts)} for {args.duration} has already ended.")
    silence = Silence(
        id=args.id if args.id is not None else uuid.uuid4().hex[:12],
        pattern=args.entities,
        starts_ms=starts,
        ends_ms=starts + length,
        reason=args.reason,
        created_by=args.created_by if args.created_by is not None else default_creator(),
    )
    try:
        record = encode_silence(silence)
    except ControlRecordError as e:
        raise ConfigError(f"the silence is not valid: {e}.") from None
    topic = write_control(settings, [record])
    return f"{_describe(silence)} (written to {topic})"


def delete_silence(settings: Settings, silence_id: str) -> str:
    try:
        record = encode_silence_deleted(silence_id)
    except ControlRecordError as e:
        raise ConfigError(f"--delete: {e}.") from None
    topic = write_control(settings, [record])
    return f"silence {silence_id} deleted (tombstone written to {topic})"


def list_silences(settings: Settings) -> str:
    topic = ensure_control_topic(settings)
    with ControlReader(settings, topic) as reader:
        records, dead = reader.catch_up(idle_timeout_s=settings.kafka.timeout_s)
    table = SilenceTable(records)
    now = _now_ms()
    active, upcoming = table.active(now), table.upcoming(now)
    if dead:
        print(
            f"silence: {len(dead)} malformed record(s) on {topic} ignored (the first: {dead[0].detail})",
            file=sys.stderr,
        )
    lines = [f"{len(active)} active silence(s) on {topic} at {iso_utc(now)}"]
    lines += [f"  {_describe(s)}" for s in active]
    if upcoming:
        lines.append(f"{len(upcoming)} scheduled:")
        lines += [f"  {_describe(s)}" for s in upcoming]
    return "\n".join(lines)


def handle_silence(args: argparse.Namespace) -> int:
    try:
        chosen = (("--entities", args.entities), ("--delete", args.delete), ("--list", args.list or None))
        modes = [flag for flag, v in chosen if v is not None]
        if len(modes) != 1:
            raise ConfigError("give exactly one of --entities GLOB (a new silence), --delete ID or --list.")
        if modes[0] != "--entities":
            extra = [
                f
                for f, v in (("--for", args.duration), ("--reason", args.reason), ("--starts-at", args.starts_at))
                if v is not None
            ]
            if extra:
                raise ConfigError(f"{', '.join(extra)}: only for a new silence (--entities GLOB).")
        settings = settings_from_args(args)
        if args.list:
            print(list_silences(settings))
        elif args.delete is not None:
            print(delete_silence(settings, args.delete))
        else:
            print(add_silence(settings, args))
    except (ConfigError, KafkaIOError) as e:
        print(f"silence: {e}", file=sys.stderr)
        return 2
    return 0


def handle_feedback(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        feedback = Feedback(args.alert_id, args.verdict, args.key, args.comment, _now_ms())
        try:
            record = encode_feedback(feedback)
        except ControlRecordError as e:
            raise ConfigError(f"the feedback is not valid: {e}.") from None
        topic = write_control(settings, [record])
    except (ConfigError, KafkaIOError) as e:
        print(f"feedback: {e}", file=sys.stderr)
        return 2
    on = f" ({feedback.key})" if feedback.key else ""
    print(f"feedback on alert {feedback.alert_id}{on}: {feedback.verdict} (written to {topic})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "silence",
        help="silence alerts of matching entities for a while; --delete, --list (the control topic)",
        description="Write a silence to the control topic ([kafka] control_topic): alerts of the entities matching "
        "--entities (a glob: 'web-*') are silenced from --starts-at (default now) for --for. --delete ID ends one "
        "(a tombstone), --list prints the silences in force and scheduled.",
    )
    p.add_argument("--entities", metavar="GLOB", help="entity keys to silence, an fnmatch glob (web-*, db-[12])")
    p.add_argument("--for", dest="duration", metavar="DURATION", help="how long: 90s, 30m, 2h, 1d, 1w")
    p.add_argument("--starts-at", metavar="ISO", help="ISO-8601 start (no zone = UTC); default now")
    p.add_argument("--reason", metavar="TEXT", help="why (required for a new silence)")
    p.add_argument("--id", metavar="ID", help="the silence's id (default: generated); an existing id is replaced")
    p.add_argument("--created-by", metavar="WHO", help="who silenced (default $USER@host)")
    p.add_argument("--delete", metavar="ID", help="delete the silence with this id")
    p.add_argument("--list", action="store_true", help="print the silences in force and the scheduled ones")
    add_settings_arguments(p)
    p.set_defaults(func=handle_silence)

    f = subparsers.add_parser(
        "feedback",
        help="mark an alert a false or true positive (the control topic)",
        description="Write a verdict on one alert to the control topic ([kafka] control_topic); a later verdict "
        "on the same alert replaces it.",
    )
    f.add_argument("alert_id", metavar="ALERT_ID", help="the alert's alert_id")
    f.add_argument("--verdict", required=True, choices=VERDICTS, help="false_positive or true_positive")
    f.add_argument("--key", metavar="ENTITY", help="the alert's entity key (optional)")
    f.add_argument("--comment", metavar="TEXT", default="", help="free text")
    add_settings_arguments(f)
    f.set_defaults(func=handle_feedback)
