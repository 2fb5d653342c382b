"""Log line parsing: presets, custom regex, timestamps, entity rules, and bad lines / bad config."""

from __future__ import annotations

import calendar

import orjson
import pytest

from stream_detector.logs.parse import (
    LineParser,
    LogConfigError,
    LogLineError,
    LogParserConfig,
    make_config,
)

HDFS_LINE = (
    "081109 203530 147 INFO dfs.DataNode$DataXceiver: Receiving block blk_4394112519745907149 "
    "src: /10.250.18.114:43996 dest: /10.250.18.114:50010"
)


def utc_ms(*ymdhms: int) -> int:
    return calendar.timegm((*ymdhms, 0, 0, 0)) * 1000


def test_hdfs_preset_reads_every_field():
    p = LineParser(make_config(format="hdfs"))
    r = p.parse(HDFS_LINE.encode() + b"\n")
    assert r.timestamp_ms == utc_ms(2008, 11, 9, 20, 35, 30)
    assert r.level == "INFO"
    assert r.component == "dfs.DataNode$DataXceiver"
    assert r.message.startswith("Receiving block blk_4394112519745907149 src:")
    assert r.entities == ("blk_4394112519745907149",)


def test_negative_block_id_and_several_entities_count_once_each():
    p = LineParser(make_config())
    line = "081110 101010 19 INFO dfs.FSNamesystem: BLOCK* ask 10.0.0.1:50010 to delete blk_-42 blk_7 blk_-42"
    assert p.parse(line).entities == ("blk_-42", "blk_7")


def test_rfc3164_with_and_without_priority():
    p = LineParser(make_config(format="syslog-rfc3164", syslog_year=2023, entity="regex", entity_regex=r"for (\w+) on"))
    r = p.parse("<34>Oct  1 22:14:15 mymachine su[230]: 'su root' failed for lonvick on /dev/pts/8")
    assert r.timestamp_ms == utc_ms(2023, 10, 1, 22, 14, 15)
    assert r.level == "CRIT"  # 34 % 8 = 2
    assert r.component == "su"
    assert r.entities == ("lonvick",)
    r2 = p.parse("Oct 11 22:14:15 host sshd: session opened for alice on tty1")
    assert r2.level is None and r2.component == "sshd" and r2.entities == ("alice",)


def test_rfc5424_structured_data_nil_and_message():
    p = LineParser(make_config(format="syslog-rfc5424", entity="kafka-key"))
    line = '<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut="3" eventSource="App\\]"] An application event'  # RFC 5424 escapes ] in values
    r = p.parse(line, key=b"host-7")
    assert r.timestamp_ms == utc_ms(2003, 10, 11, 22, 14, 15) + 3
    assert r.level == "NOTICE" and r.component == "evntslog"
    assert r.message == "An application event"
    assert r.entities == ("host-7",)
    r2 = p.parse("<13>1 2003-08-24T05:14:15.000003-07:00 192.0.2.1 myproc 8710 - - %% It's time to make the do-nuts.", key="k")
    assert r2.timestamp_ms == utc_ms(2003, 8, 24, 12, 14, 15)
    assert r2.message == "%% It's time to make the do-nuts."


def test_jsonl_fields_nested_entity_and_epoch_timestamp():
    cfg = make_config(format="jsonl", entity="json-field", entity_field="ctx.session", timestamp_field="ts", timestamp_format="epoch_ms")
    p = LineParser(cfg)
    line = orjson.dumps({"ts": 1700000000123, "message": "user login ok", "level": "INFO", "logger": "auth", "ctx": {"session": 991}})
    r = p.parse(line)
    assert r == (1700000000123, "INFO", "auth", "user login ok", ("991",))


def test_jsonl_without_timestamp_field_leaves_time_to_the_transport():
    p = LineParser(make_config(format="jsonl", entity="regex", entity_regex=r"req-\d+"))
    r = p.parse('{"message": "served req-1 and req-2"}')
    assert r.timestamp_ms is None and r.entities == ("req-1", "req-2")


def test_custom_regex_with_strptime_format():
    cfg = make_config(
        format="regex",
        line_regex=r"\[(?P<timestamp>[^\]]+)\] (?P<level>\w+) (?P<message>.*)",
        timestamp_format="%Y-%m-%d %H:%M:%S",
        entity="regex",
        entity_regex=r"job=(\d+)",
    )
    r = LineParser(cfg).parse("[2024-02-29 23:59:59] ERROR job=17 failed")
    assert r.timestamp_ms == utc_ms(2024, 2, 29, 23, 59, 59)
    assert r.level == "ERROR" and r.entities == ("17",)


