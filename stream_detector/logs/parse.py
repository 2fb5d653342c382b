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
- `logfmt`         `key=value` pairs (values bare or double-quoted with backslash escapes), as
                   written by logrus, go-kit, slog's TextHandler: `message_field` (default `msg`),
                   `timestamp_field` (default `time`), `level_field`, `component_field`.
- `access-log`     Apache/Nginx access log, combined or common format:
                   `HOST IDENT USER [10/Oct/2000:13:55:36 -0700] "GET /a HTTP/1.0" 200 2326 ["REFERER" "AGENT"]`;
                   the message is the status class as a word and the request line
                   (`server-error GET /a HTTP/1.0`; templates treat numbers as variables, so the class is
                   what tells a 500 from a 200), the level follows the status (5xx ERROR, 4xx WARN,
                   else INFO); groups `client`, `user`, `method`, `path`, `status` can name the entity
                   (`entity="field"`).
- `python`         Python logging's `%(asctime)s - %(name)s - %(levelname)s - %(message)s` (the layout of
                   the logging HOWTO; basicConfig's own default `LEVEL:name:message` carries no time).
- `log4j`          Java log4j2 / logback pattern `%d{yyyy-MM-dd HH:mm:ss.SSS} [%t] %-5level %logger - %msg`
                   (`.` or `,` before the milliseconds, `T` or a space after the date).
- `regex`          `line_regex` with a `message` group and optionally `timestamp`, `level`,
                   `component` (and any other named groups, e.g. one that names the entity);
                   `timestamp_format` tells how to read `timestamp`.

Timestamps without a zone are read as UTC. A line whose format carries no timestamp (or a JSON
line without `timestamp_field`) gets `timestamp_ms=None`: the caller then uses the transport's time
(the Kafka message timestamp), as DESIGN.md contract 2 says.

Entities (`entity`): `regex` (every distinct match of `entity_regex` in the message; a line naming
several entities counts for each), `field` (`entity_field`: a named group of the line regex, e.g. the
node of a BlueGene/L line or `client` of an access log, or a field of a JSON / logfmt line; dotted
paths reach into JSON objects), `json-field` (the older name of `field`, for JSON and logfmt lines
only), `kafka-key` (the message key passed to `parse`). A line naming no entity is an error unless
`default_entity` is set.

Settings that cannot work are refused with one `LogConfigError` sentence: by `make_config` (a
setting that does not apply to the format, a missing companion setting) or by `LineParser` (a regex
that does not compile or lacks its `message` group, an entity group the regex does not have, a
timestamp format that is no format). `check_first_lines` reads the first lines of a file as training
would and names the first line whose timestamp does not read as its format.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

LOG_PARSER_VERSION = 1  # bump when the same config would parse lines differently

LogFormat = Literal[
    "hdfs", "syslog-rfc3164", "syslog-rfc5424", "jsonl", "logfmt", "access-log", "python", "log4j", "regex"
]
EntityRule = Literal["regex", "field", "json-field", "kafka-key"]
FIELD_FORMATS = ("jsonl", "logfmt")  # formats whose lines are fields by name, not a regex
TIMESTAMP_KEYWORDS = ("iso8601", "epoch_s", "epoch_ms", "rfc3164")

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
    "access-log": (
        r"(?P<client>\S+) (?P<ident>\S+) (?P<user>\S+) \[(?P<timestamp>[^\]]+)\] "
        r'"(?P<request>(?P<method>[A-Z]+) (?P<path>\S+)(?: (?P<protocol>[^"]*))?|[^"]*)" (?P<status>\d{3}) '
        r'(?P<size>\d+|-)(?: "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)")?(?: .*)?'
    ),
    "python": (
        r"(?P<timestamp>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - (?P<component>\S+) - (?P<level>[A-Z]+) - "
        r"(?P<message>.*)"
    ),
    "log4j": (
        r"(?P<timestamp>\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[.,]\d{1,9})?) +\[(?P<thread>[^\]]*)\] +"
        r"(?P<level>[A-Z]+) +(?P<component>\S+) +- (?P<message>.*)"
    ),
}
PRESET_TIMESTAMP_FORMAT: dict[str, str] = {
    "hdfs": "%y%m%d %H%M%S",
    "syslog-rfc3164": "rfc3164",
    "syslog-rfc5424": "iso8601",
    "access-log": "%d/%b/%Y:%H:%M:%S %z",
    "python": "%Y-%m-%d %H:%M:%S,%f",
    "log4j": "iso8601",
}
# access-log: the status class leads the message, as a word (drain3 treats tokens with digits as variables)
_STATUS_CLASS = {"1": "informational", "2": "success", "3": "redirect", "4": "client-error", "5": "server-error"}
# Field formats: defaults that differ from jsonl's (a field set explicitly, None included, wins).
FORMAT_FIELD_DEFAULTS: dict[str, dict[str, str]] = {"logfmt": {"message_field": "msg", "timestamp_field": "time"}}
# Settings that hold a name or a pattern: an empty string means "none" (a TOML file cannot write null).
_EMPTY_IS_NONE = (
    "line_regex",
    "timestamp_format",
    "timestamp_field",
    "level_field",
    "component_field",
    "entity_field",
    "default_entity",
)
SYSLOG_SEVERITY = ("EMERG", "ALERT", "CRIT", "ERR", "WARNING", "NOTICE", "INFO", "DEBUG")
_MONTHS = {
    m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)
}
_TIMESTAMP_CACHE_SIZE = 65536  # many lines share a second; parsing a timestamp once per second is enough


