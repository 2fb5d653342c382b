"""Static membership without a broker: which member id the settings give the consumer, the refusals
in one sentence, the recognition of a fenced member, and `leave-group` with nothing to do."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from confluent_kafka import KafkaError

from stream_detector.config import ConfigError, load_settings
from stream_detector.ingest.kafka_config import check_client_configs, client_config
from stream_detector.service.kafka_errors import MemberFenced, fenced, is_fenced


def _settings(**processing):
    return load_settings(None, {"kafka": {"group_id": "g"}, "processing": processing})


@pytest.mark.parametrize("processing, instance", [
    ({}, None),  # the host name is not known to be stable (containers): dynamic membership
    ({"instance_id": "detector-1"}, "detector-1"),  # a stable id set on purpose: static
    ({"instance_id": "detector-1", "static_membership": "off"}, None),  # the opt-out
    ({"static_membership": "on"}, socket.gethostname()),  # the host name, on the operator's word
])
def test_group_instance_id_comes_from_the_instance_id(processing, instance):
    s = _settings(**processing)
    conf = client_config(s, "consumer")
    assert conf.get("group.instance.id") == instance
    assert "group.instance.id" not in client_config(s, "restorer"), "the changelog reader never joins the group"
    # one id, one meaning: the transactional id is named by the same member id either way
    assert s.processing.transactional_id_for("g") == f"g-{processing.get('instance_id') or socket.gethostname()}"


def test_the_consumer_reports_statistics_for_readiness_and_the_restorer_does_not():
    s = _settings()
    assert client_config(s, "consumer")["statistics.interval.ms"] == 1000
    assert "statistics.interval.ms" not in client_config(s, "restorer")


def test_a_group_instance_id_of_its_own_is_refused_in_one_sentence():
    s = load_settings(None, {"kafka": {"consumer": {"group.instance.id": "x"}}})
    with pytest.raises(ConfigError, match=r"^kafka\.consumer sets 'group\.instance\.id', but the service derives it from processing\.instance_id .*\.$"):
        check_client_configs(s)


def test_an_instance_id_the_broker_would_refuse_is_a_config_error_unless_static_membership_is_off():
    with pytest.raises(ConfigError, match=r"^configuration section 'processing': the instance id 'node 1/a' cannot name a static group member"):
        _settings(instance_id="node 1/a")
    assert _settings(instance_id="node 1/a", static_membership="off").processing.group_instance_id() is None
    with pytest.raises(ConfigError, match="processing.static_membership"):
        _settings(static_membership="sometimes")


def test_fenced_errors_are_recognised_and_said_in_one_sentence():
    consumer_fenced = KafkaError(KafkaError._FATAL, "Fatal error: Broker: Static consumer fenced by other consumer with same group.instance.id: x")
    assert is_fenced(consumer_fenced)
    assert is_fenced(KafkaError(KafkaError._FENCED, "Local: This instance has been fenced by a newer instance", fatal=True))
    assert is_fenced(KafkaError(KafkaError.FENCED_INSTANCE_ID))
    assert not is_fenced(KafkaError(KafkaError._FATAL, "Fatal error: Broker: Invalid transaction state"))
    assert not is_fenced(KafkaError(KafkaError._TRANSPORT))
    e = fenced(_settings(instance_id="d1"), "the group membership", consumer_fenced)
    assert isinstance(e, MemberFenced)
    text = str(e)
    assert text.startswith("the group membership was fenced by another process running with this member's instance id 'd1' in group 'g'")
    assert text.endswith("give every running process its own processing.instance_id.") and ". " not in text


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stream_detector.cli", *args], capture_output=True, text=True, timeout=60)


def test_leave_group_without_static_membership_has_nothing_to_do_and_bad_settings_exit_2():
    r = _cli("leave-group", "--kafka.bootstrap-servers", "127.0.0.1:1")  # no broker is asked
    assert r.returncode == 0 and "a dynamic member leaves group 'stream-detector' by itself when it stops" in r.stdout
    r = _cli("leave-group", "--processing.instance-id", "a b")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "cannot name a static group member" in r.stderr


def test_leave_group_says_in_one_sentence_that_the_broker_cannot_be_reached():
    r = _cli("--log-level", "CRITICAL", "leave-group", "--kafka.bootstrap-servers", "127.0.0.1:1", "--kafka.timeout-s", "1",
             "--processing.instance-id", "d1")
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("leave-group: cannot describe group 'stream-detector' on 127.0.0.1:1"), r.stderr


def test_leave_group_refuses_a_group_instance_id_of_its_own_in_one_sentence():
    r = _cli("leave-group", "--processing.instance-id", "d1", "--kafka.consumer", "group.instance.id=x")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "derives it from processing.instance_id" in r.stderr
