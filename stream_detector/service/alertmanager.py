"""The Alertmanager sink: alert events posted to Alertmanager's API v2 (`POST /api/v2/alerts`),
one Alertmanager alert per incident.

An incident is the set of entity alerts that share an `incident_id` (an alert storm; a lone alert
is an incident of one). Its labels are fixed when its first event arrives, so Alertmanager sees one
alert for its whole life; annotations follow the members. It resolves (`endsAt` = the last
member's resolve time) when every member resolved. While open it is posted again every
`resend_interval_s` with `endsAt` four intervals ahead, so the alerts of a service that died end by
themselves.

Delivery is at-least-once: an event is done only after every URL accepted (HTTP 200) a post that
held its incident's state at or after that event. Each URL has a worker thread that posts the
incidents changed since its last success, in one list, and retries with exponential backoff;
nothing is dropped. `done` callbacks run only in `poll()`, on the caller's thread.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from stream_detector.config import AlertmanagerSettings
from stream_detector.core.alerts import RESOLVED, iso_utc

log = logging.getLogger(__name__)

ALERTNAME = "StreamDetectorAnomaly"
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
EXPIRY_RESENDS = 4  # an open alert's endsAt lies this many re-send intervals ahead
SUMMARY_KEYS = 5  # entity keys named in the summary line of a storm


@dataclass
class _Member:
    key: str
    score: float
    threshold: float
    top_features: list[dict[str, Any]]
    resolved: bool
    partition: tuple[str, int] = ("", -1)  # the input partition of its entity


@dataclass
class _Incident:
    labels: dict[str, str]
    starts_at: str
    members: dict[str, _Member] = field(default_factory=dict)  # alert_id -> member, in arrival order
    ends_at: str | None = None  # set while every member is resolved
    seq: int = 0  # the sink's change counter at this incident's last change
    waiting: deque[tuple[int, Callable[[], None]]] = field(default_factory=deque)  # (seq, done), seq ascending


class _Target:
    """One Alertmanager URL: the incidents it has not accepted yet and its outage state."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dirty: set[str] = set()  # incident ids changed since this URL's last accepted post of them
        self.acked: dict[str, int] = {}  # incident id -> highest seq this URL accepted
        self.failures = 0
        self.retry_at = 0.0  # monotonic
        self.resend_at = 0.0  # monotonic
        self.error: str | None = None
        self.error_at = 0.0


