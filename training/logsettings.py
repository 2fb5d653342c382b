"""The settings of `stream-detector-train fit --format log`: `LogFitSettings` (every option, the
log parser's fields included), and how the command line and the same flat TOML as `fit` become
them, each mistake one sentence (`LogTrainingError`). The training itself is training/logs.py."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stream_detector.logs.parse import LogParserConfig, make_config


class LogTrainingError(Exception):
    """Log training cannot run; one sentence."""


class LogFitSettings(BaseModel):
    """Every option of `fit --format log`. The TOML keys (`--config`) are these names; each flag is the
    name with '-' for '_' (except --session-timeout, --idle-check, --bucket; see LOG_FLAGS). The parser
    settings (PARSER_SETTINGS) are `LogParserConfig`'s fields, `format` named `log_format`; None = the
    parser's default for the format."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: Path = Field(description="log file of normal operation")
    out: Path = Field(description="bundle directory to write")
    labels: Path | None = Field(
        None,
        description="label file (entity,label; anomalous entities are left out) or a list of normal entities, "
        "one per line",
    )
    # -- how lines are read (LogParserConfig; stored in the bundle, so run and replay read lines the same way)
    log_format: str = Field(
        "hdfs",
        description="line format: hdfs, syslog-rfc3164, syslog-rfc5424, jsonl, logfmt, access-log, python, log4j, "
        "or regex (with line_regex)",
    )
    line_regex: str | None = Field(
        None,
        description="regex for a whole line, with a named group 'message' and optionally 'timestamp', 'level', "
        "'component' and others (e.g. one naming the entity); required by --log-format regex",
    )
    timestamp_format: str | None = Field(
        None,
        description="how to read the timestamp: a strptime format (e.g. %%Y-%%m-%%d-%%H.%%M.%%S.%%f), iso8601, "
        "epoch_s, epoch_ms or rfc3164; default: the format's own",
    )
    syslog_year: int | None = Field(None, description="year of syslog-rfc3164 lines, which carry none")
    message_field: str | None = Field(
        None, description="jsonl/logfmt: the message field (default message; logfmt: msg)"
    )
    timestamp_field: str | None = Field(
        None, description="jsonl/logfmt: the timestamp field (default: none; logfmt: time)"
    )
    level_field: str | None = Field(None, description="jsonl/logfmt: the level field (default level; '' for none)")
    component_field: str | None = Field(
        None, description="jsonl/logfmt: the component field (default logger; '' for none)"
    )
    entity: str | None = Field(
        None,
        description="what names a line's entity: regex (entity_regex in the message; default), field (the group "
        "or field entity_field), json-field, kafka-key",
    )
    entity_regex: str | None = Field(
        None, description=r"with entity regex: regex naming the entity in a message (default blk_-?\d+)"
    )
    entity_field: str | None = Field(
        None, description="with entity field: the named group of the line regex, or the JSON/logfmt field"
    )
    default_entity: str | None = Field(
        None, description="entity of lines that name none (default: such a line is refused)"
    )
    max_line_bytes: int | None = Field(None, description="longest line accepted (default 65536)")
    # -- model
    log_model: Literal["counts", "sequence"] = Field(
        "counts",
        description="counts (template-count vectors, PCA per row kind) or sequence (causal Transformer over "
        "template ids)",
    )
    session_timeout_s: float | None = Field(
        None,
        gt=0,
        description="seconds of inactivity that end an entity's session (default 86400 for counts, 3600 for sequence)",
    )
    bucket_s: float | None = Field(
        None,
        gt=0,
        description="counts: count each entity's lines per time bucket of this many seconds instead of over its "
        "whole session, and judge every line against its bucket so far (logs whose incidents are single lines of "
        "long-lived entities, e.g. nodes; docs/logs.md)",
    )
    idle_check_s: float | None = Field(
        600.0,
        gt=0,
        description="counts: seconds of inactivity after which an entity's counts at rest are judged (with "
        "bucket_s: off unless given)",
    )
    count_variance: float = Field(0.99, gt=0, le=1, description="counts: variance kept by the principal subspace")
    count_scale_floor: float = Field(0.2, gt=0, description="counts: floor of a feature's std of log1p(count)")
    count_min_scale: float = Field(
        1.0, gt=0, description="counts: smallest calibration scale (residual sum of squares scoring 1.0)"
    )
    count_threshold_floor: float = Field(
        0.5,
        ge=0,
        description="counts: a score below this never alerts (when the held-out entities all score ~0, as on very "
        "regular data)",
    )
    context: int = Field(32, ge=2, description="sequence: tokens the model sees")
    d_model: int = Field(64, ge=4, description="sequence: Transformer width")
    n_heads: int = Field(4, ge=1, description="sequence: attention heads")
    n_layers: int = Field(2, ge=1, description="sequence: layers")
    ff_dim: int = Field(128, ge=4, description="sequence: feed-forward width")
    dropout: float = Field(0.1, ge=0, lt=1, description="sequence: dropout")
    epochs: int = Field(20, ge=1, description="sequence: maximum epochs")
    patience: int = Field(3, ge=1, description="sequence: early stopping patience (epochs)")
    batch_size: int = Field(256, ge=1, description="sequence: batch size")
    lr: float = Field(2e-3, gt=0, description="sequence: peak learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="sequence: AdamW weight decay")
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="fraction of entities (those that start last) held out for calibration"
    )
    threshold_quantile: float = Field(
        1.0, gt=0, le=1, description="quantile of the held-out entities' largest score used as the threshold"
    )
    threshold_margin: float = Field(1.0, gt=0, description="factor on the calibrated session threshold")
    threshold_floor: float = Field(
        4.6,
        ge=0,
        description="sequence: an event at least this likely (e^-floor; 4.6 nats = 1%%) never alerts, however "
        "regular the training data",
    )
    unknown_template_nats: float = Field(
        30.0, gt=0, description="sequence: score of a line no learned template matches"
    )
    seed: int = Field(0, description="random seed")
    threads: int = Field(0, ge=0, description="CPU threads (0: all cores)")
    opset: int = Field(18, ge=17, description="ONNX opset")
    parity_tolerance: float = Field(1e-3, gt=0, description="largest allowed |ONNX Runtime - reference|")
    model_version: str | None = Field(None, description="model_version in the bundle")


