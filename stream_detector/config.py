"""`Settings`: the one frozen, typed configuration of the online service.

Sources, lowest to highest priority: defaults < TOML file (`--config F`) < environment variables
(`SD_` prefix, `__` between section and key, e.g. `SD_KAFKA__GROUP_ID`) < command-line flags
(`--kafka.group-id`). Every key is listed, with its env var and default, in the `--help` of the
commands that take a config (`add_settings_arguments`). Any problem (unknown key, wrong type,
unreadable file) is a `ConfigError` with one sentence.

Kafka client settings (`kafka.client`, `kafka.consumer`, `kafka.producer`) are passed to librdkafka
unchanged, security settings included (assembled per client by kafka_config.py); `redacted()` masks
secrets for logs and summaries.
"""

from __future__ import annotations

import argparse
import contextvars
import re
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from stream_detector.core.alerts import AlertParams
from stream_detector.core.pipeline import DetectionSettings
from stream_detector.core.storms import StormParams
from stream_detector.core.thresholds import ThresholdParams

ENV_PREFIX = "SD_"
ENV_DELIMITER = "__"

ClientValue = str | int | float | bool


class ConfigError(Exception):
    """A configuration that cannot be used; the message is one sentence for the operator."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Section):
    bootstrap_servers: str = Field("127.0.0.1:19092", description="Kafka bootstrap servers (host:port,...)")
    group_id: str = Field("stream-detector", description="consumer group; scale out by starting more members")
    topics: list[str] = Field(
        ["observations"], min_length=1, description="input topics (comma-separated on the command line)"
    )
    alerts_topic: str = Field("alerts", min_length=1, description="topic for alert events (contract 3)")
    dlq_topic: str = Field(
        "observations-dlq", min_length=1, description="dead-letter topic for messages that cannot be decoded"
    )
    shadow_alerts_topic: str | None = Field(
        None, description="topic for the shadow model's alerts (model.shadow_bundle); unset = ALERTS_TOPIC.shadow"
    )
    control_topic: str | None = Field(
        None,
        description="compacted topic of silences and feedback (`stream-detector silence`, `feedback`); unset: none",
    )
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="where a group without committed offsets starts"
    )
    client: dict[str, ClientValue] = Field(
        {},
        description=(
            "librdkafka settings for consumer and producer, passed unchanged (security.protocol, sasl.*, ssl.*)"
        ),
    )
    consumer: dict[str, ClientValue] = Field({}, description="extra librdkafka settings for the consumer only")
    producer: dict[str, ClientValue] = Field({}, description="extra librdkafka settings for the producer only")
    timeout_s: float = Field(10.0, gt=0, description="bound on broker metadata requests at start-up and in `check`")
    secret_files: dict[str, Path] = Field(
        {},
        description=(
            "librdkafka settings read from files (e.g. sasl.password from a systemd credential); content minus "
            "trailing newline"
        ),
    )

    @field_validator("secret_files")
    @classmethod
    def _secret_files_readable(cls, v: dict[str, Path]) -> dict[str, Path]:
        for key, path in v.items():
            _read_secret(key, path)  # fail at start-up, not at the first reconnect
        return v

    def shadow_topic(self) -> str:
        """Where the shadow model's alerts go (service/shadow.py; `compare` reads it)."""
        return self.shadow_alerts_topic or f"{self.alerts_topic}.shadow"

    def client_settings(self) -> dict[str, ClientValue]:
        """`client` plus the values of `secret_files` (read now, so a rotated file is picked up on restart)."""
        return {**self.client, **{k: _read_secret(k, p) for k, p in self.secret_files.items()}}