class LogConfigError(Exception):
    """A parser configuration that cannot work; the message is one sentence for the operator."""


class LogLineError(Exception):
    """A line that cannot be parsed; the message is one sentence (the dead-letter reason)."""


class LogTimestampError(LogLineError):
    """A line whose timestamp does not read as the configured format."""


class LogParserConfig(BaseModel):
    """How to read log lines. Frozen and JSON-serialisable: it travels in the model bundle."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: LogFormat = "hdfs"
    line_regex: str | None = None  # required for format="regex"; overrides the preset otherwise
    # strptime format, or one of "iso8601", "epoch_s", "epoch_ms", "rfc3164"; None = the preset's
    timestamp_format: str | None = None
    syslog_year: int | None = None  # RFC 3164 lines carry no year; None = the current UTC year
    message_field: str = "message"  # jsonl / logfmt (logfmt's default: msg)
    timestamp_field: str | None = None  # jsonl / logfmt (logfmt's default: time); None = no time in the line
    level_field: str | None = "level"
    component_field: str | None = "logger"
    entity: EntityRule = "regex"
    entity_regex: str = r"blk_-?\d+"  # at most one capturing group; with one, the group is the entity
    entity_field: str | None = None  # entity "field": a named group of the line regex or a field of the line
    default_entity: str | None = None  # entity for lines that name none; None = such a line is an error
    max_line_bytes: int = 65536

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = {k: (None if k in _EMPTY_IS_NONE and v == "" else v) for k, v in data.items()}
        fmt = data.get("format")
        fmt_defaults = FORMAT_FIELD_DEFAULTS.get(fmt, {}) if isinstance(fmt, str) else {}
        return {**fmt_defaults, **data}

    @model_validator(mode="after")
    def _check(self) -> LogParserConfig:
        fmt = self.format
        if fmt == "regex" and not self.line_regex:
            raise ValueError("format 'regex' needs line_regex (a regex with a named group 'message')")
        if fmt in FIELD_FORMATS and self.line_regex:
            raise ValueError(f"line_regex does not apply to format '{fmt}', whose lines are read field by field")
        if fmt not in FIELD_FORMATS and self.timestamp_field:
            raise ValueError(
                f"timestamp_field applies only to formats 'jsonl' and 'logfmt'; format '{fmt}' reads the time "
                "from the line regex's 'timestamp' group"
            )
        if not self.message_field:
            raise ValueError("message_field must not be empty")
        if self.entity == "json-field" and fmt not in FIELD_FORMATS:
            raise ValueError(
                "entity 'json-field' needs format 'jsonl' or 'logfmt' (use entity 'field' for a regex group)"
            )
        if self.entity in ("field", "json-field") and not self.entity_field:
            raise ValueError(f"entity '{self.entity}' needs entity_field (the group or field that names the entity)")
        if self.entity_field and self.entity not in ("field", "json-field"):
            raise ValueError(f"entity_field applies only to entity 'field', not to entity '{self.entity}'")
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
        msg = str(err["msg"]).removeprefix("Value error, ")
        if not err["loc"]:  # a rule across settings: its message says it all
            raise LogConfigError(f"invalid log parser settings: {msg}.") from None
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise LogConfigError(f"unknown log parser setting {where!r}.") from None
        raise LogConfigError(f"invalid log parser setting {where}: {msg} (got {err.get('input')!r}).") from None


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
        fmt = config.format
        self._ts_format = config.timestamp_format or PRESET_TIMESTAMP_FORMAT.get(fmt, "iso8601")
        if config.timestamp_format is not None:
            _check_timestamp_format(config.timestamp_format)
        self._compose = False  # access-log: the message is made of the status class and the request line
        if fmt in FIELD_FORMATS:
            self._line_re = None
            if config.timestamp_format is not None and not config.timestamp_field:
                raise LogConfigError(
                    f"timestamp_format is set but there is no timestamp_field to read it from (format '{fmt}')."
                )
        else:
            pattern = config.line_regex or PRESET_REGEX[fmt]
            self._line_re = _compile(pattern, "line_regex")
            groups = self._line_re.groupindex
            self._compose = fmt == "access-log" and "message" not in groups and {"request", "status"} <= set(groups)
            if "message" not in groups and not self._compose:
                raise LogConfigError("the line regex must have a named group 'message'.")
            if config.timestamp_format is not None and "timestamp" not in groups:
                raise LogConfigError("timestamp_format is set but the line regex has no named group 'timestamp'.")
            if config.entity in ("field", "json-field") and config.entity_field not in groups:
                raise LogConfigError(
                    f"entity_field {config.entity_field!r} is not a named group of the line regex "
                    f"(its groups: {', '.join(groups) or 'none'})."
                )
        self._has_pri = self._line_re is not None and "pri" in self._line_re.groupindex
        self._entity_re = _compile(config.entity_regex, "entity_regex") if config.entity == "regex" else None
        if self._entity_re is not None and self._entity_re.groups > 1:
            raise LogConfigError("entity_regex may have at most one capturing group.")
        self._entity_group = (
            config.entity_field if config.entity in ("field", "json-field") and self._line_re is not None else None
        )
        self._year = config.syslog_year or time.gmtime().tm_year

    @property
    def timestamp_format(self) -> str:
        """How timestamps are read: the configured format, else the format preset's."""
        return self._ts_format

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
        obj: dict[str, Any] | None
        if self._line_re is None:
            obj = _logfmt(line) if cfg.format == "logfmt" else _json_object(line)
            ts, level, component, message = self._fields(obj)
        else:
            m = self._line_re.fullmatch(line)
            if m is None:
                raise LogLineError(f"log line does not match the {cfg.format} line format: {_clip(line)!r}.")
            g = m.groupdict()
            level = g.get("level")
            if level is None and self._has_pri and g.get("pri") is not None:
                level = SYSLOG_SEVERITY[int(g["pri"]) % 8]
            if self._compose:
                status = g["status"] or ""
                message = f"{_STATUS_CLASS.get(status[:1], 'status-' + status[:1])} {g.get('request') or ''}"
                if level is None:
                    level = "ERROR" if status >= "500" else "WARN" if status >= "400" else "INFO"
            else:
                message = g.get("message") or ""
            component = g.get("component")
            raw_ts = g.get("timestamp")
            ts = None if raw_ts is None or raw_ts == "-" else self._timestamp(raw_ts)
            obj = g if self._entity_group is not None else None
        return ParsedLine(ts, level, component, message, self._entities(message, obj, key))

    # -- pieces -----------------------------------------------------------------------------------

    def _fields(self, obj: dict[str, Any]) -> tuple[int | None, str | None, str | None, str]:
        cfg = self.config
        what = "JSON" if cfg.format == "jsonl" else cfg.format
        message = _field(obj, cfg.message_field)
        if not isinstance(message, str):
            raise LogLineError(f"{what} log line has no string field {cfg.message_field!r}.")
        ts = None
        if cfg.timestamp_field:
            raw = _field(obj, cfg.timestamp_field)
            if raw is None:
                raise LogLineError(f"{what} log line has no timestamp field {cfg.timestamp_field!r}.")
            ts = self._timestamp(raw)
        level = _field(obj, cfg.level_field) if cfg.level_field else None
        component = _field(obj, cfg.component_field) if cfg.component_field else None
        return ts, _opt_str(level), _opt_str(component), message

    def _timestamp(self, raw: Any) -> int:
        if isinstance(raw, str):
            hit = self._ts_cache.get(raw)
            if hit is not None:
                return hit
        try:
            ms = _to_epoch_ms(raw, self._ts_format, self._year)
        except (ValueError, TypeError, OverflowError, KeyError):
            raise LogTimestampError(f"timestamp {_clip(str(raw))!r} does not read as {self._ts_format}.") from None
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
        elif cfg.entity in ("field", "json-field"):
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