# LogParserConfig field -> LogFitSettings field (= TOML key; flag = key with '-' for '_'). Only `format`
# is renamed: fit's own --format / `format` is the input format, "log" here.
PARSER_SETTINGS: dict[str, str] = {
    name: "log_format" if name == "format" else name for name in LogParserConfig.model_fields
}


def parser_config(s: LogFitSettings) -> LogParserConfig:
    """The parser configuration the settings give (LogConfigError: one sentence)."""
    fields = {p: getattr(s, k) for p, k in PARSER_SETTINGS.items() if getattr(s, k) is not None}
    return make_config(**fields)


_FROM_FIT_FLAGS = (
    "data",
    "out",
    "timestamp_field",
    "d_model",
    "n_heads",
    "n_layers",
    "ff_dim",
    "dropout",
    "epochs",
    "patience",
    "batch_size",
    "lr",
    "weight_decay",
    "val_fraction",
    "threshold_quantile",
    "seed",
    "threads",
    "opset",
    "parity_tolerance",
    "model_version",
)
# fit's flags a log model does not use (refused when given with --format log); `progress` is harmless
# (kafka_topic, since, until: a log bundle trains from a file of lines; training from a topic is not built for logs)
_NOT_FOR_LOGS = tuple(
    "features key_field nan_policy window gap_factor stride scale_floor scale_floor_range variant mask_steps"
    " detectors grad_clip max_windows_per_epoch device kafka_topic since until".split()
)
# flags whose name is not the field's
LOG_FLAGS = {"session_timeout_s": "--session-timeout", "idle_check_s": "--idle-check", "bucket_s": "--bucket"}


def log_flag(name: str) -> str:
    """The command-line flag of a LogFitSettings field."""
    return LOG_FLAGS.get(name, "--" + name.replace("_", "-"))


def _log_only_fields() -> list[str]:
    return [n for n in LogFitSettings.model_fields if n not in _FROM_FIT_FLAGS]


def add_log_arguments(parser: argparse.ArgumentParser, parser_only: bool = False) -> None:
    """The flags of `fit --format log` that fit does not have already (`parser_only`: the line-reading
    ones alone, with --timestamp-field, for `logformat`). Each one's dest is its LogFitSettings field."""
    title = "how log lines are read" if parser_only else "logs (--format log; config keys as named)"
    g = parser.add_argument_group(title)
    parser_fields = set(PARSER_SETTINGS.values())
    for name, info in LogFitSettings.model_fields.items():
        if parser_only and name not in parser_fields:
            continue
        if name in _FROM_FIT_FLAGS and not (parser_only and name == "timestamp_field"):
            continue
        default = "" if info.default is None else f"; default {info.default}"
        kind: Any = Path if name == "labels" else None
        g.add_argument(
            log_flag(name),
            dest=name,
            default=None,
            type=kind,
            metavar=name.upper(),
            help=f"{info.description} (config key '{name}'{default})",
        )


def log_only_options_given(args: argparse.Namespace) -> list[str]:
    """The log flags given on a command line for another input format."""
    return [log_flag(n) for n in _log_only_fields() if getattr(args, n, None) is not None]


def read_log_toml(path: Path, extra_keys: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A TOML file of `fit --format log` options (flat keys named like LogFitSettings' fields, plus
    `format = "log"`); LogTrainingError (one sentence) for a file that cannot be read or a key that
    is not a log setting. `extra_keys`: further keys tolerated (and returned)."""
    from training.settings import FitSettings, SettingsError, read_toml

    try:
        data = read_toml(path)
    except SettingsError as e:
        raise LogTrainingError(str(e)) from None
    for key, value in data.items():
        if key in LogFitSettings.model_fields or key in extra_keys:
            continue
        if key == "format":
            if value != "log":
                raise LogTrainingError(f"config file {path} has format = {value!r}, but these are log settings.")
            continue
        if key in FitSettings.model_fields:
            raise LogTrainingError(
                f"config file {path} has the key {key!r}, which a log model (format = 'log') does not use."
            )
        raise LogTrainingError(
            f"config file {path} has unknown key {key!r}; 'stream-detector-train fit --help' lists the keys "
            "(group 'logs')."
        )
    data.pop("format", None)
    return data


def log_settings_from_args(args: argparse.Namespace) -> LogFitSettings:
    """Defaults < the TOML file (--config) < the flags given."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        values.update(read_log_toml(args.config))
    refused = [f"--{n.replace('_', '-')}" for n in _NOT_FOR_LOGS if getattr(args, n, None) is not None]
    if refused:
        raise LogTrainingError(f"the option {refused[0]} does not apply to --format log.")
    for name in LogFitSettings.model_fields:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    return make_log_settings(values)


def make_log_settings(values: dict[str, Any]) -> LogFitSettings:
    for name in ("data", "out"):
        if values.get(name) in (None, ""):
            raise LogTrainingError(f"the option --{name} is required (or '{name}' in the config file).")
    try:
        return LogFitSettings(**values)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err["loc"])) or "settings"
        if err["type"] == "extra_forbidden":
            raise LogTrainingError(f"unknown log setting {where!r}.") from None
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise LogTrainingError(f"setting {where!r}: {msg} (got {err.get('input')!r}).") from None