def _read_secret(key: str, path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as e:
        raise ValueError(f"the file {path} for '{key}' cannot be read ({e.strerror})") from None


class InputSettings(_Section):
    key_field: str | None = Field(None, description="JSON field holding the entity key; unset = the Kafka message key")
    timestamp_field: str | None = Field(
        None, description="JSON field holding the event time; unset = the Kafka timestamp"
    )
    timestamp_unit: Literal["ms", "s"] = Field(
        "ms", description="unit of timestamp_field (epoch milliseconds or seconds)"
    )
    max_message_bytes: int = Field(65536, gt=0, description="larger messages go to the dead-letter topic")


class ModelSettings(_Section):
    bundle: Path | None = Field(None, description="model bundle directory (model.onnx + bundle.json)")
    provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="ONNX Runtime provider; auto = CUDA if active, else CPU"
    )
    require_cuda: bool = Field(False, description="refuse to start unless the CUDA provider is really active")
    watch: bool = Field(True, description="hot-reload the bundle when its path changes (SIGHUP always reloads)")
    watch_interval_s: float = Field(2.0, gt=0, description="how often the bundle path is checked for a change")
    shadow_bundle: Path | None = Field(
        None,
        description="a candidate bundle scored on the same events beside the live one, with its own thresholds and "
        "alerts, published to kafka.shadow_alerts_topic only (service/shadow.py)",
    )


_THR = ThresholdParams()
_ALERT = AlertParams()
_STORM = StormParams()