class AlertmanagerSink:
    def __init__(self, settings: AlertmanagerSettings, *, clock: Callable[[], float] = time.time) -> None:
        if not settings.urls:
            raise ValueError("the Alertmanager sink needs at least one URL (alertmanager.urls).")
        # extra_labels were checked by AlertmanagerSettings (names Alertmanager accepts, none of the
        # identity labels set below: config.AM_IDENTITY_LABELS)
        self._settings = settings
        self._clock = clock  # wall time for endsAt; scheduling uses time.monotonic
        self._cond = threading.Condition()
        self._incidents: dict[str, _Incident] = {}
        self._targets = [_Target(url) for url in settings.urls]
        self._seq = 0
        self._unacked = 0  # events waiting for some URL; guarded by _cond
        self._ready: list[Callable[[], None]] = []  # done callbacks for the next poll; guarded by _cond
        self._pending = 0  # touched only on the caller's thread
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._run, args=(t,), name=f"alertmanager-{i}", daemon=True)
            for i, t in enumerate(self._targets)
        ]
        for th in self._threads:
            th.start()

    # -- the caller's thread ------------------------------------------------------------------

    def submit(self, event: dict[str, Any], done: Callable[[], None]) -> None:
        """Queue one alert event; `done` runs in a later `poll()` once every URL has its incident."""
        if event.get("silenced") is not None:
            self._pending += 1
            with self._cond:
                self._ready.append(done)  # a silenced event never reaches Alertmanager
            return
        incident_id = str(event["incident_id"])
        resolved = event["state"] == RESOLVED
        member = _Member(
            key=str(event["key"]),
            score=float(event["score"]),
            threshold=float(event["threshold"]),
            top_features=list(event.get("top_features") or []),
            resolved=resolved,
            partition=(str(event["source"]["topic"]), int(event["source"]["partition"])),
        )
        self._pending += 1
        with self._cond:
            inc = self._incidents.get(incident_id)
            if inc is None:
                # Also for an update or resolve of an incident this sink never saw open (a restart): its
                # labels then come from this event, and only match the open one if they agree.
                inc = self._incidents[incident_id] = _Incident(self._labels(event), str(event["detected_at"]))
            inc.members[str(event["alert_id"])] = member
            if all(m.resolved for m in inc.members.values()):
                inc.ends_at = _not_before(str(event["detected_at"]), inc.starts_at)
            else:
                inc.ends_at = None
            self._seq += 1
            inc.seq = self._seq
            inc.waiting.append((self._seq, done))
            self._unacked += 1
            for t in self._targets:
                t.dirty.add(incident_id)
            self._cond.notify_all()

    def poll(self) -> int:
        """Run the done callbacks of the events delivered since the last poll; returns how many."""
        with self._cond:
            ready, self._ready = self._ready, []
        for done in ready:
            self._pending -= 1
            done()
        return len(ready)

    def forget(self, gone: set[tuple[str, int]]) -> int:
        """Partitions this instance no longer owns (revoked or lost): an incident whose open members
        all belong to them is no longer re-sent (their new owner sends what follows; otherwise
        Alertmanager ends it after EXPIRY_RESENDS intervals), and its events still waiting count
        as done, so that no batch waits on them. Returns how many incidents were let go."""
        if not gone:
            return 0
        let_go = 0
        with self._cond:
            for incident_id, inc in list(self._incidents.items()):
                open_members = [m for m in inc.members.values() if not m.resolved]
                if inc.ends_at is not None or not open_members or any(m.partition not in gone for m in open_members):
                    continue
                del self._incidents[incident_id]
                let_go += 1
                while inc.waiting:
                    self._ready.append(inc.waiting.popleft()[1])
                    self._unacked -= 1
                for t in self._targets:
                    t.dirty.discard(incident_id)
                    t.acked.pop(incident_id, None)
            self._cond.notify_all()
        if let_go:
            log.info("%d open incident(s) of partitions gone elsewhere are no longer re-sent from here", let_go)
        return let_go

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def last_error(self) -> str | None:
        """The latest failure of a URL that has not succeeded since; None while every URL is fine."""
        with self._cond:
            failing = [t for t in self._targets if t.error is not None]
            return max(failing, key=lambda t: t.error_at).error if failing else None

    def close(self, timeout: float) -> None:
        """Try to deliver what is pending within `timeout`, then stop the workers. Call `poll()`
        afterwards for the done callbacks of what got through."""
        deadline = time.monotonic() + timeout
        with self._cond:
            for t in self._targets:
                t.retry_at = 0.0  # one immediate try, whatever the backoff
            self._cond.notify_all()
            while self._unacked and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._stopping = True
            self._cond.notify_all()
        for th in self._threads:
            # A worker inside a request needs up to timeout_s more; it is a daemon and will not block exit.
            th.join(max(0.0, deadline - time.monotonic()))
        if self._unacked:
            log.warning("closing the Alertmanager sink with %d alert events not delivered", self._unacked)

    # -- the workers ------------------------------------------------------------------------------

    def _run(self, t: _Target) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    now = time.monotonic()
                    if now >= t.resend_at:
                        t.dirty.update(i for i, inc in self._incidents.items() if inc.ends_at is None)
                        t.resend_at = now + self._settings.resend_interval_s
                    wait = t.resend_at - now
                    if t.dirty:
                        if now >= t.retry_at:
                            break
                        wait = min(wait, t.retry_at - now)
                    self._cond.wait(wait)
                batch = {i: self._incidents[i].seq for i in t.dirty}
                alerts = [self._alert(self._incidents[i]) for i in batch]  # fresh dicts: encoded unlocked
            error = _request(t.url + "/api/v2/alerts", json.dumps(alerts).encode(), self._settings.timeout_s)
            with self._cond:
                if error is None:
                    self._accepted(t, batch)
                else:
                    self._failed(t, error)
                self._cond.notify_all()

    def _accepted(self, t: _Target, batch: dict[str, int]) -> None:
        if t.error is not None:
            log.info("Alertmanager %s accepts alerts again after %d failed posts", t.url, t.failures)
        t.failures, t.error = 0, None
        for incident_id, seq in batch.items():
            t.acked[incident_id] = max(t.acked.get(incident_id, 0), seq)
            inc = self._incidents.get(incident_id)
            if inc is None:
                continue
            if inc.seq == seq:
                t.dirty.discard(incident_id)
            low = min(u.acked.get(incident_id, 0) for u in self._targets)
            while inc.waiting and inc.waiting[0][0] <= low:
                self._ready.append(inc.waiting.popleft()[1])
                self._unacked -= 1
            if inc.ends_at is not None and low >= inc.seq:
                del self._incidents[incident_id]  # resolved everywhere: nothing left to send
                for u in self._targets:
                    u.acked.pop(incident_id, None)

    def _failed(self, t: _Target, error: str) -> None:
        if t.error is None:
            log.warning(
                "cannot post alerts to Alertmanager %s (%s); retrying with backoff, nothing is dropped", t.url, error
            )
        t.failures += 1
        t.retry_at = time.monotonic() + min(BACKOFF_FIRST_S * 2 ** min(t.failures - 1, 16), BACKOFF_MAX_S)
        t.error = f"posting alerts to {t.url} failed: {error}."
        t.error_at = time.monotonic()

    # -- the alert as Alertmanager sees it ----------------------------------------------------------

    def _labels(self, event: dict[str, Any]) -> dict[str, str]:
        top = event.get("top_features") or []
        return {
            **self._settings.extra_labels,
            "alertname": ALERTNAME,
            "incident_id": str(event["incident_id"]),
            "entity": str(event["key"]),
            "model_version": str(event["model_version"]),
            "top_feature": str(top[0]["name"]) if top else "",  # Alertmanager drops an empty label
            "source_topic": str(event["source"]["topic"]),
        }

    def _alert(self, inc: _Incident) -> dict[str, Any]:
        expires = iso_utc((self._clock() + EXPIRY_RESENDS * self._settings.resend_interval_s) * 1000)
        return {
            "labels": inc.labels,
            "annotations": _annotations(inc),
            "startsAt": inc.starts_at,
            "endsAt": inc.ends_at if inc.ends_at is not None else expires,
        }


