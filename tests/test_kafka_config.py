"""Kafka client configuration in one place (stream_detector/ingest/kafka_config.py): every client
(consumer, producer, admin, changelog restorer) gets `kafka.client` and the secret files; the
consumer-only and producer-only settings reach the clients of their kind, the changelog restorer
included, under the same merge guard; a value the guarantees forbid fails at start-up in one
sentence. No broker needed (the restorer's consumer is built against a stand-in)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from confluent_kafka import KafkaError, KafkaException

from stream_detector.config import ConfigError, load_settings
from stream_detector.ingest.kafka_config import check_client_configs, client_config

ROLES = ("consumer", "producer", "admin", "restorer")


def _settings(tmp_path=None, **kafka):
    return load_settings(None, {"kafka": {"group_id": "g", **kafka}})


def test_every_client_gets_the_common_settings_and_the_secret_files(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    s = _settings(client={"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN"}, secret_files={"sasl.password": str(secret)},
                  bootstrap_servers="broker:9093")
    for role in ROLES:
        conf = client_config(s, role)
        assert conf["bootstrap.servers"] == "broker:9093", role
        assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.password"] == "s3cret", role


def test_a_consumer_only_setting_reaches_the_restorer_and_no_producer():
    s = _settings(consumer={"ssl.ca.location": "/etc/consumer-ca.pem", "fetch.max.bytes": 1_048_576, "client.rack": "r1"},
                  producer={"linger.ms": 50})
    for role in ("consumer", "restorer"):
        conf = client_config(s, role)
        assert conf["ssl.ca.location"] == "/etc/consumer-ca.pem" and conf["fetch.max.bytes"] == 1_048_576 and conf["client.rack"] == "r1", role
        assert "linger.ms" not in conf, role
    assert "ssl.ca.location" not in client_config(s, "producer") and client_config(s, "producer")["linger.ms"] == 50
    assert "ssl.ca.location" not in client_config(s, "admin") and "linger.ms" not in client_config(s, "admin")


def test_the_restorer_keeps_what_it_works_by_and_its_own_defaults():
    plain = client_config(_settings(), "restorer")
    assert plain["group.id"] == "g-restore" and plain["isolation.level"] == "read_committed"
    assert plain["enable.partition.eof"] is True and plain["enable.auto.commit"] is False and plain["enable.auto.offset.store"] is False
    assert plain["queued.max.messages.kbytes"] == 16_384 and plain["fetch.queue.backoff.ms"] == 5
    # at-least-once may read its input read_uncommitted; state is still only restored from committed records
    s = _settings(consumer={"isolation.level": "read_uncommitted", "queued.max.messages.kbytes": 4096, "group.id": "mine"})
    assert client_config(s, "consumer")["isolation.level"] == "read_uncommitted" and client_config(s, "consumer")["group.id"] == "mine"
    r = client_config(s, "restorer")
    assert r["isolation.level"] == "read_committed" and r["group.id"] == "g-restore"
    assert r["queued.max.messages.kbytes"] == 4096, "a user's consumer setting overrides the restorer's default"


@pytest.mark.parametrize("section, key, value, roles", [
    ("consumer", "enable.auto.commit", "true", ("consumer", "restorer")),
    ("consumer", "enable.auto.offset.store", "true", ("consumer", "restorer")),
    ("consumer", "partition.assignment.strategy", "range", ("consumer", "restorer")),
    ("producer", "enable.idempotence", "false", ("producer",)),
])
def test_a_setting_the_guarantees_forbid_is_refused_for_every_client_it_reaches(section, key, value, roles):
    s = _settings(**{section: {key: value}})
    for role in roles:
        with pytest.raises(ConfigError, match=rf"^kafka\.{section} sets '{key}={value}', but the service needs .* for its delivery guarantees\.$"):
            client_config(s, role)
    with pytest.raises(ConfigError):
        check_client_configs(s)
    assert client_config(s, "admin")  # the admin client takes no consumer/producer settings


def test_exactly_once_refuses_a_read_uncommitted_consumer():
    s = load_settings(None, {"kafka": {"consumer": {"isolation.level": "read_uncommitted"}}, "processing": {"guarantee": "exactly_once"}})
    with pytest.raises(ConfigError, match="isolation.level=read_committed"):
        check_client_configs(s)


def test_the_restorers_consumer_is_built_from_the_one_config(monkeypatch):
    import confluent_kafka

    from stream_detector.service.changelog import Restorer

    made = []

    class RecordingConsumer:
        def __init__(self, conf):
            made.append(dict(conf))

    monkeypatch.setattr(confluent_kafka, "Consumer", RecordingConsumer)
    s = _settings(client={"security.protocol": "SSL"}, consumer={"ssl.ca.location": "/etc/consumer-ca.pem"})
    Restorer(s, "g-changelog", 8)
    assert made == [client_config(s, "restorer")]
    assert made[0]["ssl.ca.location"] == "/etc/consumer-ca.pem" and made[0]["security.protocol"] == "SSL"


@pytest.mark.parametrize("command", ["run", "check"])
def test_the_cli_refuses_a_forbidden_setting_in_one_sentence_before_connecting(command, tmp_path):
    r = subprocess.run([sys.executable, "-m", "stream_detector.cli", "--log-level", "WARNING", command, "--kafka.bootstrap-servers", "127.0.0.1:1",
                        "--kafka.consumer", "enable.auto.commit=true", "--model.bundle", str(tmp_path / "no-bundle")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "kafka.consumer sets 'enable.auto.commit=true'" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


# ---- the changelog topic: KafkaError.TOPIC_ALREADY_EXISTS, not a magic number --------------------
class _Future:
    def __init__(self, value=None, error=None):
        self.value, self.error = value, error

    def result(self, timeout=None):
        if self.error is not None:
            raise KafkaException(KafkaError(self.error))
        return self.value


class _Meta:
    def __init__(self, topics):
        self.topics = topics


class _Topic:
    def __init__(self, partitions):
        self.partitions = dict.fromkeys(range(partitions))
        self.error = None


class _Admin:
    """Another member creates the topic between our metadata request and our create request."""

    create_error = KafkaError.TOPIC_ALREADY_EXISTS

    def __init__(self, conf):
        self.conf, self.listed = conf, 0

    def list_topics(self, topic=None, timeout=None):
        self.listed += 1
        return _Meta({} if self.listed == 1 else {"g-changelog": _Topic(3)})

    def create_topics(self, new, operation_timeout=None):
        return {t.topic: _Future(error=self.create_error) for t in new}

    def describe_configs(self, resources):
        class Entry:
            value = "compact"

        return {r: _Future({"cleanup.policy": Entry()}) for r in resources}


def test_a_changelog_topic_created_meanwhile_by_another_member_is_checked_and_used(monkeypatch):
    import confluent_kafka.admin

    from stream_detector.service.changelog import ChangelogError, ensure_changelog_topic

    monkeypatch.setattr(confluent_kafka.admin, "AdminClient", _Admin)
    s = _settings(client={"security.protocol": "SSL"})
    assert ensure_changelog_topic(s, 3) == "g-changelog"
    monkeypatch.setattr(_Admin, "create_error", KafkaError.POLICY_VIOLATION)
    with pytest.raises(ChangelogError, match="does not exist and could not be created"):
        ensure_changelog_topic(s, 3)