class DetectionSettingsSection(_Section):
    """Flat view of pipeline.DetectionSettings (its defaults); `to_core()` builds the core's object."""

    hop: int = Field(1, ge=1, description="score every hop-th event of each entity (once its window is full)")
    max_entities: int = Field(
        100_000, ge=1, description="tracked (partition, entity) pairs; beyond it the least recently seen are evicted"
    )
    idle_timeout_ms: int = Field(
        24 * 3600 * 1000, ge=0, description="evict entities silent this long in event time (0 = never)"
    )
    restart_after_gap: bool = Field(
        True,
        description="a silence longer than a window in an entity's events (a step over W x its typical step, and "
        "over the bundle's training gap_factor x it) starts its window again, as training never windows across a "
        "gap; thresholds and alerts go on",
    )
    threshold: Literal["auto", "calibrated", "quantile", "spot"] = Field(
        _THR.method,  # type: ignore[arg-type]  # ThresholdParams.method is a plain str, checked against METHODS
        description=(
            "per-entity threshold: 'calibrated' (surprise of each score and run of scores), rolling 'quantile' or "
            "'spot'; 'auto' = calibrated where the bundle's calibration allows it, else quantile"
        ),
    )
    warmup: int = Field(
        _THR.warmup, ge=1, description="normal scores per entity before its own threshold replaces the calibrated one"
    )
    alert_level: float = Field(
        _THR.alert_level,
        gt=0,
        description=(
            "calibrated: alert at this surprise, -log10 of the probability of a normal score (or run) at least this "
            "high"
        ),
    )
    learn_level: float = Field(
        _THR.learn_level, gt=0, description="calibrated: normal scores above this surprise are learned as this value"
    )
    confirm_within: int = Field(
        _THR.confirm_within,
        ge=0,
        description="calibrated: a score past alert_level but not past alert_level + 1 is anomalous only when another "
        "score of the entity passed alert_level within the last N scores (0: every score past alert_level is)",
    )
    relearn_after: int = Field(
        _THR.relearn_after,
        ge=0,
        description="calibrated: normal scores that follow an anomalous one within this many are not learned (0: all "
        "are)",
    )
    learn_tail: Literal["cap", "skip"] = Field(
        _THR.learn_tail,  # type: ignore[arg-type]
        description="calibrated: a normal score above learn_level is learned as that value ('cap') or not at all "
        "('skip')",
    )
    own_tail: bool = Field(
        _THR.own_tail,
        description="calibrated: an entity's bar also follows its own tail (its scores as a power of the calibrated "
        "ones, through its 90th percentile and the median of its last blocks' maxima)",
    )
    single_entity_floor: bool = Field(
        _THR.single_entity_floor,
        description="calibrated, a bundle trained on one entity's history: no bar falls below the calibrated one "
        "(max_shift_down applies to bundles whose calibration pooled several entities)",
    )
    own_tail_lowers: bool = Field(
        _THR.own_tail_lowers,
        description="calibrated, with own_tail: an entity whose tail is lighter than the calibration's gets a lower "
        "bar too, by at most max_shift_down below the one its level asks for",
    )
    rebaseline_per_alert: bool = Field(
        _THR.rebaseline_per_alert,
        description="calibrated: an alert opened while an entity's bar sits at max_shift lets it rise max_shift times "
        "further (a re-baselining step per alert)",
    )
    max_shift: float = Field(
        _THR.max_shift,
        ge=1,
        description="no threshold rises above this x its calibrated starting value without an alert (with "
        "rebaseline_per_alert, max_shift ** (1 + alerts the entity opened at the bound))",
    )
    max_shift_down: float = Field(
        _THR.max_shift_down,
        ge=1,
        description="no threshold falls below 1 / this of its calibrated starting value (1: an entity quieter than "
        "the calibration keeps the calibrated bar)",
    )
    quantile: float = Field(_THR.quantile, gt=0, le=1, description="rolling quantile of recent normal scores")
    history: int = Field(_THR.history, ge=1, description="recent normal scores kept per entity")
    multiplier: float = Field(_THR.multiplier, gt=0, description="rolling-quantile threshold = multiplier x quantile")
    spot_risk: float = Field(_THR.risk, gt=0, lt=1, description="SPOT: probability of exceeding the threshold")
    spot_init_quantile: float = Field(
        _THR.init_quantile, gt=0, lt=1, description="SPOT: level above which scores are peaks"
    )
    spot_max_peaks: int = Field(_THR.max_peaks, ge=2, description="SPOT: peaks kept per entity")
    resolve_after: int = Field(
        _ALERT.resolve_after, ge=1, description="consecutive normal scores that resolve an open alert"
    )
    cooldown: int = Field(
        _ALERT.cooldown, ge=0, description="scored events after a resolve during which nothing new opens"
    )
    resolve_backoff: int = Field(
        _ALERT.resolve_backoff,
        ge=0,
        description="an alert that opens within its entity's resolve period after the previous one resolved doubles "
        "that period, up to this many times (flapping); 0 = never",
    )
    update_every: int = Field(
        _ALERT.update_every, ge=0, description="while open, emit `update` every N anomalous scores (0 = never)"
    )
    update_factor: float = Field(
        _ALERT.update_factor,
        ge=0,
        description="while open, emit `update` when the score grows this many times (0 = never)",
    )
    top_features: int = Field(_ALERT.top_k, ge=1, description="features named in an alert, by error contribution")
    incident_window_s: float = Field(
        _STORM.window_ms / 1000,
        ge=0,
        description="alerts opening within this (event time) of an incident's first alert join it and do not page "
        "(0 = every alert pages)",
    )
    storm_min_entities: int = Field(
        _STORM.min_entities, ge=2, description="entities in an incident from which its alerts say storm: true"
    )
    feedback_headroom: float = Field(
        _ALERT.feedback_headroom,
        ge=1,
        description="a false-positive verdict stops alerts on this entity's scores up to this x that alert's peak",
    )
    feedback_max_factor: float = Field(
        _ALERT.feedback_max_factor,
        ge=1,
        description="... but never on scores above this x the entity's threshold when the verdict came",
    )

    def to_core(self) -> DetectionSettings:
        """The core's settings; ConfigError with one sentence if the combination is unusable."""
        core = DetectionSettings(
            hop=self.hop,
            max_entities=self.max_entities,
            idle_timeout_ms=self.idle_timeout_ms or None,
            restart_after_gap=self.restart_after_gap,
            threshold=ThresholdParams(
                method=self.threshold,
                warmup=self.warmup,
                max_shift=self.max_shift,
                max_shift_down=self.max_shift_down,
                alert_level=self.alert_level,
                learn_level=self.learn_level,
                learn_tail=self.learn_tail,
                own_tail=self.own_tail,
                own_tail_lowers=self.own_tail_lowers,
                single_entity_floor=self.single_entity_floor,
                rebaseline_per_alert=self.rebaseline_per_alert,
                confirm_within=self.confirm_within,
                relearn_after=self.relearn_after,
                quantile=self.quantile,
                history=self.history,
                multiplier=self.multiplier,
                risk=self.spot_risk,
                init_quantile=self.spot_init_quantile,
                max_peaks=self.spot_max_peaks,
            ),
            alerts=AlertParams(
                resolve_after=self.resolve_after,
                cooldown=self.cooldown,
                resolve_backoff=self.resolve_backoff,
                update_every=self.update_every,
                update_factor=self.update_factor,
                top_k=self.top_features,
                feedback_headroom=self.feedback_headroom,
                feedback_max_factor=self.feedback_max_factor,
            ),
            storms=StormParams(window_ms=round(self.incident_window_s * 1000), min_entities=self.storm_min_entities),
        )
        try:
            core.validate()
        except ValueError as e:
            raise ConfigError(f"[detection] {e}") from None
        return core


