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