FIRST_LINES = 20  # lines `check_first_lines` reads by default


def check_first_lines(
    parser: LineParser, lines: Sequence[str | bytes], source: str = "the log", n: int = FIRST_LINES
) -> tuple[int, int]:
    """Read the first `n` lines as training would, before anything costly: LogConfigError (one sentence)
    naming the first line whose timestamp does not read as the configured format, or the first line's
    reason when none of them parses. Lines that fail for another reason (a line that names no entity,
    a stray line) are tolerated here. Returns (lines parsed, lines that carry a timestamp)."""
    parsed = with_time = 0
    first_error: tuple[int, str] | None = None
    head = lines[:n]
    for i, raw in enumerate(head, 1):
        try:
            p = parser.parse(raw)
        except LogTimestampError as e:
            raise LogConfigError(
                f"line {i} of {source}: {str(e).rstrip('.')} (timestamp_format, or the line regex's 'timestamp' "
                "group, does not fit; 'stream-detector-train logformat' shows what each line gives)."
            ) from None
        except LogLineError as e:
            if first_error is None:
                first_error = (i, str(e).rstrip("."))
            continue
        parsed += 1
        with_time += p.timestamp_ms is not None
    if head and parsed == 0 and first_error is not None:
        raise LogConfigError(
            f"none of the first {len(head)} lines of {source} parses with these settings (line {first_error[0]}: "
            f"{first_error[1]}); 'stream-detector-train logformat' shows what each line gives."
        )
    return parsed, with_time


