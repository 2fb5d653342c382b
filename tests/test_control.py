"""Silences and feedback on a compacted control topic (issue 20, item 4): the record format
(ingest/control.py) round-trips and refuses every malformed record with a one-line reason, the
silence table matches by glob and time and forgets deleted and ended silences; through the real
broker, `stream-detector silence`/`feedback` write records that `ControlReader` reads back, a
malformed record comes out as a `bad-control-record` dead letter, `--delete` and `--list` work, and
settings or topic problems end in one sentence with exit 2."""

from __future__ import annotations

import time
import uuid

import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, ConfigResource

from stream_detector.cli import main
from stream_detector.config import ConfigError, load_settings
from stream_detector.core.alerts import iso_utc
from stream_detector.ingest.control import (
    SCHEMA,
    ControlRecordError,
    Feedback,
    Silence,
    SilenceDeleted,
    SilenceTable,
    encode_feedback,
    encode_silence,
    encode_silence_deleted,
    parse_control,
    parse_time,
)
from stream_detector.ingest.decode import BAD_CONTROL_RECORD
from stream_detector.service.control import ControlReader, ensure_control_topic
from stream_detector.service.control_cli import parse_duration

T0 = 1_798_761_600_000  # 2027-01-01T00:00Z
HOUR = 3_600_000


def silence(id: str = "s1", pattern: str = "web-*", starts: int = T0, ends: int = T0 + HOUR) -> Silence:
    return Silence(id, pattern, starts, ends, "deploy of web", "alice@ops")


def silence_value(**change: object) -> bytes:
    obj = {
        "schema": SCHEMA,
        "type": "silence",
        "id": "s1",
        "entities": "web-*",
        "starts_at": "2027-01-01T00:00:00Z",
        "ends_at": "2027-01-01T01:00:00Z",
        "reason": "deploy",
        "created_by": "alice@ops",
    }
    obj.update(change)
    return orjson.dumps({k: v for k, v in obj.items() if v is not ...})


def feedback_value(**change: object) -> bytes:
    obj = {
        "schema": SCHEMA,
        "type": "feedback",
        "alert_id": "a1",
        "verdict": "false_positive",
        "key": "web-1",
        "comment": "",
        "at": "2027-01-01T00:00:00Z",
    }
    obj.update(change)
    return orjson.dumps({k: v for k, v in obj.items() if v is not ...})


# ---- the record format -----------------------------------------------------------------------


def test_a_silence_round_trips_through_its_record() -> None:
    s = silence(starts=T0 + 123, ends=T0 + 2 * HOUR + 7)
    key, value = encode_silence(s)
    assert key == b"silence:s1"
    assert orjson.loads(value)["starts_at"] == "2027-01-01T00:00:00.123Z"
    assert parse_control(key, value) == s


@pytest.mark.parametrize("entity", ["web-1", None])
def test_feedback_round_trips_through_its_record(entity: str | None) -> None:
    f = Feedback("a1b2c3", "true_positive", entity, "real outage", T0 + 5)
    key, value = encode_feedback(f)
    assert key == b"feedback:a1b2c3"
    assert parse_control(key, value) == f


def test_a_tombstone_on_a_silence_key_deletes_it() -> None:
    assert parse_control(*encode_silence_deleted("s1")) == SilenceDeleted("s1")


def test_times_without_a_zone_are_utc_and_offsets_are_converted() -> None:
    assert parse_time("2027-01-01T00:00:00") == T0
    assert parse_time("2027-01-01T02:00:00+02:00") == T0
    assert parse_time("2027-01-01T00:00:00.5Z") == T0 + 500
    assert iso_utc(T0) == "2027-01-01T00:00:00.000Z"


def test_feedback_without_key_and_comment_fields_is_accepted() -> None:
    f = parse_control(b"feedback:a1", feedback_value(key=..., comment=...))
    assert f == Feedback("a1", "false_positive", None, "", T0)


