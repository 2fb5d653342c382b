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

Input rows (layout `template-bucket-counts/1`, the count-vector option per time bucket): as
`template-counts/1` below, except that the counts are those of the entity's lines in the current
time bucket of `features.bucket_s` seconds (aligned to the epoch; a line older than its entity's
current bucket counts in it), so a row judges a line against what its entity did in the same bucket
so far. For logs whose incidents are single lines of long-lived entities (a node of a cluster), not
whole sessions: the counts never grow with the entity's age. Idle checks are optional.

Input rows (layout `template-counts/1`, the count-vector option): W = 2 rows of F = V + 1 features
(`count_feature_names`): the entity's cumulative count of each template id over its session so
far (raw counts; the model takes log1p and standardises inside its graph), then `row:kind`, the
row's kind code (logs/stage.py: 0 line, 1 session start, 3 idle check). A row per (line, entity), a
start row (all counts 0) before each session's first event, and an idle-check row when an entity
has been inactive for `features.idle_check_s` (the counts of an entity at rest, judged once per
pause); no end rows: sessions are keyed by entity with a long `session_timeout_s` that only evicts
state. The model's output at [-1, :V] is each template's share of the reconstruction error,
already divided by the calibration scale of the row's kind (`ScoringRule(positions=(-1,),
reduction="model_error")`), so one threshold serves line and idle-check rows.

`load_log_spec(bundle)` rebuilds everything and refuses a bundle whose parser, template set or
layout this version cannot read, or whose template set is not the one the model was trained with,
with one `BundleError` sentence.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

from stream_detector.core.bundle import Bundle, BundleError
from stream_detector.core.pipeline import DetectionSettings
from stream_detector.logs.features import LogFeatureConfig, LogFeatureConfigError, end_template_ids
from stream_detector.logs.parse import LogConfigError, LogParserConfig
from stream_detector.logs.templates import TEMPLATE_SET_VERSION, TemplateConfigError, TemplateSet

LOGS_SECTION = "logs"
LAYOUT = "template-context/1"  # sequence model: the last K tokens and gaps
COUNTS_LAYOUT = "template-counts/1"  # count-vector model: cumulative template counts of the session
BUCKET_COUNTS_LAYOUT = "template-bucket-counts/1"  # count-vector model: template counts of the current time bucket
LAYOUTS = (LAYOUT, COUNTS_LAYOUT, BUCKET_COUNTS_LAYOUT)
TEMPLATES_FILE = "templates.json"
IDLE_TOKEN = -1  # the token of an idle-check row (count layout)
WINDOW = 2  # previous row + the event's own row; the row carries the context


def feature_names(context: int) -> list[str]:
    """Feature names of the input row, oldest position first: template@t-(K-1) .. template@t, gap@..."""
    tokens = [f"template@t-{context - 1 - i}" if i < context - 1 else "template@t" for i in range(context)]
    gaps = [f"gap@t-{context - 1 - i}" if i < context - 1 else "gap@t" for i in range(context)]
    return tokens + gaps


def count_feature_names(vocab_size: int) -> list[str]:
    """Feature names of a count row: count:unknown, count:1 .. count:V-1, then row:kind."""
    return ["count:unknown"] + [f"count:{i}" for i in range(1, vocab_size)] + ["row:kind"]


def gap_feature(gap_s: float) -> float:
    """How a time gap enters the model: log1p of seconds (gaps span 0 s .. hours)."""
    return math.log1p(max(0.0, gap_s))


@dataclass(frozen=True)
class LogModelSpec:
    parser: LogParserConfig
    features: LogFeatureConfig
    templates: TemplateSet
    context: int  # K: tokens per input row (sequence layout; 0 for the count layout)
    layout: str = LAYOUT

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
        return len(self.feature_names())

    @property
    def counts(self) -> bool:
        """A count-vector layout (cumulative per session, or per time bucket)."""
        return self.layout in (COUNTS_LAYOUT, BUCKET_COUNTS_LAYOUT)

    @property
    def bucketed(self) -> bool:
        """Counts per time bucket (`features.bucket_s`) rather than over the whole session."""
        return self.layout == BUCKET_COUNTS_LAYOUT

    def feature_names(self) -> list[str]:
        return count_feature_names(self.vocab_size) if self.counts else feature_names(self.context)

    @property
    def end_template_ids(self) -> frozenset[int]:
        return end_template_ids(self.features, self.templates.templates())

    def token_text(self, token: int) -> str:
        if token == IDLE_TOKEN:
            return "<idle check>"
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
            "layout": self.layout,
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
    layout = sec.get("layout")
    if layout not in LAYOUTS:
        raise BundleError(
            f"{where} has log input layout {layout!r}; this stream-detector reads {' or '.join(map(repr, LAYOUTS))}."
        )
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
        raise BundleError(
            f"{where} was trained with template set version {tversion!r}; this stream-detector reads version "
            f"{TEMPLATE_SET_VERSION}."
        )
    path = bundle.path / fname
    if not path.is_file():
        raise BundleError(f"{where} has no template set file {fname}.")
    try:
        templates = TemplateSet.from_bytes(path.read_bytes())
    except TemplateConfigError as e:
        raise BundleError(f"{where}: {e}") from None
    if templates.fingerprint != fingerprint:
        raise BundleError(
            f"{path} is not the template set the model was trained with (its fingerprint differs from bundle.json's)."
        )
    spec = LogModelSpec(parser, features, templates, context, layout)
    if spec.bucketed != (features.bucket_s is not None):
        raise BundleError(
            f"{where} has log input layout {layout} but features.bucket_s {features.bucket_s!r}: a bucketed count "
            "layout needs a bucket length and only it may have one."
        )
    if bundle.window != WINDOW or tuple(bundle.features) != tuple(spec.feature_names()):
        what = f"{spec.vocab_size} template ids" if spec.counts else f"context {context}"
        raise BundleError(f"{where}'s window and features do not follow the log layout {layout} with {what}.")
    if sec.get("vocab_size") != spec.vocab_size:
        raise BundleError(
            f"{where} was trained for {sec.get('vocab_size')!r} template ids but its template set has "
            f"{spec.vocab_size}."
        )
    try:
        _ = spec.end_template_ids  # the property checks the feature configuration against the template set
    except LogFeatureConfigError as e:
        raise BundleError(f"{where}: {e}") from None
    return spec


def log_detection_settings(base: DetectionSettings, spec: LogModelSpec) -> DetectionSettings:
    """Detection settings for log rows: the window store must keep an entity at least as long as a
    session can stay open (or its end row, or with the count layout the line after an eviction, would
    find an empty window and go unscored)."""
    need = int(spec.features.session_timeout_s * 1000) * (1 if spec.counts else 2)
    idle = base.idle_timeout_ms
    if idle is not None and idle < need:
        raise ValueError(
            f"idle_timeout_ms ({idle}) must be at least {'' if spec.counts else 'twice '}the log session timeout "
            f"({int(spec.features.session_timeout_s * 1000)} ms), or rows of long sessions go unscored."
        )
    return base