def test_default_entity_for_lines_naming_none():
    p = LineParser(make_config(default_entity="_global"))
    assert p.parse("081109 203530 147 INFO dfs.DataBlockScanner: idle").entities == ("_global",)


@pytest.mark.parametrize(
    "cfg, line, key, reason",
    [
        ({}, "not a log line at all", None, "does not match the hdfs line format"),
        ({}, "081109 203530 147 INFO dfs.DataBlockScanner: nothing to see", None, "names no entity"),
        ({}, "089999 203530 147 INFO dfs.X: blk_1", None, "does not read as"),
        ({}, b"081109 203530 147 INFO dfs.X: blk_1 \xff\xfe", None, "not valid UTF-8"),
        ({}, "   \n", None, "empty"),
        ({"max_line_bytes": 32}, "081109 203530 147 INFO dfs.X: blk_1 " + "x" * 40, None, "exceeds max_line_bytes"),
        ({"format": "jsonl"}, "{not json", None, "not valid JSON"),
        ({"format": "jsonl"}, "[1, 2]", None, "not an object"),
        ({"format": "jsonl"}, '{"msg": "x blk_1"}', None, "no string field 'message'"),
        ({"format": "jsonl", "timestamp_field": "ts"}, '{"message": "blk_1"}', None, "no timestamp field"),
        ({"format": "jsonl", "timestamp_field": "ts", "timestamp_format": "epoch_s"}, '{"message": "blk_1", "ts": "soon"}', None, "does not read as epoch_s"),
        ({"format": "syslog-rfc3164", "entity": "kafka-key"}, "Oct 11 22:14:15 host sshd: hi", None, "no message key"),
        ({"format": "jsonl", "entity": "json-field", "entity_field": "id"}, '{"message": "m", "id": ""}', None, "names no entity"),
    ],
)
def test_bad_lines_raise_one_sentence(cfg, line, key, reason):
    with pytest.raises(LogLineError) as e:
        LineParser(make_config(**cfg)).parse(line, key=key)
    msg = str(e.value)
    assert reason in msg and msg.endswith(".") and "\n" not in msg


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"format": "regex"}, "needs line_regex"),
        ({"format": "nginx"}, "format"),
        ({"entity": "json-field", "entity_field": "id"}, "needs format 'jsonl'"),
        ({"format": "jsonl", "entity": "json-field"}, "needs entity_field"),
        ({"unknown_option": 1}, "unknown_option"),
    ],
)
def test_bad_config_is_one_sentence(fields, reason):
    with pytest.raises(LogConfigError) as e:
        make_config(**fields)
    assert reason in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"format": "regex", "line_regex": r"(?P<message>.*"}, "does not compile"),
        ({"format": "regex", "line_regex": r"(?P<msg>.*)"}, "named group 'message'"),
        ({"entity_regex": r"(a)(b)"}, "at most one capturing group"),
    ],
)
def test_config_that_cannot_build_a_parser(fields, reason):
    with pytest.raises(LogConfigError) as e:
        LineParser(make_config(**fields))
    assert reason in str(e.value)


def test_config_round_trips_through_json_and_pins_its_version():
    cfg = make_config(format="jsonl", entity="json-field", entity_field="host", timestamp_field="t")
    d = orjson.loads(orjson.dumps(cfg.to_json()))
    assert LogParserConfig.from_json(d) == cfg
    d["version"] = 999
    with pytest.raises(LogConfigError, match="version 999"):
        LogParserConfig.from_json(d)
    with pytest.raises(Exception):  # frozen
        cfg.format = "hdfs"  # type: ignore[misc]


# ---------------------------------------------------------------- presets beyond HDFS and syslog (issue 23)


def test_logfmt_preset_reads_pairs_quotes_and_escapes():
    p = LineParser(make_config(format="logfmt", entity="field", entity_field="user"))
    line = 'time=2024-01-02T03:04:05.250Z level=warn logger=auth msg="login failed for \\"bob\\"" user=bob attempt=3 tls'
    r = p.parse(line)
    assert r == (utc_ms(2024, 1, 2, 3, 4, 5) + 250, "warn", "auth", 'login failed for "bob"', ("bob",))
    # go-kit style: ts= and no logger; the fields are settings like jsonl's
    q = LineParser(make_config(format="logfmt", timestamp_field="ts", timestamp_format="epoch_ms", component_field="", entity_regex=r"job=(\d+)"))
    assert q.parse("ts=1700000000123 level=info msg=\"done job=7\" caller=main.go:12") == (1700000000123, "info", None, "done job=7", ("7",))


