"""Per-entity features from template ids: sessions, template sequences with time gaps, and
template-count vectors per time bucket.

Input is a stream of (entity, event time, template id) events, in arrival order, fed in batches to
`LogFeaturizer.add_batch`. A log line naming several entities is one event per entity
(`explode` does that). Out come, per batch:
- per event: the gap in seconds since the entity's previous event in the same session (0 for a
  session's first event) and the event's position in its session: with the template id this is
  the sequence input of a sequence model;
- closed time buckets: `BucketCounts` (counts of each template id of one entity in one bucket of
  `bucket_s` seconds, aligned to the epoch);
- closed sessions: `Session` (the template ids and gaps of one entity's session and how it ended).

A session ends when the entity has been inactive for `session_timeout_s` (noticed at its next
event, or by `expire(now_ms)`), at an explicit end template (the end event belongs to the session
it ends), at `max_session_events`, when the entity is evicted because `max_entities` are tracked
(least recently active first), or at `close_all()`. Every ended session is returned with its
reason: nothing is dropped silently. Time is event time; an event older than its entity's previous
event gets gap 0 and counts in the entity's current bucket (`late_events` counts them).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

SessionEnd = Literal["timeout", "end-template", "max-length", "evicted", "flush"]


class LogFeatureConfigError(Exception):
    """Feature settings that cannot work; one sentence for the operator."""


class LogFeatureConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    session_timeout_s: float = 6 * 3600.0
    end_templates: tuple[str, ...] = ()  # template texts that end a session (resolved by end_template_ids)
    bucket_s: float | None = None  # None: no count vectors per time bucket
    max_entities: int = 100_000
    max_session_events: int = 4096
    # Seconds of inactivity after which an entity's state so far is judged once ("idle check"),
    # without ending its session (count-vector layout; None: no idle checks). Must be shorter
    # than session_timeout_s.
    idle_check_s: float | None = None

    @model_validator(mode="after")
    def _check(self) -> LogFeatureConfig:
        if not self.session_timeout_s > 0:
            raise ValueError("session_timeout_s must be positive")
        if self.bucket_s is not None and not self.bucket_s > 0:
            raise ValueError("bucket_s must be positive")
        if self.idle_check_s is not None and not 0 < self.idle_check_s < self.session_timeout_s:
            raise ValueError("idle_check_s must be positive and shorter than session_timeout_s")
        if self.max_entities < 1 or self.max_session_events < 1:
            raise ValueError("max_entities and max_session_events must be at least 1")
        return self


def make_feature_config(**fields: Any) -> LogFeatureConfig:
    try:
        return LogFeatureConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "log feature configuration"
        raise LogFeatureConfigError(f"invalid log feature setting {where}: {err['msg']}.") from None


def end_template_ids(config: LogFeatureConfig, templates: Sequence[str]) -> frozenset[int]:
    """Resolve config.end_templates (texts) to ids in `templates` (text by id, e.g. TemplateSet.templates())."""
    index = {t: i for i, t in enumerate(templates)}
    missing = [t for t in config.end_templates if t not in index]
    if missing:
        raise LogFeatureConfigError(f"end template {missing[0]!r} is not in the template set.")
    return frozenset(index[t] for t in config.end_templates)


@dataclass(frozen=True)
class BucketCounts:
    entity: str
    start_ms: int
    counts: np.ndarray  # int32 [vocab_size]


@dataclass(frozen=True)
class Session:
    entity: str
    start_ms: int
    end_ms: int  # time of its last event
    reason: SessionEnd
    template_ids: np.ndarray  # int32 [n]
    gaps_s: np.ndarray  # float32 [n], 0 for the first event
    earlier_events: int = 0  # events before the session was resumed (`resume`), not in template_ids

    @property
    def events(self) -> int:
        return self.earlier_events + int(self.template_ids.size)

    def counts(self, vocab_size: int) -> np.ndarray:
        return np.bincount(self.template_ids, minlength=vocab_size).astype(np.int32)


@dataclass
class FeatureBatch:
    gap_s: np.ndarray  # float32 [n events]
    position: np.ndarray  # int32 [n events], 0 = first event of its session
    buckets: list[BucketCounts] = field(default_factory=list)
    sessions: list[Session] = field(default_factory=list)


class _EntityState:
    __slots__ = ("start_ms", "last_ms", "earlier", "ids", "gaps", "bucket", "bucket_counts")

    def __init__(self, t_ms: int, vocab_size: int, with_buckets: bool, earlier: int = 0):
        self.start_ms = t_ms
        self.last_ms = t_ms
        self.earlier = earlier  # events of a resumed session that came before it was resumed
        self.ids: list[int] = []
        self.gaps: list[float] = []
        self.bucket = -1
        self.bucket_counts = np.zeros(vocab_size, dtype=np.int32) if with_buckets else None


class LogFeaturizer:
    """Streaming per-entity sessions and buckets. Not thread-safe."""

    def __init__(self, vocab_size: int, config: LogFeatureConfig | None = None, end_ids: Iterable[int] = ()):
        self.vocab_size = int(vocab_size)
        self.config = config or LogFeatureConfig()
        self.end_ids = frozenset(int(i) for i in end_ids)
        if any(not 0 <= i < self.vocab_size for i in self.end_ids):
            raise LogFeatureConfigError(f"end template ids must lie in 0..{self.vocab_size - 1}.")
        self._timeout_ms = int(round(self.config.session_timeout_s * 1000))
        self._bucket_ms = None if self.config.bucket_s is None else int(round(self.config.bucket_s * 1000))
        # Least recently active entity first: eviction and expiry walk from the front.
        self._state: OrderedDict[str, _EntityState] = OrderedDict()
        self._bucket_heap: list[tuple[int, str, int]] = []  # (bucket end ms, entity, bucket index)
        self.late_events = 0

    def __len__(self) -> int:
        return len(self._state)

    def add_batch(
        self, entities: Sequence[str], time_ms: Sequence[int] | np.ndarray, template_ids: Sequence[int] | np.ndarray
    ) -> FeatureBatch:
        n = len(entities)
        if len(time_ms) != n or len(template_ids) != n:
            raise ValueError("entities, time_ms and template_ids must have the same length")
        tids = np.asarray(template_ids, dtype=np.int64)
        if n and (tids.min() < 0 or tids.max() >= self.vocab_size):
            raise ValueError(f"template ids must lie in 0..{self.vocab_size - 1}")
        out = FeatureBatch(np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.int32))
        times = [int(t) for t in time_ms]
        cfg, state, timeout, bms = self.config, self._state, self._timeout_ms, self._bucket_ms
        for i, (entity, t, tid) in enumerate(zip(entities, times, tids.tolist())):
            st = state.get(entity)
            if st is not None and t - st.last_ms > timeout:
                self._close(entity, "timeout", out)
                st = None
            if st is None:
                if len(state) >= cfg.max_entities:
                    self._close(next(iter(state)), "evicted", out)
                st = state[entity] = _EntityState(t, self.vocab_size, bms is not None)
            else:
                state.move_to_end(entity)
                if st.ids or st.earlier:
                    gap = t - st.last_ms
                    if gap < 0:
                        self.late_events += 1
                        gap = 0
                    out.gap_s[i] = gap / 1000.0
            out.position[i] = st.earlier + len(st.ids)
            st.gaps.append(float(out.gap_s[i]))
            st.ids.append(tid)
            st.last_ms = max(st.last_ms, t)
            if bms is not None:
                b = t // bms
                if b > st.bucket:
                    if st.bucket >= 0:
                        self._emit_bucket(entity, st, out)
                    st.bucket = b
                    heapq.heappush(self._bucket_heap, ((b + 1) * bms, entity, b))
                st.bucket_counts[tid] += 1  # type: ignore[index]  # allocated whenever buckets are on (bms set)
            if tid in self.end_ids:
                self._close(entity, "end-template", out)
            elif st.earlier + len(st.ids) >= cfg.max_session_events:
                self._close(entity, "max-length", out)
        return out

    def expire(self, now_ms: int) -> FeatureBatch:
        """Close sessions idle for longer than the timeout and buckets that ended by `now_ms`."""
        out = FeatureBatch(np.zeros(0, np.float32), np.zeros(0, np.int32))
        state = self._state
        while state:
            entity, st = next(iter(state.items()))
            if now_ms - st.last_ms <= self._timeout_ms:
                break
            self._close(entity, "timeout", out)
        heap = self._bucket_heap
        while heap and heap[0][0] <= now_ms:
            _, entity, b = heapq.heappop(heap)
            held = state.get(entity)
            if held is not None and held.bucket == b:
                self._emit_bucket(entity, held, out)
        return out

    def resume(self, sessions: Iterable[tuple[str, int, int, int]]) -> None:
        """Reinstate open sessions kept elsewhere, as (entity, start ms, last event ms, events so far):
        state restored from a changelog after a partition moved. Their earlier template ids are not
        kept, only their number (positions and max_session_events carry on); a resumed session's
        current time bucket starts empty. An entity already tracked keeps its own session."""
        state = self._state
        for entity, start_ms, last_ms, events in sessions:
            if entity not in state:
                st = state[entity] = _EntityState(
                    int(start_ms), self.vocab_size, self._bucket_ms is not None, earlier=int(events)
                )
                st.last_ms = int(last_ms)
        # expiry and eviction walk from the front: least recently active first
        self._state = OrderedDict(sorted(state.items(), key=lambda kv: kv[1].last_ms))

    def forget(self, entities: Iterable[str]) -> None:
        """Drop these entities' sessions without ending them (their partition moved to another
        consumer, which carries them on)."""
        for entity in entities:
            self._state.pop(entity, None)

    def close_all(self) -> FeatureBatch:
        """End every open session (end of input, shutdown)."""
        out = FeatureBatch(np.zeros(0, np.float32), np.zeros(0, np.int32))
        for entity in list(self._state):
            self._close(entity, "flush", out)
        self._bucket_heap.clear()
        return out

    def _emit_bucket(self, entity: str, st: _EntityState, out: FeatureBatch) -> None:
        bms = self._bucket_ms  # set exactly when the states hold bucket counts
        if bms is not None and st.bucket_counts is not None and st.bucket >= 0 and st.bucket_counts.any():
            out.buckets.append(BucketCounts(entity, st.bucket * bms, st.bucket_counts.copy()))
            st.bucket_counts[:] = 0

    def _close(self, entity: str, reason: SessionEnd, out: FeatureBatch) -> None:
        st = self._state.pop(entity)
        self._emit_bucket(entity, st, out)
        out.sessions.append(
            Session(
                entity,
                st.start_ms,
                st.last_ms,
                reason,
                np.asarray(st.ids, dtype=np.int32),
                np.asarray(st.gaps, dtype=np.float32),
                st.earlier,
            )
        )


def explode(
    entities_per_line: Sequence[Sequence[str]], time_ms: Sequence[int], template_ids: Sequence[int]
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Lines → events: one event per (line, entity). Returns (entities, time_ms int64, template_ids
    int32, line index int64) for LogFeaturizer.add_batch."""
    ents: list[str] = []
    line_idx: list[int] = []
    for i, es in enumerate(entities_per_line):
        ents.extend(es)
        line_idx.extend([i] * len(es))
    idx = np.asarray(line_idx, dtype=np.int64)
    return ents, np.asarray(time_ms, dtype=np.int64)[idx], np.asarray(template_ids, dtype=np.int32)[idx], idx