def _entity_rule_words(cfg: LogParserConfig) -> str:
    if cfg.entity == "regex":
        return f"no match of {cfg.entity_regex!r}"
    if cfg.entity in ("field", "json-field"):
        return f"no field {cfg.entity_field!r}"
    return "no message key"


def _compile(pattern: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise LogConfigError(f"{what} {pattern!r} does not compile: {e}.") from None


def _json_object(line: str) -> dict[str, Any]:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise LogLineError(f"log line is not valid JSON: {_clip(line)!r}.") from None
    if not isinstance(obj, dict):
        raise LogLineError("JSON log line is not an object.")
    return obj


# logfmt: key=value, key="quoted \"value\"", or a bare key (a flag, value ""); pairs separated by blanks
_LOGFMT_PAIR = re.compile(r'\s*([^\s="]+)(?:=("(?:[^"\\]|\\.)*"|[^\s"]*))?(?=\s|$)')
_LOGFMT_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


def _logfmt(line: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pos, n = 0, len(line)
    while pos < n:
        m = _LOGFMT_PAIR.match(line, pos)
        if m is None:
            if line[pos:].strip():
                raise LogLineError(f"log line is not logfmt (key=value pairs) at character {pos + 1}: {_clip(line)!r}.")
            break
        key, value = m.group(1), m.group(2)
        if value is None:
            value = ""
        elif value.startswith('"'):
            value = re.sub(r"\\(.)", lambda e: _LOGFMT_ESCAPES.get(e.group(1), e.group(1)), value[1:-1])
        out[key] = value
        pos = m.end()
    if not out:
        raise LogLineError(f"log line is not logfmt (key=value pairs): {_clip(line)!r}.")
    return out


def _check_timestamp_format(fmt: str) -> None:
    if fmt not in TIMESTAMP_KEYWORDS and "%" not in fmt:
        raise LogConfigError(
            f"timestamp_format {fmt!r} is neither a strptime format (with % directives) nor one of "
            f"{', '.join(TIMESTAMP_KEYWORDS)}."
        )


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