MALFORMED = [
    pytest.param(None, silence_value(), "no key", id="no-key"),
    pytest.param(b"\xff\xfe", silence_value(), "not UTF-8", id="key-not-utf8"),
    pytest.param(b"alert:s1", silence_value(), "is not silence:<id> or feedback:<alert_id>", id="unknown-key-kind"),
    pytest.param(b"silence:", silence_value(), "is not silence:<id>", id="empty-id-in-key"),
    pytest.param(b"silence:s1", b"{not json", "not valid JSON", id="not-json"),
    pytest.param(b"silence:s1", b"[1, 2]", "JSON list, not an object", id="not-an-object"),
    pytest.param(b"silence:s1", silence_value(schema="other/2"), "schema 'other/2' is not", id="wrong-schema"),
    pytest.param(b"silence:s1", silence_value(schema=...), "schema None is not", id="no-schema"),
    pytest.param(b"silence:s1", silence_value(type="feedback"), "does not match the silence key", id="wrong-type"),
    pytest.param(b"silence:s1", silence_value(reason=...), "field 'reason' is missing", id="missing-reason"),
    pytest.param(b"silence:s1", silence_value(entities=42), "field 'entities' is a int", id="ill-typed-entities"),
    pytest.param(b"silence:s1", silence_value(entities=""), "field 'entities' is empty", id="empty-pattern"),
    pytest.param(b"silence:s1", silence_value(reason="  "), "'reason' is empty", id="blank-reason"),
    pytest.param(
        b"silence:s1", silence_value(starts_at="yesterday"), "starts_at 'yesterday' is not an ISO", id="bad-time"
    ),
    pytest.param(b"silence:s1", silence_value(ends_at=1798761600), "'ends_at' is a int", id="epoch-number-time"),
    pytest.param(
        b"silence:s1",
        silence_value(ends_at="2027-01-01T00:00:00Z"),
        "ends_at 2027-01-01T00:00:00.000Z is not after",
        id="ends-not-after-starts",
    ),
    pytest.param(b"silence:s2", silence_value(), "silence id 's1' does not match its key silence:s2", id="id-mismatch"),
    pytest.param(b"feedback:a2", feedback_value(), "alert_id 'a1' does not match its key", id="alert-id-mismatch"),
    pytest.param(b"feedback:a1", feedback_value(verdict="maybe"), "verdict 'maybe' is not", id="unknown-verdict"),
    pytest.param(b"feedback:a1", feedback_value(key=7), "'key' is not a non-empty string", id="ill-typed-entity"),
    pytest.param(b"feedback:a1", feedback_value(at=...), "field 'at' is missing", id="feedback-without-time"),
    pytest.param(b"feedback:a1", None, "only a silence can be deleted", id="tombstone-on-feedback"),
]


@pytest.mark.parametrize(("key", "value", "reason"), MALFORMED)
def test_a_malformed_record_is_refused_with_a_one_line_reason(
    key: bytes | None, value: bytes | None, reason: str
) -> None:
    with pytest.raises(ControlRecordError) as e:
        parse_control(key, value)
    assert reason in str(e.value)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)


def test_a_multi_line_value_still_gives_a_one_line_reason() -> None:
    with pytest.raises(ControlRecordError) as e:
        parse_control(b"silence:s1", silence_value(schema="a\nb" * 100))
    assert "\n" not in str(e.value) and len(str(e.value)) < 200


def test_encoding_refuses_what_parsing_would_refuse() -> None:
    with pytest.raises(ControlRecordError, match="'reason' is empty"):
        encode_silence(Silence("s1", "web-*", T0, T0 + HOUR, " ", "me"))
    with pytest.raises(ControlRecordError, match="is not after"):
        encode_silence(silence(ends=T0))
    with pytest.raises(ControlRecordError, match="verdict"):
        encode_feedback(Feedback("a1", "maybe", None, "", T0))  # type: ignore[arg-type]


# ---- the silence table -----------------------------------------------------------------------


def test_a_silence_matches_its_glob_within_its_time_range() -> None:
    s = silence(pattern="web-[12]*")
    assert s.matches("web-1", T0) and s.matches("web-20", T0 + HOUR - 1)
    assert not s.matches("web-3", T0)
    assert not s.matches("WEB-1", T0)  # case-sensitive on every platform
    assert not s.matches("web-1", T0 - 1)  # not started
    assert not s.matches("web-1", T0 + HOUR)  # ended: the end is exclusive


