"""Log line → (timestamp, level, component, message, entities): the first step of the log path.

A `LineParser` is built once from a `LogParserConfig` and then parses one raw line (str or the
bytes of a Kafka message value) at a time. Presets cover common formats; `format="regex"` takes a
user regex with named groups. What comes out is a `ParsedLine`; a line that cannot be parsed raises
`LogLineError` whose message is one sentence meant for the dead-letter reason header.

Formats (`LogParserConfig.format`):
- `hdfs`           Loghub layout `<Date> <Time> <Pid> <Level> <Component>: <Content>`,
                   e.g. `081109 203530 147 INFO dfs.DataNode$DataXceiver: Receiving block ...`
- `syslog-rfc3164` `<PRI>Mmm dd hh:mm:ss HOST TAG[PID]: MSG` (PRI optional, as in files written
                   by rsyslog); the year is not in the line: `syslog_year` or the current UTC year.
- `syslog-rfc5424` `<PRI>1 TIMESTAMP HOST APP PROCID MSGID [SD]|- MSG`
- `jsonl`          one JSON object per line; `message_field`, optional `timestamp_field`,
                   `level_field`, `component_field` (dotted paths reach into nested objects).
- `regex`          `line_regex` with a `message` group and optionally `timestamp`, `level`,
                   `component`; `timestamp_format` tells how to read `timestamp`.

Timestamps without a zone are read as UTC. A line whose format carries no timestamp (or a JSON
line without `timestamp_field`) gets `timestamp_ms=None`: the caller then uses the transport's time
(the Kafka message timestamp), as DESIGN.md contract 2 says.

Entities (`entity`): `regex` (every distinct match of `entity_regex` in the message; a line naming
several entities counts for each), `json-field` (a field of a JSON line), `kafka-key` (the message
key passed to `parse`). A line naming no entity is an error unless `default_entity` is set.
"""

from __future__ import annotations

import calendar
import re
import time
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

LOG_PARSER_VERSION = 1  # bump when the same config would parse lines differently

LogFormat = Literal["hdfs", "syslog-rfc3164", "syslog-rfc5424", "jsonl", "regex"]
EntityRule = Literal["regex", "json-field", "kafka-key"]

# Regex presets. Named groups: timestamp, level, component, message (+ pri for syslog).
PRESET_REGEX: dict[str, str] = {
    "hdfs": r"(?P<timestamp>\d{6} \d{6}) (?P<pid>\d+) (?P<level>[A-Z]+) (?P<component>[^:\s]+): (?P<message>.*)",
    "syslog-rfc3164": (
        r"(?:<(?P<pri>\d{1,3})>)?(?P<timestamp>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) (?P<host>\S+) "
        r"(?P<component>[^\s:\[]+)(?:\[(?P<pid>[^\]]*)\])?: ?(?P<message>.*)"
    ),
    "syslog-rfc5424": (
        r"<(?P<pri>\d{1,3})>1 (?P<timestamp>\S+) (?P<host>\S+) (?P<component>\S+) (?P<pid>\S+) (?P<msgid>\S+) "
        r"(?P<sd>-|(?:\[(?:[^\]\\]|\\.)*\])+)(?: (?P<message>.*))?"
    ),
}
PRESET_TIMESTAMP_FORMAT: dict[str, str] = {
    "hdfs": "%y%m%d %H%M%S",
    "syslog-rfc3164": "rfc3164",
    "syslog-rfc5424": "iso8601",
}
SYSLOG_SEVERITY = ("EMERG", "ALERT", "CRIT", "ERR", "WARNING", "NOTICE", "INFO", "DEBUG")
_MONTHS = {
    m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)
}
_TIMESTAMP_CACHE_SIZE = 65536  # many lines share a second; parsing a timestamp once per second is enough


class LogConfigError(Exception):
    """A parser configuration that cannot work; the message is one sentence for the operator."""


class LogLineError(Exception):
    """A line that cannot be parsed; the message is one sentence (the dead-letter reason)."""