# The labels that make an incident's Alertmanager identity (service/alertmanager.py); extra_labels may not
# replace them, and Alertmanager 0.25 refuses a label name outside this pattern.
AM_IDENTITY_LABELS = ("alertname", "incident_id", "entity", "model_version", "top_feature", "source_topic")
AM_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class AlertmanagerSettings(_Section):
    """The optional Alertmanager sink (service/alertmanager.py): incidents posted to API v2."""

    urls: list[str] = Field(
        [],
        description="Alertmanager base URLs (http://host:9093), each sent every alert (an HA cluster wants all); "
        "empty = no Alertmanager sink",
    )
    timeout_s: float = Field(5.0, gt=0, description="bound on one HTTP request to an Alertmanager")
    resend_interval_s: float = Field(
        60.0, gt=0, description="open alerts are posted again this often (Alertmanager ends one left unsent)"
    )
    extra_labels: dict[str, str] = Field({}, description="labels added to every alert sent (e.g. team, env)")
    max_pending: int = Field(
        10_000,
        ge=1,
        description="alert events waiting for Alertmanager; beyond it the loop stops consuming until it answers",
    )

    @field_validator("extra_labels")
    @classmethod
    def _label_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not AM_LABEL_NAME.match(name):
                raise ValueError(f"'{name}' is not a valid Alertmanager label name ([a-zA-Z_][a-zA-Z0-9_]*)")
            if name in AM_IDENTITY_LABELS:
                raise ValueError(f"'{name}' is a label the Alertmanager sink sets itself")
        return v

    @field_validator("urls")
    @classmethod
    def _http_urls(cls, v: list[str]) -> list[str]:
        for url in v:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"'{url}' is not an http:// or https:// URL")
        return [u.rstrip("/") for u in v]


class RuntimeSettings(_Section):
    max_batch: int = Field(1024, ge=1, description="most messages per consumed batch")
    max_wait_ms: int = Field(
        20, ge=0, description="longest wait for a batch to fill (a batch closes when full or this old; latency)"
    )
    commit_interval_s: float = Field(5.0, gt=0, description="interval between offset commits")
    shutdown_grace_s: float = Field(10.0, gt=0, description="time allowed on stop to finish, deliver, commit and close")
    max_inflight: int = Field(
        2, ge=1, le=2, description="batches in flight: 2 overlaps inference with decoding the next batch, 1 does not"
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="serve Prometheus metrics on this port (unset = off)"
    )
    stall_exit_s: float = Field(
        90.0,
        ge=0,
        description=(
            "exit 1 (supervisor restarts from committed offsets) when the main loop has not ticked this long; 0 = off"
        ),
    )
    broker_unready_after_s: float = Field(
        30.0,
        ge=0,
        description=(
            "/readyz answers not ready once the broker has been unreachable this long (librdkafka's errors and "
            "statistics, the loop's failed commits); ready again as soon as a connection is up"
        ),
    )


# What the broker accepts as a group.instance.id (Kafka's JoinGroupRequest.validateGroupInstanceId).
_GROUP_INSTANCE_ID = re.compile(r"[A-Za-z0-9._-]{1,249}")