def test_the_table_adds_replaces_deletes_and_expires() -> None:
    table = SilenceTable()
    web, db = silence("s1", "web-*"), silence("s2", "db-*", ends=T0 + 3 * HOUR)
    later = silence("s3", "*", starts=T0 + 10 * HOUR, ends=T0 + 11 * HOUR)
    for r in (web, db, later, Feedback("a1", "false_positive", None, "", T0)):
        table.apply(r)
    assert len(table) == 3  # feedback is not a silence
    assert table.match("web-7", T0 + 1) == web
    assert table.match("db-1", T0 + 2 * HOUR) == db
    assert table.match("cache-1", T0) is None
    assert table.active(T0) == [web, db]
    assert table.upcoming(T0) == [later]
    assert table.match("cache-1", T0 + 10 * HOUR) == later

    shorter = silence("s1", "web-*", ends=T0 + 60_000)  # the same id again: replaced, ends early
    table.apply(shorter)
    assert table.get("s1") == shorter
    assert table.match("web-7", T0 + 120_000) is None

    table.apply(SilenceDeleted("s2"))
    table.apply(SilenceDeleted("never-there"))
    assert table.match("db-1", T0) is None and table.get("s2") is None

    assert table.expire(T0 + 60_000) == 1  # s1 ended; s3 is still ahead
    assert [s.id for s in table.active(T0 + 10 * HOUR)] == ["s3"] and len(table) == 1


def test_the_first_matching_silence_in_force_wins() -> None:
    a, b = silence("a", "web-*"), silence("b", "*", starts=T0 - HOUR)
    table = SilenceTable([b, a])
    assert table.match("web-1", T0) == b
    assert table.match("web-1", T0 + HOUR) is None


@pytest.mark.parametrize(
    ("text", "ms"), [("90s", 90_000), ("30m", 1_800_000), ("2h", 7_200_000), ("1d", 86_400_000), ("1.5h", 5_400_000)]
)
def test_durations(text: str, ms: int) -> None:
    assert parse_duration(text) == ms


@pytest.mark.parametrize("text", ["2", "2x", "0m", "-1h", ""])
def test_bad_durations_are_one_sentence(text: str) -> None:
    with pytest.raises(ConfigError, match="is not a duration such as 90s, 30m, 2h or 1d"):
        parse_duration(text)


# ---- the CLI without a broker ----------------------------------------------------------------


def one_sentence(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_without_a_control_topic_every_subcommand_exits_2_with_one_sentence(capsys: pytest.CaptureFixture) -> None:
    for argv in (
        ["silence", "--entities", "web-*", "--for", "2h", "--reason", "r"],
        ["silence", "--list"],
        ["feedback", "a1", "--verdict", "true_positive"],
    ):
        assert main(["--log-level", "WARNING", *argv, "--kafka.bootstrap-servers", "127.0.0.1:1"]) == 2
        line = one_sentence(capsys.readouterr().err)
        assert "[kafka] control_topic" in line and "--kafka.control-topic" in line


def test_an_unreachable_broker_is_one_sentence_and_exit_2(capsys: pytest.CaptureFixture) -> None:
    flags = ["--kafka.bootstrap-servers", "127.0.0.1:1", "--kafka.control-topic", "ctl", "--kafka.timeout-s", "1"]
    assert (
        main(["--log-level", "WARNING", "silence", "--entities", "web-*", "--for", "2h", "--reason", "r", *flags]) == 2
    )
    assert "cannot reach the Kafka broker at 127.0.0.1:1" in one_sentence(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["silence", "--entities", "web-*", "--for", "2h"], "needs --for DURATION and --reason TEXT"),
        (["silence", "--entities", "web-*", "--for", "soon", "--reason", "r"], "is not a duration"),
        (["silence", "--entities", "w", "--for", "1h", "--reason", "r", "--starts-at", "now"], "--starts-at"),
        (["silence", "--entities", "w", "--for", "1h", "--reason", "r", "--starts-at", "2020-01-01"], "already ended"),
        (["silence", "--list", "--delete", "s1"], "exactly one of"),
        (["silence"], "exactly one of"),
        (["silence", "--delete", "s1", "--for", "1h"], "--for: only for a new silence"),
    ],
)
def test_bad_arguments_exit_2_before_any_broker_call(argv: list[str], says: str, capsys: pytest.CaptureFixture) -> None:
    flags = ["--kafka.bootstrap-servers", "127.0.0.1:1", "--kafka.control-topic", "ctl", "--kafka.timeout-s", "1"]
    assert main(["--log-level", "WARNING", *argv, *flags]) == 2
    line = one_sentence(capsys.readouterr().err)
    assert says in line and "cannot reach" not in line