@pytest.mark.parametrize("line, reason", [
    ('time=2024-01-02T03:04:05Z msg="unterminated', "not logfmt"),
    ("just some words", "has no string field 'msg'"),
    ("msg=hi", "no timestamp field 'time'"),
])
def test_logfmt_bad_lines(line, reason):
    with pytest.raises(LogLineError, match=reason):
        LineParser(make_config(format="logfmt", default_entity="x")).parse(line)


def _access_lines():
    """Combined and common log format lines, as Apache's and Nginx's default access logs write them."""
    combined = '{ip} - {user} [{t}] "{method} {path} HTTP/1.1" {status} {size} "https://example.com/start" "Mozilla/5.0 (X11; Linux)"'
    common = '{ip} - {user} [{t}] "{method} {path} HTTP/1.0" {status} {size}'
    return [
        combined.format(ip="10.0.0.7", user="-", t="10/Oct/2000:13:55:36 -0700", method="GET", path="/api/orders/17", status=200, size=2326),
        common.format(ip="192.168.1.20", user="frank", t="11/Oct/2000:01:02:03 +0000", method="POST", path="/login", status=503, size="-"),
        combined.format(ip="10.0.0.8", user="-", t="12/Oct/2000:00:00:00 +0200", method="GET", path="/missing", status=404, size=0),
    ]


def test_access_log_preset_combined_and_common():
    p = LineParser(make_config(format="access-log", entity="field", entity_field="client"))
    a, b, c = (p.parse(x) for x in _access_lines())
    assert a == (utc_ms(2000, 10, 10, 20, 55, 36), "INFO", None, "success GET /api/orders/17 HTTP/1.1", ("10.0.0.7",))
    assert b == (utc_ms(2000, 10, 11, 1, 2, 3), "ERROR", None, "server-error POST /login HTTP/1.0", ("192.168.1.20",))
    assert c.level == "WARN" and c.message == "client-error GET /missing HTTP/1.1" and c.timestamp_ms == utc_ms(2000, 10, 11, 22, 0, 0)
    # the status class is a word: drain3 keeps 2xx, 4xx and 5xx requests apart (it treats tokens with digits as variables)
    from stream_detector.logs.templates import TemplateMiner

    m = TemplateMiner()
    for r in (a, b, c):
        m.learn(r.message)
    assert len(m.freeze().templates()) - 1 == 3
    with pytest.raises(LogLineError, match="does not match the access-log line format"):
        p.parse("10.0.0.7 - - [10/Oct/2000:13:55:36 -0700] GET / 200")


def test_python_preset_reads_lines_written_by_the_logging_module():
    import io
    import logging
    import time

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    handler.formatter.converter = time.gmtime  # UTC, as the parser reads zone-less times
    lg = logging.getLogger("shop.orders")
    lg.propagate, lg.level = False, logging.DEBUG
    lg.addHandler(handler)
    try:
        before = int(time.time() * 1000)
        lg.warning("order %d - payment declined", 17)
        lg.error("worker %s died", "w-3")
    finally:
        lg.removeHandler(handler)
    lines = buf.getvalue().splitlines()
    p = LineParser(make_config(format="python", entity="regex", entity_regex=r"(?:order|worker) (\S+)"))
    r1, r2 = (p.parse(x) for x in lines)
    assert r1.level == "WARNING" and r1.component == "shop.orders" and r1.message == "order 17 - payment declined"
    assert r1.entities == ("17",) and r2.entities == ("w-3",) and r2.level == "ERROR"
    assert before - 1000 <= r1.timestamp_ms <= before + 5000


@pytest.mark.parametrize("stamp, ms", [
    ("2024-03-01 12:00:01.042", utc_ms(2024, 3, 1, 12, 0, 1) + 42),   # log4j2 %d{yyyy-MM-dd HH:mm:ss.SSS}
    ("2024-03-01 12:00:01,042", utc_ms(2024, 3, 1, 12, 0, 1) + 42),   # log4j's %d (ISO8601 with a comma)
    ("2024-03-01T12:00:01.042", utc_ms(2024, 3, 1, 12, 0, 1) + 42),
])
def test_log4j_pattern_layout(stamp, ms):
    # %d [%t] %-5level %logger{36} - %msg: INFO and WARN are padded to five characters
    p = LineParser(make_config(format="log4j", entity="field", entity_field="thread"))
    r = p.parse(f"{stamp} [pool-1-thread-3] {'INFO':<5} c.e.shop.OrderService - order 17 shipped")
    assert r == (ms, "INFO", "c.e.shop.OrderService", "order 17 shipped", ("pool-1-thread-3",))
    assert p.parse(f"{stamp} [main] ERROR c.e.App - boom").level == "ERROR"


# ---------------------------------------------------------------- entity from a regex group; one sentence per mistake