class ProcessingSettings(_Section):
    """Delivery guarantee and the state changelog (docs/reliability.md)."""

    guarantee: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once",
        description=(
            "at_least_once: a crash may repeat alerts (same alert_id); exactly_once: alerts, dead letters, state and "
            "offsets commit in one Kafka transaction"
        ),
    )
    instance_id: str | None = Field(
        None,
        min_length=1,
        description=(
            "stable id of this group member, the same across its restarts and unique per running process: "
            "transactional.id = group_id-instance_id and, with static membership, group.instance.id = instance_id; "
            "unset = the host name"
        ),
    )
    static_membership: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "static group membership (group.instance.id = instance_id): a member restarted within the session "
            "timeout gets its partitions back at once, and a stopped one keeps them until the timeout (or "
            "`stream-detector leave-group`); auto = on when instance_id is set, off when it falls back to the host name"
        ),
    )
    changelog: bool = Field(
        True,
        description=(
            "keep entity state in a compacted changelog topic so it moves with its partition (required by exactly_once)"
        ),
    )
    changelog_topic: str | None = Field(
        None,
        description=(
            "the changelog topic; unset = GROUP_ID-changelog, created (compacted, as many partitions as the input) if "
            "missing"
        ),
    )
    restore_chunk: int = Field(
        2000,
        ge=1,
        description="changelog records restored per loop iteration while newly assigned partitions are paused",
    )
    transaction_timeout_s: float = Field(
        60.0,
        gt=0,
        description=(
            "exactly_once: a dead member's open transaction blocks its partitions this long; must exceed broker "
            "outages to ride them out"
        ),
    )

    @model_validator(mode="after")
    def _exactly_once_needs_changelog(self) -> ProcessingSettings:
        if self.guarantee == "exactly_once" and not self.changelog:
            raise ValueError("exactly_once needs the state changelog (processing.changelog = true)")
        return self

    @model_validator(mode="after")
    def _instance_id_fits_the_broker(self) -> ProcessingSettings:
        gid = self.group_instance_id()
        if gid is not None and not _GROUP_INSTANCE_ID.fullmatch(gid):
            raise ValueError(
                f"the instance id {gid!r} cannot name a static group member (group.instance.id: letters, digits, '.', "
                "'_' and '-', at most 249); change processing.instance_id or set processing.static_membership = off"
            )
        return self

    def changelog_topic_for(self, group_id: str) -> str:
        return self.changelog_topic or f"{group_id}-changelog"

    def member_id(self) -> str:
        """This member's stable id: `instance_id`, or the host name when unset."""
        return self.instance_id or socket.gethostname()

    def transactional_id_for(self, group_id: str) -> str:
        return f"{group_id}-{self.member_id()}"

    def group_instance_id(self) -> str | None:
        """The consumer's `group.instance.id` (static membership), or None for a dynamic member. `auto` takes
        static membership only from an id set on purpose: a host name can change with every container, and a
        static member that never comes back holds its partitions until the session timeout."""
        if self.static_membership == "off" or (self.static_membership == "auto" and self.instance_id is None):
            return None
        return self.member_id()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        frozen=True,
        extra="forbid",
        nested_model_default_partial_update=True,
    )

    kafka: KafkaSettings = KafkaSettings()
    input: InputSettings = InputSettings()
    model: ModelSettings = ModelSettings()
    detection: DetectionSettingsSection = DetectionSettingsSection()
    runtime: RuntimeSettings = RuntimeSettings()
    processing: ProcessingSettings = ProcessingSettings()
    alertmanager: AlertmanagerSettings = AlertmanagerSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags (passed as init kwargs) beat env vars, which beat the TOML file.
        return (init_settings, env_settings, _TomlSource(settings_cls))

    def redacted(self) -> dict[str, Any]:
        """The settings as plain data with secret-looking client values masked (safe to log)."""
        data = self.model_dump(mode="json")
        for name in ("client", "consumer", "producer"):
            data["kafka"][name] = {k: ("***" if _is_secret(k) else v) for k, v in data["kafka"][name].items()}
        return data


_SECRET_MARKERS = ("password", "secret", "token", "key.pem", "private", "sasl.jaas", "credentials")


def _is_secret(client_key: str) -> bool:
    k = client_key.lower()
    return any(m in k for m in _SECRET_MARKERS)


# No default: a shared mutable default would be one dict for every caller; __call__ hands out a fresh one.
_toml_data: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("stream_detector_toml")