# ---- through the broker ----------------------------------------------------------------------


def flags(bootstrap: str, topic: str) -> list[str]:
    return ["--kafka.bootstrap-servers", bootstrap, "--kafka.control-topic", topic, "--kafka.group-id", "ctl-test"]


def settings_for(bootstrap: str, topic: str):
    return load_settings(
        None, {"kafka": {"bootstrap_servers": bootstrap, "control_topic": topic, "group_id": "ctl-test"}}
    )


def cli(*argv: str) -> int:
    return main(["--log-level", "WARNING", *argv])


def read_all(bootstrap: str, topic: str) -> tuple[list, list]:
    with ControlReader(settings_for(bootstrap, topic)) as reader:
        records, dead = reader.catch_up(idle_timeout_s=10)
        assert reader.caught_up
    return records, dead


@pytest.fixture
def fresh_topic(kafka_bootstrap: str):
    """A topic name nobody made yet (ensure_control_topic makes it); deleted afterwards."""
    name = f"ctl-{uuid.uuid4().hex[:12]}"
    yield name
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for f in admin.delete_topics([name], operation_timeout=30).values():
        try:
            f.result(timeout=30)
        except Exception:
            pass


@pytest.mark.kafka
def test_silence_and_feedback_are_written_and_read_back(
    kafka_bootstrap: str, fresh_topic: str, capsys: pytest.CaptureFixture
) -> None:
    f = flags(kafka_bootstrap, fresh_topic)
    start = "2099-01-01T00:00:00Z"
    assert (
        cli(
            "silence",
            "--entities",
            "web-*",
            "--for",
            "2h",
            "--starts-at",
            start,
            "--reason",
            "deploy",
            "--id",
            "deploy-1",
            "--created-by",
            "alice@ops",
            *f,
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "deploy-1" in out and "2099-01-01T00:00:00.000Z" in out and "2099-01-01T02:00:00.000Z" in out
    assert cli("silence", "--entities", "db-*", "--for", "30m", "--reason", "maintenance", *f) == 0
    generated = capsys.readouterr().out.split()[1].rstrip(":")
    assert (
        cli("feedback", "alert-9", "--verdict", "false_positive", "--key", "web-3", "--comment", "batch job", *f) == 0
    )
    assert "alert-9" in capsys.readouterr().out

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    res = ConfigResource(ConfigResource.Type.TOPIC, fresh_topic)
    assert admin.describe_configs([res])[res].result(timeout=10)["cleanup.policy"].value == "compact"
    assert len(admin.list_topics(fresh_topic, timeout=10).topics[fresh_topic].partitions) == 1

    records, dead = read_all(kafka_bootstrap, fresh_topic)
    assert dead == []
    first, second, verdict = records
    assert first == Silence("deploy-1", "web-*", parse_time(start), parse_time(start) + 2 * HOUR, "deploy", "alice@ops")
    assert isinstance(second, Silence) and second.id == generated and second.pattern == "db-*"
    assert second.ends_ms - second.starts_ms == 1_800_000 and second.created_by.count("@") == 1
    assert isinstance(verdict, Feedback)
    assert (verdict.alert_id, verdict.verdict, verdict.key, verdict.comment) == (
        "alert-9",
        "false_positive",
        "web-3",
        "batch job",
    )


@pytest.mark.kafka
def test_a_malformed_record_is_a_dead_letter_and_the_rest_is_read(kafka_bootstrap: str, make_topic) -> None:
    topic = make_topic(config={"cleanup.policy": "compact"}, prefix="ctl")
    p = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    p.produce(topic, key=b"silence:bad", value=b"{oops")
    p.produce(topic, key=b"feedback:a1", value=None)
    key, value = encode_silence(silence("good"))
    p.produce(topic, key=key, value=value)
    assert p.flush(10) == 0
    records, dead = read_all(kafka_bootstrap, topic)
    assert records == [silence("good")]
    assert [d.reason for d in dead] == [BAD_CONTROL_RECORD, BAD_CONTROL_RECORD]
    assert "not valid JSON" in dead[0].detail and "only a silence can be deleted" in dead[1].detail
    assert dead[0].message.key() == b"silence:bad" and dead[0].message.offset() == 0
    assert all("\n" not in d.detail for d in dead)


@pytest.mark.kafka
def test_delete_takes_the_silence_out_of_a_running_reader(
    kafka_bootstrap: str, make_topic, capsys: pytest.CaptureFixture
) -> None:
    topic = make_topic(config={"cleanup.policy": "compact"}, prefix="ctl")
    f = flags(kafka_bootstrap, topic)
    assert cli("silence", "--entities", "web-*", "--for", "1h", "--reason", "r", "--id", "s1", *f) == 0
    table = SilenceTable()
    with ControlReader(settings_for(kafka_bootstrap, topic)) as reader:
        assert not reader.caught_up
        records, _ = reader.catch_up(idle_timeout_s=10)
        for r in records:
            table.apply(r)
        now = time.time_ns() // 1_000_000
        assert table.match("web-1", now) is not None

        assert cli("silence", "--delete", "s1", *f) == 0  # written while the reader runs
        assert "deleted" in capsys.readouterr().out
        got: list = []
        for _ in range(50):
            records, dead = reader.poll(timeout=0.2)
            assert dead == []
            got += records
            if got:
                break
        assert got == [SilenceDeleted("s1")]
        for r in got:
            table.apply(r)
        assert table.match("web-1", now) is None and len(table) == 0
    records, _ = read_all(kafka_bootstrap, topic)  # a reader started now sees the tombstone too
    assert SilenceTable(records).get("s1") is None


@pytest.mark.kafka
def test_list_prints_the_silences_in_force_and_scheduled(
    kafka_bootstrap: str, make_topic, capsys: pytest.CaptureFixture
) -> None:
    topic = make_topic(config={"cleanup.policy": "compact"}, prefix="ctl")
    f = flags(kafka_bootstrap, topic)
    assert cli("silence", "--list", *f) == 0
    assert capsys.readouterr().out.startswith(f"0 active silence(s) on {topic}")
    assert cli("silence", "--entities", "web-*", "--for", "1h", "--reason", "deploy", "--id", "now-1", *f) == 0
    assert cli("silence", "--entities", "db-*", "--for", "1h", "--reason", "gone", "--id", "gone-1", *f) == 0
    assert (
        cli(
            "silence",
            "--entities",
            "cache-*",
            "--for",
            "1d",
            "--reason",
            "later",
            "--id",
            "later-1",
            "--starts-at",
            "2099-06-01T00:00:00Z",
            *f,
        )
        == 0
    )
    assert cli("silence", "--delete", "gone-1", *f) == 0
    capsys.readouterr()
    assert cli("silence", "--list", *f) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"1 active silence(s) on {topic}")
    assert "now-1" in out and "'web-*'" in out and "deploy" in out
    assert "1 scheduled:" in out and "later-1" in out and "2099-06-01T00:00:00.000Z" in out
    assert "gone-1" not in out


@pytest.mark.kafka
def test_a_topic_without_compaction_is_refused_in_one_sentence(
    kafka_bootstrap: str, make_topic, capsys: pytest.CaptureFixture
) -> None:
    topic = make_topic(config={"cleanup.policy": "delete"}, prefix="ctl")
    with pytest.raises(ConfigError) as e:
        ensure_control_topic(settings_for(kafka_bootstrap, topic))
    assert f"the control topic {topic} has cleanup.policy=delete" in str(e.value) and "compact" in str(e.value)
    assert cli("feedback", "a1", "--verdict", "true_positive", *flags(kafka_bootstrap, topic)) == 2
    assert "cleanup.policy=delete" in one_sentence(capsys.readouterr().err)


@pytest.mark.kafka
def test_ensure_makes_the_topic_once_and_accepts_it_after(kafka_bootstrap: str, fresh_topic: str) -> None:
    settings = settings_for(kafka_bootstrap, fresh_topic)
    assert ensure_control_topic(settings) == fresh_topic
    assert ensure_control_topic(settings) == fresh_topic  # exists now: checked, not made again
    with ControlReader(settings) as reader:  # an empty topic: caught up at once
        assert reader.caught_up
        assert reader.poll() == ([], [])
