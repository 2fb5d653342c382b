"""Settings: TOML < env < flags, frozen, unknown keys and wrong types refused with one sentence,
secrets masked, every key in --help with its env var, and CLI exit code 2 on bad config."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from pydantic import ValidationError

from stream_detector.config import ConfigError, Settings, add_settings_arguments, load_settings, settings_from_args
from stream_detector.ingest.kafka_config import consumer_config

TOML = """
[kafka]
group_id = "from-file"
topics = ["a", "b"]
client = { "security.protocol" = "SASL_SSL", "sasl.password" = "hunter2" }

[runtime]
max_batch = 10
max_wait_ms = 35
"""


@pytest.fixture
def toml_file(tmp_path, monkeypatch):
    for name in [n for n in __import__("os").environ if n.startswith("SD_")]:
        monkeypatch.delenv(name)
    path = tmp_path / "sd.toml"
    path.write_text(TOML)
    return path


def test_precedence_file_env_flags(toml_file, monkeypatch):
    monkeypatch.setenv("SD_RUNTIME__MAX_BATCH", "30")
    monkeypatch.setenv("SD_KAFKA__GROUP_ID", "from-env")
    s = load_settings(toml_file, {"kafka": {"group_id": "from-flag"}})
    assert s.kafka.group_id == "from-flag"  # flag beats env beats file
    assert s.runtime.max_batch == 30  # env beats file
    assert s.runtime.max_wait_ms == 35  # file beats default
    assert s.kafka.topics == ["a", "b"]
    assert s.runtime.commit_interval_s == 5.0  # default
    assert s.kafka.client["security.protocol"] == "SASL_SSL"  # passed through unchanged
    assert consumer_config(s)["sasl.password"] == "hunter2"
    with pytest.raises(ValidationError):
        s.kafka.group_id = "x"  # frozen


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"runtime": {"nope": 1}}, "unknown configuration key 'runtime.nope'"),
        ({"typo": {}}, "unknown configuration key 'typo'"),
        ({"runtime": {"max_batch": "many"}}, "'runtime.max_batch'"),
        ({"runtime": {"max_batch": 0}}, "greater than or equal to 1"),
        ({"model": {"provider": "tpu"}}, "'model.provider'"),
    ],
)
def test_bad_values_are_one_sentence(toml_file, overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_settings(toml_file, overrides)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg and msg.endswith(".")


def test_bad_env_and_files(toml_file, tmp_path, monkeypatch):
    monkeypatch.setenv("SD_KAFKA__BOGUS", "1")
    with pytest.raises(ConfigError, match="kafka.bogus"):
        load_settings(toml_file)
    monkeypatch.delenv("SD_KAFKA__BOGUS")
    bad = tmp_path / "bad.toml"
    bad.write_text("[kafka\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_detection_section_builds_core_settings(toml_file):
    core = load_settings(toml_file, {"detection": {"hop": "16", "threshold": "spot", "idle_timeout_ms": "0"}}).detection.to_core()
    assert core.hop == 16 and core.threshold.method == "spot" and core.idle_timeout_ms is None
    with pytest.raises(ConfigError, match=r"\[detection\]"):
        load_settings(toml_file, {"detection": {"history": 5, "warmup": 50}}).detection.to_core()


def test_secrets_are_redacted(toml_file):
    red = load_settings(toml_file).redacted()
    assert red["kafka"]["client"] == {"security.protocol": "SASL_SSL", "sasl.password": "***"}
    assert "hunter2" not in str(red)


def test_flags_cover_every_key_and_parse(toml_file):
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    for section, sfield in Settings.model_fields.items():
        for key in sfield.annotation.model_fields:
            assert f"--{section}.{key.replace('_', '-')}" in help_text
            assert f"SD_{section.upper()}__{key.upper()}" in help_text
    args = parser.parse_args(["--config", str(toml_file), "--kafka.topics", "x,y", "--kafka.client", "acks=all", "--model.require-cuda", "true"])
    s = settings_from_args(args)
    assert s.kafka.topics == ["x", "y"] and s.model.require_cuda is True
    # client tables merge key by key across sources: the flag adds to the file's settings
    assert s.kafka.client == {"security.protocol": "SASL_SSL", "sasl.password": "hunter2", "acks": "all"} and s.model.require_cuda is True
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        settings_from_args(parser.parse_args(["--kafka.client", "novalue"]))


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[runtime]\nmax_batch = -1\n")
    for command in ("check", "run"):
        r = subprocess.run([sys.executable, "-m", "stream_detector.cli", command, "--config", str(cfg)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2
        assert "runtime.max_batch" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