class _TomlSource(PydanticBaseSettingsSource):
    """The TOML file's contents, read (and checked) by `load_settings` beforehand."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return _toml_data.get({})


def load_settings(
    config_file: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None
) -> Settings:
    """Build the settings from a TOML file, the environment and `overrides` ({section: {key: value}},
    e.g. parsed flags). Raises ConfigError with one sentence."""
    toml: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            toml = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist.") from None
        except OSError as e:
            raise ConfigError(f"config file {path} cannot be read ({e.strerror}).") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid TOML ({e}).") from None
    token = _toml_data.set(toml)
    # {section: {key: value}}: pydantic validates each table into its section model
    init: dict[str, Any] = dict(overrides or {})
    try:
        return Settings(**init)
    except ValidationError as e:
        raise ConfigError(_one_sentence(e, config_file)) from None
    except SettingsError as e:  # e.g. an env var holding malformed JSON for a list/dict key
        raise ConfigError(
            f"{e} (an {ENV_PREFIX}... environment variable for a list or table key must hold JSON)."
        ) from None
    finally:
        _toml_data.reset(token)


def _one_sentence(e: ValidationError, config_file: str | Path | None) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    where = f" in {config_file}" if config_file else ""
    more = f" (and {e.error_count() - 1} more problem(s))" if e.error_count() > 1 else ""
    if err["type"] == "extra_forbidden":
        return f"unknown configuration key '{loc}'{where} (or env {_env_name(err['loc'])}){more}."
    if err["type"] == "value_error" and len(err["loc"]) <= 1:  # a rule across the keys of a section
        return f"configuration section '{loc}'{where}: {err.get('ctx', {}).get('error', err['msg'])}{more}."
    return f"configuration key '{loc}'{where}: {err['msg']} (got {err.get('input')!r}){more}."


def _env_name(loc: tuple[Any, ...] | list[Any]) -> str:
    return ENV_PREFIX + ENV_DELIMITER.join(str(p).upper() for p in loc)


# ---- command-line flags for every key -------------------------------------------------------


def _leaf_fields() -> list[tuple[str, str, Any]]:
    out = []
    for section, sfield in Settings.model_fields.items():
        model = sfield.annotation  # every field of Settings is a section model
        assert isinstance(model, type) and issubclass(model, BaseModel), section
        for key, field in model.model_fields.items():
            out.append((section, key, field))
    return out


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--config F` and one flag per settings key, each help naming its env var and default."""
    parser.add_argument(
        "--config", metavar="FILE", help="TOML settings file; env vars SD_SECTION__KEY and the flags below override it"
    )
    for section, key, field in _leaf_fields():
        group = _group(parser, section)
        flag = f"--{section}.{key.replace('_', '-')}"
        dest = f"cfg__{section}__{key}"
        env = _env_name((section, key))
        default = field.default
        kind = _kind(field.annotation)
        if kind == "dict":
            help_ = f"{field.description} [KEY=VALUE, repeatable; env {env} as JSON; default {default}]"
            group.add_argument(flag, dest=dest, action="append", metavar="KEY=VALUE", help=help_)
        else:
            metavar = {"list": "A,B", "bool": "true|false"}.get(kind, key.split("_")[-1].upper())
            help_ = f"{field.description} [env {env}; default {_show(default)}]"
            group.add_argument(flag, dest=dest, metavar=metavar, help=help_)


def _group(parser: argparse.ArgumentParser, section: str) -> Any:
    title = f"[{section}] settings"
    for g in parser._action_groups:  # argparse has no public lookup by title
        if g.title == title:
            return g
    return parser.add_argument_group(title)


def _kind(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is dict:
        return "dict"
    if origin is list:
        return "list"
    if annotation is bool:
        return "bool"
    if origin is Union and bool in get_args(annotation):
        return "bool"
    return "scalar"


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "unset" if value is None else str(value)


def overrides_from_args(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The flags the user gave, as {section: {key: value}} for `load_settings`."""
    out: dict[str, dict[str, Any]] = {}
    for section, key, field in _leaf_fields():
        value = getattr(args, f"cfg__{section}__{key}", None)
        if value is None:
            continue
        kind = _kind(field.annotation)
        if kind == "list":
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif kind == "dict":
            pairs = {}
            for item in value:
                k, sep, v = item.partition("=")
                if not sep or not k:
                    raise ConfigError(f"--{section}.{key.replace('_', '-')} expects KEY=VALUE, got {item!r}.")
                pairs[k] = v
            value = pairs
        elif value.lower() in ("none", "unset", "") and field.default is None:
            value = None
        out.setdefault(section, {})[key] = value
    return out


def settings_from_args(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None), overrides_from_args(args))
