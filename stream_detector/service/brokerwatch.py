"""Is the Kafka broker reachable? librdkafka's signals turned into `Health` readiness (/readyz).

Three sources, all on the loop's thread (librdkafka serves callbacks inside `consume()`/`poll()`):

- the clients' error callback: `_ALL_BROKERS_DOWN`, `_TRANSPORT` (a connection failed or was
  lost) and `_RESOLVE` (a broker's name does not resolve) mark the broker unreachable from now on;
- the consumer's statistics (`statistics.interval.ms`, once a second by default,
  kafka_config.py): no broker connection in state `UP` marks it unreachable, any one `UP` marks it
  reachable again. This is the signal that a broker came back while no message flows, and it
  clears a single broker's `_TRANSPORT` error while the rest of a cluster still serves;
- the loop's own calls (kafka_io.py, kafka_sink.py): a commit or a transaction call that failed because the
  broker was away marks it unreachable, a commit that went through marks it reachable.

`Health` turns "unreachable since t" into not-ready only after `runtime.broker_unready_after_s`,
so a broker restart shorter than that (which the service rides out) does not flap readiness.
Callbacks never raise: a malformed statistics document is ignored.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from confluent_kafka import KafkaError

from stream_detector.service.health import Health

log = logging.getLogger(__name__)

# librdkafka error codes that mean "a broker cannot be reached", as the error callback reports them.
UNREACHABLE = frozenset({KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE})


class BrokerWatch:
    def __init__(self, health: Health) -> None:
        self._health = health
        self._last_error: str | None = None  # what librdkafka said last while the broker is away

    def on_error(self, err: KafkaError) -> None:
        """A client's error callback (consumer and producer)."""
        if err.code() in UNREACHABLE:
            self._last_error = err.str()
            self._health.broker_unreachable(self._last_error)

    def on_stats(self, stats_json: str) -> None:
        """The consumer's statistics callback (librdkafka STATISTICS.md: `brokers.*.state`)."""
        try:
            brokers: dict[str, Any] = orjson.loads(stats_json).get("brokers") or {}
        except (orjson.JSONDecodeError, AttributeError):
            return
        if not brokers:
            return
        if any(b.get("state") == "UP" for b in brokers.values()):
            self.reachable()
            return
        states = ", ".join(f"{b.get('name', name)} {b.get('state', '?')}" for name, b in sorted(brokers.items()))
        self._health.broker_unreachable(self._last_error or f"no broker connection is up ({states})")

    def failed(self, what: str) -> None:
        """One of the loop's calls failed because the broker was away (e.g. a commit)."""
        self._last_error = what
        self._health.broker_unreachable(what)

    def reachable(self) -> None:
        """A connection is up or a call went through."""
        self._last_error = None
        self._health.broker_reachable()
