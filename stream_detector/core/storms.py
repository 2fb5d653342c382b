"""Alert storms grouped into incidents: one page when many entities fail together.

The rule (docs/operations.md, "Alert storms"): every alert that opens belongs to an incident. An
alert that opens within `window_ms` of the first alert of the current incident joins it; otherwise
it starts a new incident, whose id is its own alert id (deterministic, like the alert id). The
first alert of an incident is the page (`page: true` on its `open` event); the others carry the
same `incident_id` and `page: false`. Once `min_entities` entities are in the incident it is a
storm (`storm: true` on the events from then on), a hint for routing (e.g. to the fleet's team),
not a second page. `window_ms = 0` turns grouping off: every alert is its own incident and pages.

Time is the event time of the event that opened the alert (the detection time where the events
have none), so the window does not depend on how fast events arrive; which alert of a storm comes
first (the page, whose id the incident takes) follows the order events are processed in, which
across input partitions may differ from one run to the next. Grouping spans the entities this process
holds (the partitions assigned to it): a fleet spread over several instances of a consumer group
makes one page per instance that sees the fault, not one per entity.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class StormParams:
    window_ms: int = 60_000  # alerts opening within this of an incident's first alert join it (0: no grouping)
    min_entities: int = 3  # entities in an incident from which its events say `storm: true`

    def validate(self) -> None:
        if self.window_ms < 0:
            raise ValueError(f"the incident window must not be negative, got {self.window_ms} ms.")
        if self.min_entities < 2:
            raise ValueError(f"storm_min_entities must be at least 2, got {self.min_entities}.")


@dataclass(frozen=True)
class Membership:
    """What an alert event says about its incident."""

    incident_id: str
    page: bool
    size: int  # entities in the incident so far
    storm: bool


class StormGrouper:
    """The current incident and the sizes of recent ones (for the events of alerts still open)."""

    _REMEMBERED = 4096  # incidents whose size is remembered; an older one reports size 1

    def __init__(self, params: StormParams) -> None:
        self.params = params
        self._current: str | None = None
        self._started_ms = 0.0
        self._members: set[str] = set()  # entity keys in the current incident
        self._sizes: OrderedDict[str, int] = OrderedDict()

    def join(self, alert_id: str, key: str, at_ms: float) -> Membership:
        """The incident of `key`'s alert that opens now: the current one if it began within the
        window (an entity that opens again in it counts once), else a new one with this alert's id."""
        p = self.params
        current = self._current
        if current is not None and p.window_ms > 0 and abs(at_ms - self._started_ms) <= p.window_ms:
            self._members.add(key)
            size = len(self._members)
            self._remember(current, size)
            return Membership(current, False, size, size >= p.min_entities)
        self._current, self._started_ms, self._members = alert_id, at_ms, {key}
        self._remember(alert_id, 1)
        return Membership(alert_id, True, 1, False)

    def member(self, incident_id: str) -> Membership:
        """For the update and resolved events of an alert of `incident_id` (never a page)."""
        size = self._sizes.get(incident_id, 1)
        return Membership(incident_id, False, size, size >= self.params.min_entities)

    def _remember(self, incident_id: str, size: int) -> None:
        self._sizes[incident_id] = size
        self._sizes.move_to_end(incident_id)
        while len(self._sizes) > self._REMEMBERED:
            self._sizes.popitem(last=False)
