"""The `logs` section of a model bundle: what turns raw log lines into the model's input rows.

A log model bundle is an ordinary bundle (contract 1, see bundle.py) plus:
- `bundle.json` key `logs`: the line parser configuration (`LogParserConfig.to_json`, with its
  version), the session/feature configuration, the layout of the input rows (`layout`,
  `context`), the template set's file name, version and sha256 fingerprint;
- `templates.json`: the frozen template set (`TemplateSet.to_bytes`).

Input rows (layout `template-context/1`): the model's window is W = 2 rows of F = 2K features. The
row of an event carries the entity's session context itself: the template ids of its last K
tokens (oldest first, the event's own template last), then log1p of the seconds between each of
those tokens and the one before. Token ids: 0 = unknown template, 1..V-1 learned templates,
V = session end, V+1 = session start, V+2 = padding before the session start. The model's output
at [-1, K-1] is the negative log-likelihood of the newest token given the ones before it (all other
outputs are 0), scored with `ScoringRule(positions=(-1,), reduction="model_error")`. Each session
starts with a start row (never scored as an event of its own: its NLL is 0), so the first real
event of a session is scored too; a session that ended by inactivity gets an end row, so a block
that stops early (missing events) is scored when its session times out.

`load_log_spec(bundle)` rebuilds everything and refuses a bundle whose parser, template set or
layout this version cannot read, or whose template set is not the one the model was trained with,
with one `BundleError` sentence.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

from .bundle import Bundle, BundleError
from .logfeatures import LogFeatureConfig, LogFeatureConfigError, end_template_ids
from .logparse import LogConfigError, LogParserConfig
from .templates import TEMPLATE_SET_VERSION, TemplateConfigError, TemplateSet

LOGS_SECTION = "logs"
LAYOUT = "template-context/1"
TEMPLATES_FILE = "templates.json"
WINDOW = 2  # previous row + the event's own row; the row carries the context


def feature_names(context: int) -> list[str]:
    """Feature names of the input row, oldest position first: template@t-(K-1) .. template@t, gap@..."""
    tokens = [f"template@t-{context - 1 - i}" if i < context - 1 else "template@t" for i in range(context)]
    gaps = [f"gap@t-{context - 1 - i}" if i < context - 1 else "gap@t" for i in range(context)]
    return tokens + gaps


def gap_feature(gap_s: float) -> float:
    """How a time gap enters the model: log1p of seconds (gaps span 0 s .. hours)."""
    return math.log1p(max(0.0, gap_s))


@dataclass(frozen=True)
class LogModelSpec:
    parser: LogParserConfig
    features: LogFeatureConfig
    templates: TemplateSet
    context: int  # K: tokens per input row

    @property
    def vocab_size(self) -> int:  # learned templates + unknown
        return self.templates.vocab_size

    @property
    def end_id(self) -> int:
        return self.vocab_size

    @property
    def bos_id(self) -> int:
        return self.vocab_size + 1

    @property
    def pad_id(self) -> int:
        return self.vocab_size + 2

    @property
    def n_tokens(self) -> int:
        """Input vocabulary of the model (templates, unknown, end, start, padding)."""
        return self.vocab_size + 3

    @property
    def n_features(self) -> int:
        return 2 * self.context

    @property
    def end_template_ids(self) -> frozenset[int]:
        return end_template_ids(self.features, self.templates.templates())

    def token_text(self, token: int) -> str:
        if token == self.end_id:
            return "<session end>"
        if token == self.bos_id:
            return "<session start>"
        if 0 <= token < self.vocab_size:
            return self.templates.template(token)
        return "<padding>"

    def to_extra(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        """(bundle.json extra section, extra files) for write_bundle."""
        data = self.templates.to_bytes()
        section = {
            "layout": LAYOUT,
            "context": self.context,
            "parser": self.parser.to_json(),
            "features": self.features.model_dump(mode="json"),
            "templates_file": TEMPLATES_FILE,
            "template_set_version": TEMPLATE_SET_VERSION,
            "templates_sha256": self.templates.fingerprint,
            "templates_file_sha256": hashlib.sha256(data).hexdigest(),
            "vocab_size": self.vocab_size,
        }
        return {LOGS_SECTION: section}, {TEMPLATES_FILE: data}


def is_log_bundle(bundle: Bundle) -> bool:
    return LOGS_SECTION in bundle.extra


def load_log_spec(bundle: Bundle) -> LogModelSpec:
    """The log stage's configuration from a bundle; BundleError (one sentence) if it cannot be used."""
    sec = bundle.extra.get(LOGS_SECTION)
    where = f"model bundle {bundle.path}"
    if not isinstance(sec, dict):
        raise BundleError(f"{where} is not a log model (its bundle.json has no '{LOGS_SECTION}' section).")
    if sec.get("layout") != LAYOUT:
        raise BundleError(f"{where} has log input layout {sec.get('layout')!r}; this stream-detector reads {LAYOUT!r}.")
    try:
        parser = LogParserConfig.from_json(sec["parser"])
        features = LogFeatureConfig(**sec["features"])
        context = int(sec["context"])
        tversion = sec["template_set_version"]
        fname = str(sec["templates_file"])
        fingerprint = str(sec["templates_sha256"])
    except LogConfigError as e:
        raise BundleError(f"{where}: {e}") from None
    except KeyError as e:
        raise BundleError(f"{where}'s logs section lacks the key {e.args[0]!r}.") from None
    except (TypeError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        raise BundleError(f"{where}'s logs section has a malformed value ({str(e).splitlines()[0]}).") from None
    if tversion != TEMPLATE_SET_VERSION:
        raise BundleError(f"{where} was trained with template set version {tversion!r}; this stream-detector reads version {TEMPLATE_SET_VERSION}.")
    path = bundle.path / fname
    if not path.is_file():
        raise BundleError(f"{where} has no template set file {fname}.")
    try:
        templates = TemplateSet.from_bytes(path.read_bytes())
    except TemplateConfigError as e:
        raise BundleError(f"{where}: {e}") from None
    if templates.fingerprint != fingerprint:
        raise BundleError(f"{path} is not the template set the model was trained with (its fingerprint differs from bundle.json's).")
    spec = LogModelSpec(parser, features, templates, context)
    if bundle.window != WINDOW or tuple(bundle.features) != tuple(feature_names(context)):
        raise BundleError(f"{where}'s window and features do not follow the log layout {LAYOUT} with context {context}.")
    if sec.get("vocab_size") != spec.vocab_size:
        raise BundleError(f"{where} was trained for {sec.get('vocab_size')!r} template ids but its template set has {spec.vocab_size}.")
    try:
        spec.end_template_ids
    except LogFeatureConfigError as e:
        raise BundleError(f"{where}: {e}") from None
    return spec