class LogParserConfig(BaseModel):
    """How to read log lines. Frozen and JSON-serialisable: it travels in the model bundle."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: LogFormat = "hdfs"
    line_regex: str | None = None  # required for format="regex"; overrides the preset otherwise
    # strptime format, or one of "iso8601", "epoch_s", "epoch_ms", "rfc3164"; None = the preset's
    timestamp_format: str | None = None
    syslog_year: int | None = None  # RFC 3164 lines carry no year; None = the current UTC year
    message_field: str = "message"
    timestamp_field: str | None = None
    level_field: str | None = "level"
    component_field: str | None = "logger"
    entity: EntityRule = "regex"
    entity_regex: str = r"blk_-?\d+"  # at most one capturing group; with one, the group is the entity
    entity_field: str | None = None
    default_entity: str | None = None  # entity for lines that name none; None = such a line is an error
    max_line_bytes: int = 65536

    @model_validator(mode="after")
    def _check(self) -> LogParserConfig:
        if self.format == "regex" and not self.line_regex:
            raise ValueError("format 'regex' needs line_regex")
        if self.entity == "json-field":
            if self.format != "jsonl":
                raise ValueError("entity 'json-field' needs format 'jsonl'")
            if not self.entity_field:
                raise ValueError("entity 'json-field' needs entity_field")
        if self.max_line_bytes < 16:
            raise ValueError("max_line_bytes must be at least 16")
        return self

    def to_json(self) -> dict[str, Any]:
        return {"version": LOG_PARSER_VERSION, **self.model_dump()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LogParserConfig:
        d = dict(d)
        version = d.pop("version", None)
        if version != LOG_PARSER_VERSION:
            raise LogConfigError(
                f"the log parser configuration has version {version!r}; this stream-detector reads version "
                f"{LOG_PARSER_VERSION}."
            )
        return make_config(**d)


def make_config(**fields: Any) -> LogParserConfig:
    """LogParserConfig(**fields), with validation errors turned into one LogConfigError sentence."""
    try:
        return LogParserConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "log parser configuration"
        raise LogConfigError(f"invalid log parser setting {where}: {err['msg']}.") from None


class ParsedLine(NamedTuple):
    timestamp_ms: int | None  # None: the line carries no time, use the transport's
    level: str | None
    component: str | None
    message: str
    entities: tuple[str, ...]  # distinct, in order of first appearance; never empty


class LineParser:
    """Parses raw log lines according to one LogParserConfig. Not thread-safe (timestamp cache)."""

    def __init__(self, config: LogParserConfig):
        self.config = config
        self._ts_cache: dict[str, int] = {}
        if config.format == "jsonl":
            self._line_re = None
        else:
            pattern = config.line_regex or PRESET_REGEX[config.format]
            self._line_re = _compile(pattern, "line_regex")
            if "message" not in self._line_re.groupindex:
                raise LogConfigError("the line regex must have a named group 'message'.")
        self._has_pri = self._line_re is not None and "pri" in self._line_re.groupindex
        self._ts_format = config.timestamp_format or PRESET_TIMESTAMP_FORMAT.get(config.format, "iso8601")
        self._entity_re = _compile(config.entity_regex, "entity_regex") if config.entity == "regex" else None
        if self._entity_re is not None and self._entity_re.groups > 1:
            raise LogConfigError("entity_regex may have at most one capturing group.")
        self._year = config.syslog_year or time.gmtime().tm_year

    def parse(self, line: str | bytes, key: str | bytes | None = None) -> ParsedLine:
        """Parse one line; `key` is the Kafka message key (used by entity='kafka-key')."""
        cfg = self.config
        if isinstance(line, (bytes, bytearray, memoryview)):
            if len(line) > cfg.max_line_bytes:
                raise LogLineError(f"log line of {len(line)} bytes exceeds max_line_bytes {cfg.max_line_bytes}.")
            try:
                line = bytes(line).decode("utf-8")
            except UnicodeDecodeError:
                raise LogLineError("log line is not valid UTF-8.") from None
        elif len(line) > cfg.max_line_bytes:
            raise LogLineError(f"log line of {len(line)} characters exceeds max_line_bytes {cfg.max_line_bytes}.")
        line = line.rstrip("\r\n")
        if not line.strip():
            raise LogLineError("log line is empty.")
        if self._line_re is None:
            ts, level, component, message, obj = self._parse_json(line)
        else:
            m = self._line_re.fullmatch(line)
            if m is None:
                raise LogLineError(f"log line does not match the {cfg.format} line format: {_clip(line)!r}.")
            g = m.groupdict()
            message = g.get("message") or ""
            level = g.get("level")
            if level is None and self._has_pri and g.get("pri") is not None:
                level = SYSLOG_SEVERITY[int(g["pri"]) % 8]
            component = g.get("component")
            raw_ts = g.get("timestamp")
            ts = None if raw_ts is None or raw_ts == "-" else self._timestamp(raw_ts)
            obj = None
        return ParsedLine(ts, level, component, message, self._entities(message, obj, key))

    # -- pieces -----------------------------------------------------------------------------------

    def _parse_json(self, line: str) -> tuple[int | None, str | None, str | None, str, dict[str, Any]]:
        cfg = self.config
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise LogLineError(f"log line is not valid JSON: {_clip(line)!r}.") from None
        if not isinstance(obj, dict):
            raise LogLineError("JSON log line is not an object.")
        message = _field(obj, cfg.message_field)
        if not isinstance(message, str):
            raise LogLineError(f"JSON log line has no string field {cfg.message_field!r}.")
        ts = None
        if cfg.timestamp_field:
            raw = _field(obj, cfg.timestamp_field)
            if raw is None:
                raise LogLineError(f"JSON log line has no timestamp field {cfg.timestamp_field!r}.")
            ts = self._timestamp(raw)
        level = _field(obj, cfg.level_field) if cfg.level_field else None
        component = _field(obj, cfg.component_field) if cfg.component_field else None
        return ts, _opt_str(level), _opt_str(component), message, obj

    def _timestamp(self, raw: Any) -> int:
        if isinstance(raw, str):
            hit = self._ts_cache.get(raw)
            if hit is not None:
                return hit
        try:
            ms = _to_epoch_ms(raw, self._ts_format, self._year)
        except (ValueError, TypeError, OverflowError, KeyError):
            raise LogLineError(f"timestamp {_clip(str(raw))!r} does not read as {self._ts_format}.") from None
        if isinstance(raw, str):
            if len(self._ts_cache) >= _TIMESTAMP_CACHE_SIZE:
                self._ts_cache.clear()
            self._ts_cache[raw] = ms
        return ms

    def _entities(self, message: str, obj: dict[str, Any] | None, key: str | bytes | None) -> tuple[str, ...]:
        cfg = self.config
        if self._entity_re is not None:
            found = self._entity_re.findall(message)
            entities = tuple(dict.fromkeys(found)) if len(found) > 1 else tuple(found)
        elif cfg.entity == "json-field":
            value = _field(obj or {}, cfg.entity_field or "")
            entities = (
                (str(value),) if isinstance(value, (str, int)) and not isinstance(value, bool) and value != "" else ()
            )
        else:  # kafka-key
            if isinstance(key, (bytes, bytearray)):
                try:
                    key = bytes(key).decode("utf-8")
                except UnicodeDecodeError:
                    raise LogLineError("the message key is not valid UTF-8.") from None
            entities = (key,) if key else ()
        if not entities:
            if cfg.default_entity is not None:
                return (cfg.default_entity,)
            raise LogLineError(f"log line names no entity ({_entity_rule_words(cfg)}): {_clip(message)!r}.")
        return entities


def _entity_rule_words(cfg: LogParserConfig) -> str:
    if cfg.entity == "regex":
        return f"no match of {cfg.entity_regex!r}"
    if cfg.entity == "json-field":
        return f"no field {cfg.entity_field!r}"
    return "no message key"


def _compile(pattern: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise LogConfigError(f"{what} {pattern!r} does not compile: {e}.") from None


def _field(obj: dict[str, Any], path: str) -> Any:
    if path in obj:
        return obj[path]
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def _clip(s: str, n: int = 120) -> str:
    return s if len(s) <= n else s[:n] + "…"


def _to_epoch_ms(raw: Any, fmt: str, year: int) -> int:
    if fmt in ("epoch_s", "epoch_ms"):
        if isinstance(raw, bool):
            raise TypeError("boolean timestamp")
        v = float(raw)
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError("non-finite timestamp")
        return int(round(v * 1000)) if fmt == "epoch_s" else int(v)
    if not isinstance(raw, str):
        raise TypeError("timestamp is not a string")
    if fmt == "iso8601":
        dt = datetime.fromisoformat(raw)
    elif fmt == "rfc3164":  # "Nov  9 20:35:30"
        mon, day, hms = raw.split()
        h, mi, s = (int(x) for x in hms.split(":"))
        return calendar.timegm((year, _MONTHS[mon], int(day), h, mi, s, 0, 0, 0)) * 1000
    else:
        dt = datetime.strptime(raw, fmt)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(round(dt.timestamp() * 1000))
