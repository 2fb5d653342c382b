"""Issue 23: every log parser setting reachable from `fit --format log` (flags and the TOML file) and
from the dry run `logformat`; each wrong setting ends in one sentence; the dry run's report."""

from __future__ import annotations

import time

import pytest

from bglsynth import LINE_REGEX, make_bgl
from stream_detector.logs.parse import LogParserConfig
from training.cli import build_parser, main
from training.logsettings import PARSER_SETTINGS, LogTrainingError, log_flag, log_settings_from_args, parser_config

# a value for every LogParserConfig field, with the settings it needs beside it to be valid
FIELD_VALUES: dict[str, tuple[object, dict[str, object]]] = {
    "format": ("logfmt", {}),
    "line_regex": (LINE_REGEX, {"log_format": "regex"}),
    "timestamp_format": ("epoch_s", {"log_format": "regex", "line_regex": LINE_REGEX}),
    "syslog_year": (2005, {"log_format": "syslog-rfc3164"}),
    "message_field": ("text", {"log_format": "jsonl"}),
    "timestamp_field": ("ts", {"log_format": "jsonl"}),
    "level_field": ("severity", {"log_format": "jsonl"}),
    "component_field": ("module", {"log_format": "jsonl"}),
    "entity": ("kafka-key", {}),
    "entity_regex": (r"node-(\d+)", {}),
    "entity_field": ("node", {"log_format": "regex", "line_regex": LINE_REGEX, "entity": "field"}),
    "default_entity": ("_global", {}),
    "max_line_bytes": (4096, {}),
}


def test_the_table_covers_every_parser_field():
    assert set(FIELD_VALUES) == set(LogParserConfig.model_fields) == set(PARSER_SETTINGS)


def _toml_value(v: object) -> str:
    return str(v) if isinstance(v, int) else "'" + str(v) + "'"  # TOML literal strings: no escapes in regexes


@pytest.mark.parametrize("field", sorted(FIELD_VALUES))
def test_every_parser_field_is_reachable_from_the_flags_and_the_toml_file(field, tmp_path):
    value, base = FIELD_VALUES[field]
    settings = {**base, PARSER_SETTINGS[field]: value}
    # flags (fit --format log)
    argv = ["fit", "--format", "log", "--data", "x.log", "--out", "b"]
    for k, v in settings.items():
        argv += [log_flag(k), str(v)]
    cfg = parser_config(log_settings_from_args(build_parser().parse_args(argv)))
    assert getattr(cfg, field) == value
    # the TOML file alone, format = "log" included
    toml = tmp_path / "fit.toml"
    toml.write_text(
        'format = "log"\ndata = "x.log"\nout = "b"\n'
        + "".join(f"{k} = {_toml_value(v)}\n" for k, v in settings.items())
    )
    cfg = parser_config(log_settings_from_args(build_parser().parse_args(["fit", "--config", str(toml)])))
    assert getattr(cfg, field) == value
    # the dry run reads the same flags and the same file
    from training.logformat import parser_settings

    for argv in (
        ["logformat", "--data", "x.log"] + [a for k, v in settings.items() for a in (log_flag(k), str(v))],
        ["logformat", "--config", str(toml)],
    ):
        _, fields = parser_settings(build_parser().parse_args(argv))
        assert LogParserConfig(**fields) == cfg


def test_flags_override_the_toml_file(tmp_path):
    toml = tmp_path / "fit.toml"
    toml.write_text(
        f"format = 'log'\ndata = 'x.log'\nout = 'b'\nlog_format = 'regex'\nline_regex = '{LINE_REGEX}'\ntimestamp_format = 'epoch_ms'\nbucket_s = 300\n"
    )
    s = log_settings_from_args(
        build_parser().parse_args(["fit", "--config", str(toml), "--timestamp-format", "epoch_s", "--out", "c"])
    )
    assert s.timestamp_format == "epoch_s" and str(s.out) == "c" and s.bucket_s == 300.0 and s.line_regex == LINE_REGEX


@pytest.fixture(scope="module")
def bgl_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("bglcli")
    lines, _, _ = make_bgl(0, 8, 0.5)
    path = d / "bgl.log"
    path.write_text("\n".join(lines) + "\n")
    return path