BGL = "1117838570 2005.06.03 R02-M1-N0-C:J12-U11 2005-06-03-15.42.50.675872 R02-M1-N0-C:J12-U11 RAS KERNEL INFO instruction cache parity error corrected"
BGL_REGEX = r"(?P<timestamp>\d+) \S+ (?P<node>\S+) \S+ \S+ (?P<type>\S+) (?P<component>\S+) (?P<level>[A-Z]+) (?P<message>.*)"


def test_bluegene_line_with_a_regex_epoch_seconds_and_the_node_as_entity():
    p = LineParser(make_config(format="regex", line_regex=BGL_REGEX, timestamp_format="epoch_s", entity="field", entity_field="node"))
    assert p.parse(BGL) == (1117838570000, "INFO", "KERNEL", "instruction cache parity error corrected", ("R02-M1-N0-C:J12-U11",))
    # the microsecond local time of the same line, read with a strptime format instead
    q = LineParser(make_config(format="regex", line_regex=r"\d+ \S+ (?P<node>\S+) (?P<timestamp>\S+) .* (?P<message>\S+ \S+)$",
                               timestamp_format="%Y-%m-%d-%H.%M.%S.%f", entity="field", entity_field="node"))
    assert q.parse(BGL).timestamp_ms == utc_ms(2005, 6, 3, 15, 42, 50) + 676


@pytest.mark.parametrize("fields, reason", [
    ({"format": "jsonl", "line_regex": "(?P<message>.*)"}, "line_regex does not apply to format 'jsonl'"),
    ({"format": "regex", "line_regex": "(?P<message>.*)", "timestamp_field": "ts"}, "timestamp_field applies only to formats 'jsonl' and 'logfmt'"),
    ({"entity": "field"}, "entity 'field' needs entity_field"),
    ({"entity_field": "node"}, "entity_field applies only to entity 'field'"),
    ({"format": "jsonl", "message_field": ""}, "message_field must not be empty"),
    ({"format": "regex"}, "format 'regex' needs line_regex"),
])
def test_settings_that_do_not_go_together_are_one_sentence(fields, reason):
    with pytest.raises(LogConfigError) as e:
        make_config(**fields)
    msg = str(e.value)
    assert reason in msg and msg.endswith(".") and "\n" not in msg


@pytest.mark.parametrize("fields, reason", [
    ({"format": "regex", "line_regex": BGL_REGEX, "entity": "field", "entity_field": "host"}, "entity_field 'host' is not a named group"),
    ({"format": "regex", "line_regex": "(?P<message>.*)", "timestamp_format": "epoch_s"}, "no named group 'timestamp'"),
    ({"timestamp_format": "epoch"}, "neither a strptime format"),
    ({"format": "jsonl", "timestamp_format": "epoch_s"}, "there is no timestamp_field"),
])
def test_parser_refuses_settings_that_cannot_read_a_line(fields, reason):
    with pytest.raises(LogConfigError, match=reason):
        LineParser(make_config(**fields))


def test_empty_strings_mean_none_and_logfmt_has_its_own_field_defaults():
    cfg = make_config(format="jsonl", level_field="", component_field="", default_entity="")
    assert (cfg.level_field, cfg.component_field, cfg.default_entity) == (None, None, None)
    lf = make_config(format="logfmt")
    assert (lf.message_field, lf.timestamp_field) == ("msg", "time")
    assert make_config(format="logfmt", timestamp_field="").timestamp_field is None


def test_first_lines_check_names_the_line_whose_timestamp_does_not_read():
    from stream_detector.logs.parse import check_first_lines

    p = LineParser(make_config(format="regex", line_regex=BGL_REGEX, timestamp_format="epoch_s", entity="field", entity_field="node"))
    assert check_first_lines(p, [BGL, "a stray line"], "x.log") == (1, 1)  # a stray line alone is tolerated
    with pytest.raises(LogConfigError, match="none of the first 2 lines of x.log parses .*line 1: log line does not match"):
        check_first_lines(p, ["nope", "nor this"], "x.log")
    # the timestamp group on the wrong column (the local time, not the epoch seconds)
    wrong = BGL_REGEX.replace(r"(?P<timestamp>\d+) \S+ (?P<node>\S+) \S+", r"\d+ \S+ (?P<node>\S+) (?P<timestamp>\S+)")
    q = LineParser(make_config(format="regex", line_regex=wrong, timestamp_format="epoch_s", entity="field", entity_field="node"))
    with pytest.raises(LogConfigError) as e:
        check_first_lines(q, ["a stray line", BGL], "x.log")
    msg = str(e.value)
    assert msg.startswith("line 2 of x.log: timestamp '2005-06-03-15.42.50.675872' does not read as epoch_s")
    assert "\n" not in msg and msg.endswith(".")
