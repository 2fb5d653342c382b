"""`stream-detector check --config F`: everything `run` needs before it consumes, without consuming.

Validates the settings, loads and verifies the bundle, opens the scorer with the configured
provider (so `require_cuda` is checked too), then connects to the broker with a bounded timeout
and checks that the input, alerts and dead-letter topics exist, and that every configured
Alertmanager answers. Exit 0 with a short summary, or exit 2 (bad settings or bundle) / 1 (broker
or Alertmanager problem) with one sentence.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

from stream_detector.config import ConfigError, Settings, add_settings_arguments, settings_from_args
from stream_detector.core.bundle import Bundle, BundleError, load_bundle
from stream_detector.ingest.kafka_config import check_client_configs
from stream_detector.service.alertmanager import check_alertmanager
from stream_detector.service.kafka_io import KafkaIOError, check_broker

log = logging.getLogger(__name__)


class AlertmanagerUnreachable(Exception):
    """A configured Alertmanager does not answer; the message is one sentence naming it."""


@dataclass(frozen=True)
class CheckResult:
    bundle: Bundle
    provider: str
    partitions: dict[str, int]


def load_model(settings: Settings) -> Bundle:
    """The configured bundle, verified; BundleError with one sentence otherwise."""
    if settings.model.bundle is None:
        raise ConfigError("no model bundle configured (set model.bundle, SD_MODEL__BUNDLE or --model.bundle).")
    return load_bundle(settings.model.bundle)


def run_checks(settings: Settings) -> CheckResult:
    from stream_detector.core.scorer import Scorer
    from stream_detector.service.shadow import load_shadow, shadow_topic

    check_client_configs(settings)  # a kafka.consumer/producer value the service refuses
    bundle = load_model(settings)
    scorer = Scorer.from_settings(bundle, settings)
    scorer.warm_up()  # what `run` does before consuming: a model that scores NaN fails the check too
    topics = [*settings.kafka.topics, settings.kafka.alerts_topic, settings.kafka.dlq_topic]
    shadow = load_shadow(settings, bundle)  # a shadow candidate: readable, the same features, its topic there
    if shadow is not None:
        Scorer.from_settings(shadow, settings).warm_up()
        topics.append(shadow_topic(settings))
    partitions = check_broker(settings, topics)
    if settings.alertmanager.urls:
        problem = check_alertmanager(settings.alertmanager)
        if problem is not None:
            raise AlertmanagerUnreachable(problem)
    return CheckResult(bundle, scorer.provider, partitions)


def handle(args: argparse.Namespace) -> int:
    from stream_detector.core.scorer import ScorerError

    try:
        settings = settings_from_args(args)
        result = run_checks(settings)
    except (ConfigError, BundleError, ScorerError) as e:
        print(f"check failed: {e}", file=sys.stderr)
        return 2
    except (KafkaIOError, AlertmanagerUnreachable) as e:
        print(f"check failed: {e}", file=sys.stderr)
        return 1
    b = result.bundle
    inputs = ", ".join(f"{t} ({result.partitions[t]} partitions)" for t in settings.kafka.topics)
    proc = settings.processing
    static = proc.group_instance_id()
    member = f"static member '{static}'" if static is not None else f"dynamic member ('{proc.member_id()}')"
    print(
        f"config ok: group {settings.kafka.group_id}, {member}, {proc.guarantee}, hop {settings.detection.hop}, "
        f"max_batch {settings.runtime.max_batch}"
    )
    print(
        f"bundle ok: {b.path} model {b.model_version}, window {b.window}, {b.n_features} features, "
        f"scoring on {result.provider}"
    )
    print(
        f"broker ok: {settings.kafka.bootstrap_servers}; input {inputs}; alerts {settings.kafka.alerts_topic}; "
        f"dead letters {settings.kafka.dlq_topic}"
    )
    if settings.alertmanager.urls:
        print(f"alertmanager ok: {', '.join(settings.alertmanager.urls)} ready")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check",
        help="validate settings and model bundle and connect to the broker",
        description=__doc__.split("\n\n")[1],
    )
    add_settings_arguments(p)
    p.set_defaults(func=handle)