WORKING = [
    "--log-format",
    "regex",
    "--line-regex",
    LINE_REGEX,
    "--timestamp-format",
    "epoch_s",
    "--entity",
    "field",
    "--entity-field",
    "node",
]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--log-format", "regex"], "format 'regex' needs line_regex"),
        (["--log-format", "regex", "--line-regex", "(?P<text>.*)"], "the line regex must have a named group 'message'"),
        (["--log-format", "regex", "--line-regex", "(?P<message>.*"], "does not compile"),
        (["--log-format", "nginx"], "invalid log parser setting format: Input should be"),
        (WORKING[:4] + ["--timestamp-format", "epoch"], "neither a strptime format"),
        (
            [
                a.replace(
                    r"(?P<timestamp>\d+) \d{4}\.\d\d\.\d\d (?P<node>\S+) \S+",
                    r"\d+ \S+ (?P<node>\S+) (?P<timestamp>\S+)",
                )
                for a in WORKING
            ],
            "line 1 of {data}: timestamp '2005-06-03-",
        ),
        (WORKING[:6] + ["--entity", "field"], "entity 'field' needs entity_field"),
        (
            WORKING[:6] + ["--entity", "field", "--entity-field", "host"],
            "entity_field 'host' is not a named group of the line regex",
        ),
        (WORKING[:6] + ["--entity", "node"], "invalid log parser setting entity"),
        (WORKING[:6] + ["--entity-field", "node"], "entity_field applies only to entity 'field'"),
        (WORKING + ["--timestamp-field", "ts"], "timestamp_field applies only to formats 'jsonl' and 'logfmt'"),
        (
            [
                "--log-format",
                "regex",
                "--line-regex",
                r"\S+ \S+ (?P<node>\S+) .* (?P<message>\S+)",
                "--entity",
                "field",
                "--entity-field",
                "node",
            ],
            "carry no timestamp",
        ),
        (WORKING + ["--syslog-year", "soon"], "setting 'syslog_year': Input should be a valid integer"),
        (WORKING + ["--max-line-bytes", "8"], "max_line_bytes must be at least 16"),
        (WORKING + ["--bucket", "0"], "setting 'bucket_s'"),
        (
            WORKING + ["--bucket", "60", "--log-model", "sequence"],
            "bucket_s (--bucket) applies only to log_model 'counts'",
        ),
        (WORKING + ["--window", "8"], "the option --window does not apply to --format log"),
    ],
)
def test_each_wrong_setting_is_one_sentence(bgl_file, tmp_path, capsys, args, message):
    rc = main(["fit", "--format", "log", "--data", str(bgl_file), "--out", str(tmp_path / "b"), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert message.replace("{data}", str(bgl_file)) in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and err.rstrip().endswith(".")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "toml, message",
    [
        ("format = 'log'\ndata = '{data}'\nout = '{out}'\nline_regx = 'x'\n", "has unknown key 'line_regx'"),
        (
            "format = 'log'\ndata = '{data}'\nout = '{out}'\nwindow = 8\n",
            "has the key 'window', which a log model (format = 'log') does not use",
        ),
        (
            "data = '{data}'\nout = '{out}'\nline_regex = 'x'\n",
            "has the log setting 'line_regex', but no format = 'log'",
        ),
        ("format = 'log'\ndata = '{data}'\nout = '{out}'\nlog_format = 'regex'\n", "format 'regex' needs line_regex"),
        ("format = 'log'\ndata = '{data}'\nline_regex = \n", "is not valid TOML"),
        ("format = 'log'\ndata = '{data}'\n", "the option --out is required (or 'out' in the config file)"),
    ],
)
def test_each_wrong_toml_setting_is_one_sentence(bgl_file, tmp_path, capsys, toml, message):
    path = tmp_path / "fit.toml"
    path.write_text(toml.format(data=bgl_file, out=tmp_path / "b"))
    rc = main(["fit", "--config", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_log_flags_without_format_log_are_refused(capsys):
    assert main(["fit", "--data", "x.csv", "--out", "b", "--bucket", "60"]) == 2
    assert "the option --bucket applies only to --format log." in capsys.readouterr().err


# ---------------------------------------------------------------- the dry run


def test_dry_run_prints_each_field_and_the_unparsed_lines(bgl_file, tmp_path, capsys):
    lines = bgl_file.read_text().splitlines()[:40]
    lines[3] = "not a BlueGene/L line"
    lines[10] = lines[10].replace(lines[10].split()[0], "soon", 1)  # matches no \d+ timestamp: does not parse
    f = tmp_path / "some.log"
    f.write_text("\n".join(lines) + "\n")
    rc = main(["logformat", "--data", str(f), "--lines", "30", "--show", "2", *WORKING])
    out = capsys.readouterr().out
    assert rc == 0
    first = lines[0].split()
    assert f"line 1: {lines[0]}" in out
    assert f"  entity     {first[2]}" in out and f"  level      {first[7]}" in out and f"  component  {first[6]}" in out
    assert f"  message    {' '.join(first[8:])}" in out and "  template   " in out
    assert (
        f"  timestamp  {time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(int(first[0])))}.000Z ({first[0]}000 ms)" in out
    )
    assert "line 3:" not in out  # --show 2
    assert "28 of 30 lines parse; 2 do not" in out
    assert (
        "  line 4: log line does not match the regex line format: 'not a BlueGene/L line'." in out
        and "  line 11: " in out
    )
    summary = out[out.index("per field") :]
    for name in ("timestamp", "entity", "level", "component", "message", "template"):
        assert f"\n  {name:<10} " in summary
    assert "  timestamp  28 of 28 lines" in summary and "  entity     28 of 28 lines, " in summary


def test_dry_run_exit_status_and_the_fit_toml(bgl_file, tmp_path, capsys):
    toml = tmp_path / "fit.toml"
    toml.write_text(
        f"format = 'log'\ndata = '{bgl_file}'\nout = 'b'\nepochs = 3\nbucket_s = 600\nlog_format = 'regex'\n"
        f"line_regex = '{LINE_REGEX}'\ntimestamp_format = 'epoch_s'\nentity = 'field'\nentity_field = 'node'\n"
    )
    assert main(["logformat", "--config", str(toml), "--lines", "20", "--show", "0"]) == 0  # fit's keys are fine here
    assert "20 of 20 lines parse; 0 do not" in capsys.readouterr().out
    assert main(["logformat", "--data", str(bgl_file), "--lines", "5"]) == 1  # the default hdfs format: nothing parses
    assert "0 of 5 lines parse; 5 do not" in capsys.readouterr().out
    assert main(["logformat", "--data", str(bgl_file), "--log-format", "regex"]) == 2
    err = capsys.readouterr().err
    assert "format 'regex' needs line_regex" in err and err.count("\n") == 1
    assert main(["logformat"]) == 2 and "--data is required" in capsys.readouterr().err


def test_settings_errors_are_log_training_errors():
    with pytest.raises(LogTrainingError, match="the option --data is required"):
        log_settings_from_args(build_parser().parse_args(["fit", "--format", "log", "--out", "b"]))
