"""`FitSettings`: every option of `stream-detector-train fit`, one frozen, typed object.

Precedence: defaults < TOML file (`--config`, flat keys named like the fields) < command-line flags.
A field that neither the file nor a flag sets (not in `model_fields_set`) may be sized to the data by
`fit` (training/sizing.py): window, d_model, ff_dim, and for a short history batch_size, epochs, patience.
The argparse options are generated from the fields, so `--help` lists each default and config key.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class SettingsError(Exception):
    """Bad training settings; one sentence."""


class FitSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # data
    data: Path | None = Field(None, description="input file of normal operation (or --kafka-topic)")
    kafka_topic: str | None = Field(
        None,
        description="read the normal data from this Kafka topic instead of a file, through the service's own decoder; "
        "the [kafka] and [input] tables of --config (the TOML of `stream-detector run`, as it is) and SD_* variables "
        "say how; never joins or commits to a consumer group",
    )
    since: str | None = Field(
        None,
        description="with --kafka-topic: first record, as earliest, an ISO-8601 time (2026-12-01T00:00Z), a duration "
        "before now (90m, 6h, 7d) or @OFFSET (every partition)",
    )
    until: str | None = Field(None, description="with --kafka-topic: end of the range (exclusive), same forms; latest")
    # The [kafka] and [input] tables of the run TOML (--config): from the file only, never flags.
    kafka: dict[str, Any] | None = Field(None, description="the service's [kafka] table (TOML only)")
    input: dict[str, Any] | None = Field(None, description="the service's [input] table (TOML only)")
    out: Path = Field(description="bundle directory to write (replaced atomically)")
    format: Literal["auto", "csv", "parquet", "jsonl", "smd"] = Field(
        "auto", description="input format; 'log': raw log lines, with the 'logs' options below"
    )
    features: tuple[str, ...] | None = Field(
        None, description="feature columns in order (comma-separated); default: all numeric"
    )
    key_field: str | None = Field(None, description="entity-key column; default: 'key' or 'entity' if present")
    timestamp_field: str | None = Field(
        None,
        description="timestamp column; default: 'timestamp', 'time', 'ts' or 'event_time' if present (--format log "
        "with --log-format jsonl or logfmt: the line's timestamp field)",
    )
    nan_policy: Literal["ffill", "drop", "error"] = Field(
        "ffill",
        description="missing/non-finite values: forward-fill per entity (leading rows dropped), drop rows, or refuse",
    )
    # windows
    window: int = Field(
        64,
        ge=2,
        description="window length W (rows); not given: the largest of 64, 32, 16, 8 the data supports, i.e. "
        "with at least 4 x W training and 20 validation windows (logged); given but not supported: refused, "
        "naming the largest window that is",
    )
    val_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="last fraction of each entity held out for validation and calibration"
    )
    gap_factor: float = Field(
        3.0, gt=1.0, description="a time step longer than this x the median step is a gap windows never cross"
    )
    stride: int = Field(1, ge=1, description="step between training window starts")
    scale_floor: float = Field(1e-3, gt=0.0, description="smallest normaliser scale (constant features)")
    scale_floor_range: float = Field(
        0.03,
        ge=0.0,
        lt=1.0,
        description="also floor each feature's normaliser scale at this fraction of its training range (max - "
        "min), so a feature nearly constant in training cannot dominate scores later (docs/quality.md); 0: off",
    )
    # model
    variant: Literal["plain", "masked"] = Field(
        "masked", description="'masked' predicts the newest mask_steps rows from context; 'plain' reconstructs all rows"
    )
    mask_steps: int = Field(1, ge=1, description="rows masked and scored by the 'masked' variant")
    detectors: tuple[Literal["transformer", "pca", "zscore", "flatline"], ...] = Field(
        ("transformer",),
        description="detectors in the bundle's graph, comma-separated, 'transformer' first; each scaled by its "
        "validation 99%% quantile, the largest wins (training/composite.py); not given, a one-feature history "
        "with at least 100 validation windows gets transformer,zscore (training/sizing.py)",
    )
    feature_errors: Literal["absolute", "relative"] = Field(
        "absolute",
        description="how the Transformer's per-feature errors add up: 'absolute' averages them as they are; "
        "'relative' divides each feature's squared error by its mean on the validation windows (floored at 0.01) "
        "first, so every feature's normal error is 1 (several features only; docs/quality.md: it ranks SMD's "
        "incidents better but alerts and attributes worse there, so it is not the default)",
    )
    d_model: int = Field(
        64,
        ge=4,
        description="Transformer width; not given: the largest of 64, 32, 16, 8 whose square is at most the "
        "number of usable rows",
    )
    n_heads: int = Field(4, ge=1, description="attention heads")
    n_layers: int = Field(2, ge=1, description="encoder layers")
    ff_dim: int = Field(
        128, ge=4, description="feed-forward width; not given: 2 x d_model when d_model is sized to the data"
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout")
    # optimisation
    epochs: int = Field(
        8,
        ge=1,
        description="maximum epochs (the training budget every figure of docs/quality.md was measured with)",
    )
    patience: int = Field(
        3,
        ge=1,
        description="early stopping: epochs without validation improvement; not given, with fewer than 2048 "
        "training windows: a fifth of the epochs, at least 3",
    )
    batch_size: int = Field(
        256,
        ge=1,
        description="training batch size; not given, with fewer than 2048 training windows: the largest power "
        "of two up to 1/8 of the windows drawn per epoch, at least 16",
    )
    lr: float = Field(1e-3, gt=0.0, description="peak learning rate (AdamW; linear warm-up, cosine decay)")
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0.0, description="gradient norm clip")
    max_windows_per_epoch: int = Field(
        4096,
        ge=0,
        description="training windows drawn at random per epoch, so an epoch takes seconds on a CPU (0: all)",
    )
    seed: int = Field(0, description="random seed (torch, numpy, sampling)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto': CUDA when available, else CPU")
    threads: int = Field(0, ge=0, description="CPU threads for torch (0: all cores)")
    # export and calibration
    opset: int = Field(18, ge=17, description="ONNX opset")
    parity_tolerance: float = Field(
        1e-4, gt=0.0, description="largest allowed |ONNX Runtime - PyTorch| on held-out windows"
    )
    threshold_quantile: float = Field(
        0.999, gt=0.0, lt=1.0, description="validation score quantile used as the suggested threshold"
    )
    model_version: str | None = Field(
        None, description="model_version in the bundle (default: variant + sha256 prefix of model.onnx)"
    )
    progress: bool = Field(True, description="show a progress bar")

    @field_validator("features", "detectors", mode="before")
    @classmethod
    def _split_features(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [s.strip() for s in v.split(",") if s.strip()]
        return v

    @model_validator(mode="after")
    def _consistent(self) -> FitSettings:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if not self.detectors or self.detectors[0] != "transformer" or len(set(self.detectors)) != len(self.detectors):
            raise ValueError(
                f"detectors must list 'transformer' first and each detector once, got {','.join(self.detectors)}"
            )
        if (self.data is None) == (self.kafka_topic is None):
            raise ValueError("give the data as --data FILE or --kafka-topic TOPIC, one of the two")
        if self.kafka_topic is None and (self.since or self.until):
            raise ValueError("--since and --until apply to --kafka-topic only")
        if self.kafka_topic is not None:
            file_only = [f for f in _FILE_ONLY if getattr(self, f) != type(self).model_fields[f].default]
            if file_only:
                raise ValueError(
                    f"{file_only[0]} applies to a file; a topic is read as the service reads it (the [input] table "
                    "of the run TOML: key_field, timestamp_field)"
                )
        if self.variant == "masked" and self.mask_steps >= self.window:
            raise ValueError(f"mask_steps ({self.mask_steps}) must be smaller than the window ({self.window})")
        return self


# Options that are positional/required or never set from a file.
_REQUIRED = ("out",)
_FILE_ONLY = ("format", "key_field", "timestamp_field", "nan_policy")  # a topic is read with the service's [input]
_TOML_ONLY = ("kafka", "input")  # the run TOML's tables; no flags
# The other tables of a run TOML: `fit --config run.toml` takes the service's file as it is and ignores these.
_SERVICE_TABLES = ("model", "detection", "runtime", "processing")


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="TOML file with any of the options below (flat keys, e.g. window = 64)"
    )
    for name, info in FitSettings.model_fields.items():
        if name in _TOML_ONLY:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = f"{info.description} (config key '{name}'"
        help_text += ")" if name in _REQUIRED else f"; default {info.default})"
        if info.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)


def settings_from_args(args: argparse.Namespace) -> FitSettings:
    """Merge defaults, the TOML file and the flags that were given."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        values.update(load_toml(args.config))
    for name in FitSettings.model_fields:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    return make_settings(values)


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML file's keys as they are (SettingsError: one sentence if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist.") from None
    except IsADirectoryError:
        raise SettingsError(f"config file {path} is a directory.") from None
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"config file {path} is not valid TOML ({e}).") from None


def load_toml(path: Path) -> dict[str, Any]:
    data = {k: v for k, v in read_toml(path).items() if k not in _SERVICE_TABLES}
    unknown = sorted(set(data) - set(FitSettings.model_fields))
    if unknown:
        from training.logsettings import LogFitSettings

        if unknown[0] in LogFitSettings.model_fields:
            raise SettingsError(f"config file {path} has the log setting {unknown[0]!r}, but no format = 'log'.")
        raise SettingsError(
            f"config file {path} has unknown key {unknown[0]!r}; run 'stream-detector-train fit --help' for the keys."
        )
    return data


def make_settings(values: dict[str, Any]) -> FitSettings:
    for name in _REQUIRED:
        if values.get(name) in (None, ""):
            raise SettingsError(f"the option --{name} is required (or '{name}' in the config file).")
    try:
        return FitSettings(**values)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        if err["type"] == "extra_forbidden":
            raise SettingsError(f"unknown setting {where!r}.") from None
        if not err["loc"]:  # a rule between settings (model validator): its own sentence
            raise SettingsError(str(err["msg"]).removeprefix("Value error, ").rstrip(".") + ".") from None
        raise SettingsError(f"setting {where!r}: {err['msg']} (got {err.get('input')!r}).") from None