def _annotations(inc: _Incident) -> dict[str, str]:
    members = list(inc.members.values())
    still_open = [m for m in members if not m.resolved]
    top = max(still_open or members, key=lambda m: m.score)  # the worst member shown; resolved ones once all are
    keys = [m.key for m in members]
    features = ", ".join(f"{f['name']} {100 * float(f['share']):.0f}%" for f in top.top_features)
    if len(members) == 1:
        summary = f"anomaly on {top.key}: score {top.score:.4g} over threshold {top.threshold:.4g}"
    else:
        named = ", ".join(keys[:SUMMARY_KEYS]) + (
            f" and {len(keys) - SUMMARY_KEYS} more" if len(keys) > SUMMARY_KEYS else ""
        )
        summary = f"anomaly on {len(keys)} entities together ({named}), {len(still_open)} still open"
    if not still_open:
        summary += ", resolved"
    if features:
        summary += f"; top features {features}"
    return {
        "summary": summary,
        "score": f"{top.score:.4g}",
        "threshold": f"{top.threshold:.4g}",
        "top_features": features,
        "members": ", ".join(keys),
        "member_count": str(len(members)),
        "alert_ids": ", ".join(inc.members),
    }


def _not_before(when: str, start: str) -> str:
    """`when`, or `start` if `when` is earlier (Alertmanager rejects an alert that ends before it starts)."""
    try:
        return start if datetime.fromisoformat(when) < datetime.fromisoformat(start) else when
    except ValueError:
        return when


def check_alertmanager(settings: AlertmanagerSettings) -> str | None:
    """For `stream-detector check`: None if every URL answers `/-/ready`, else one sentence on the
    first that does not."""
    for url in settings.urls:
        error = _request(url + "/-/ready", None, settings.timeout_s)
        if error is not None:
            return f"Alertmanager at {url} is not ready: {error}."
    return None


def _request(url: str, body: bytes | None, timeout: float) -> str | None:
    """POST `body` as JSON (GET if None); None on HTTP 200, else a short reason."""
    req = urllib.request.Request(url, data=body, method="GET" if body is None else "POST")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        detail = e.read(200).decode(errors="replace").strip().strip('"')
        return f"HTTP {e.code} ({detail})" if detail else f"HTTP {e.code}"
    except urllib.error.URLError as e:
        return _reason(e.reason, timeout)
    except (OSError, http.client.HTTPException) as e:
        return _reason(e, timeout)
    except Exception as e:  # a worker that died would leave every later event pending, silently
        return f"unexpected {type(e).__name__}: {e}"


def _reason(e: object, timeout: float) -> str:
    if isinstance(e, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror[0].lower() + e.strerror[1:]
    return str(e) or type(e).__name__
