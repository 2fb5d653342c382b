"""The promotion gate of `stream-detector-train retrain`: does a candidate bundle page better than the
live one on the same recent, held-out span of the topic?

Both bundles are replayed through the service's own detection (offline/replay.py, the run TOML's
[detection] settings) on the same rows. Each backtest counts the alerts it opened and, given labels
(offline/incidents.py), the incidents it caught and its false openings, with a slack of one window
of rows after an incident's end (the window a score looks back over).

The rule (`decide`):
- **with labels**: refuse a candidate that catches fewer incidents than the live model; refuse one
  that opens more false alerts without catching more; promote otherwise.
- **without labels** nothing shows that an extra page caught something, so extra pages are the
  cost: refuse a candidate that opens more than `live + max(1, max_extra_pages x live)` alerts
  (default 0.2: up to 20 % more, and always at least one more); promote otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_detector.offline.datafiles import DataTable
from stream_detector.offline.incidents import Incident, event_ms, match

MAX_EXTRA_PAGES = 0.2


@dataclass(frozen=True)
class Backtest:
    model_version: str
    opens: int
    caught: int | None = None  # None without labels
    incidents: int | None = None
    false_opens: int | None = None

    def line(self) -> str:
        if self.caught is None:
            return f"{self.model_version}: {self.opens} alerts opened"
        return (
            f"{self.model_version}: {self.opens} alerts opened, {self.caught}/{self.incidents} incidents caught, "
            f"{self.false_opens} false"
        )

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def backtest(
    model_version: str, alerts: Sequence[dict[str, Any]], table: DataTable, window: int, labels: list[Incident] | None
) -> Backtest:
    """Count a replay's alert openings, and with labels the incidents caught and the false openings."""
    opens = [a for a in alerts if a.get("state") == "open"]
    if labels is None:
        return Backtest(model_version, len(opens))
    opened = [(a["key"], event_ms(a["event_time"])) for a in opens]
    caught, false = match(opened, labels, window * _typical_step_ms(table))
    return Backtest(model_version, len(opens), caught, len(labels), false)


def decide(live: Backtest, candidate: Backtest, max_extra_pages: float = MAX_EXTRA_PAGES) -> tuple[bool, str]:
    """(promote?, one sentence why) by the rule in the module docstring."""
    if candidate.caught is not None and live.caught is not None:
        assert candidate.false_opens is not None and live.false_opens is not None
        if candidate.caught < live.caught:
            return False, f"the candidate catches fewer incidents ({candidate.caught} against {live.caught})."
        if candidate.false_opens > live.false_opens and candidate.caught <= live.caught:
            return False, (
                f"the candidate opens more false alerts ({candidate.false_opens} against {live.false_opens}) "
                f"without catching more incidents ({candidate.caught} against {live.caught})."
            )
        return True, (
            f"the candidate catches {candidate.caught} incidents (live {live.caught}) with {candidate.false_opens} "
            f"false alerts (live {live.false_opens})."
        )
    allowed = live.opens + max(1, math.ceil(max_extra_pages * live.opens))
    if candidate.opens > allowed:
        return False, (
            f"the candidate opens {candidate.opens} alerts against the live model's {live.opens} (at most {allowed} "
            "allowed without labels to show that it catches more)."
        )
    return True, f"the candidate opens {candidate.opens} alerts against the live model's {live.opens}."


def _typical_step_ms(table: DataTable) -> int:
    """Median time between an entity's consecutive rows (0 without timestamps)."""
    if table.timestamps_ms is None:
        return 0
    steps = [
        np.diff(e.timestamps_ms) for e in table.by_entity() if e.timestamps_ms is not None and e.values.shape[0] > 1
    ]
    return int(np.median(np.concatenate(steps))) if steps else 0
