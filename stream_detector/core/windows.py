"""`WindowStore`: per-(partition, entity) sliding windows as numpy ring buffers.

Every tracked entity owns one *slot*: a row of `buffer[capacity, W, F]` (normalised float32 rows),
its write position, its event count since it was first seen, and when it was last seen. A batch is
applied with a handful of numpy operations, not per-event Python lists of rows:

- events are mapped to slots (a dict lookup per event, the only per-event Python work);
- the batch is split into *rounds* by each event's occurrence rank within the batch for its
  entity (round 0 = every entity's first event in the batch, round 1 = the second ones, ...), so
  inside a round all slots are distinct and one vectorised write + gather handles it, and the
  window gathered for an event is exactly the window ending at that event;
- an event is *due* for scoring when its window is full and the entity's event count is
  congruent to the entity's *hop phase* modulo the scoring hop. The phase comes from a stable hash
  of the key (`hop_phase`), so a fleet that reports in lockstep is scored spread evenly over the
  hop instead of all at once every hop-th tick (which queued a whole fleet's inference behind one
  event and set the latency; docs/performance.md), and the same key is scored at the same events
  in every process and replay.

A window never spans a time gap, as training's windows never do (training/windows.py): with a
`gap_factor`, an event that comes more than `gap_factor` x its entity's typical step after the
entity's previous event starts the window again, and the entity is scored once W rows have come
after the gap. The typical step is learned per entity from its own events (a geometric mean of its
recent steps, each counted at most `gap_factor` x the typical one), so a fleet may mix rates and an
entity whose rate changes is back to being scored after a few restarts. Only the window restarts:
thresholds and alerts (the pipeline's per-entity state) go on. (The pipeline gives the store
max(W, the bundle's gap_factor): only a silence longer than a window restarts one.)

Memory is bounded by `max_entities`: entities not seen for `idle_timeout_ms` (by event time) are
evicted at each batch, and when the cap is still hit, the least recently seen entities are
evicted. Slots are handed out again, so callers keep per-entity state by slot and reset it for the
slots listed in `Ingested.reset_slots`.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from stream_detector.core.events import NO_TIME

if TYPE_CHECKING:
    from stream_detector.core.bundle import Normaliser

log = logging.getLogger(__name__)

EntityKey = tuple[int, str]  # (partition, entity key)
STEP_MEMORY = 1.0 / 16  # weight of each new step in an entity's typical step (log scale)


@dataclass(frozen=True)
class Ingested:
    """What one `WindowStore.ingest` call produced."""

    slots: np.ndarray  # int64 [n]: slot of each event's entity
    due: np.ndarray  # int64 [m]: batch indices of the events due for scoring, ascending
    windows: np.ndarray  # float32 [m, W, F]: the window ending at each due event, oldest row first
    reset_slots: np.ndarray  # int64: slots given to a new entity during this call (start their state fresh)
    evicted: int  # entities evicted during this call (idle or LRU)
    counts: np.ndarray | None = None  # int64 [n]: the entity's event count after each event
    gap_restarts: int = 0  # entity windows started again after a time gap during this call


def hop_phase(key: str, hop: int) -> int:
    """The event count (mod `hop`) at which this entity is scored: crc32 of the key, so it is the
    same in every process, restart and replay (Python's hash() is salted per process)."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % hop if hop > 1 else 0


class WindowStore:
    def __init__(
        self,
        window: int,
        n_features: int,
        max_entities: int = 100_000,
        idle_timeout_ms: int | None = None,
        hop: int = 1,
        initial_capacity: int = 1024,
        gap_factor: float | None = None,
    ) -> None:
        if window < 1 or n_features < 1:
            raise ValueError(f"window ({window}) and n_features ({n_features}) must be positive.")
        if max_entities < 1:
            raise ValueError(f"max_entities must be at least 1, got {max_entities}.")
        if hop < 1:
            raise ValueError(f"the scoring hop must be at least 1, got {hop}.")
        if idle_timeout_ms is not None and idle_timeout_ms <= 0:
            raise ValueError(f"idle_timeout_ms must be positive (or None to disable), got {idle_timeout_ms}.")
        if gap_factor is not None and not gap_factor > 1.0:
            raise ValueError(f"gap_factor must be above 1 (or None for no gaps), got {gap_factor}.")
        self.window = int(window)
        self.n_features = int(n_features)
        self.max_entities = int(max_entities)
        self.idle_timeout_ms = idle_timeout_ms
        self.hop = int(hop)
        self.gap_factor = gap_factor
        self._index: dict[EntityKey, int] = {}
        self._keys: list[EntityKey | None] = []
        self._free: list[int] = []
        self._capacity = 0
        self._buf = np.zeros((0, self.window, self.n_features), dtype=np.float32)
        self._pos = np.zeros(0, dtype=np.int64)  # next write position in the ring
        self._count = np.zeros(0, dtype=np.int64)  # events since the entity was first seen
        self._phase = np.zeros(0, dtype=np.int64)  # hop_phase(key): due when count % hop == phase
        self._run = np.zeros(0, dtype=np.int64)  # events since the window (re)started: due from W on
        self._step = np.zeros(0, dtype=np.float64)  # typical step between the entity's events, ms (0: not known)
        self._last_time = np.zeros(0, dtype=np.int64)  # event time of the latest event (NO_TIME if unknown)
        self._last_seq = np.zeros(0, dtype=np.int64)  # ingest call that last touched the slot (LRU clock)
        self._seq = 0
        self._clock_ms = NO_TIME  # highest event time seen: the clock idle eviction runs on
        self.evicted_idle = 0
        self.evicted_lru = 0
        self.gap_restarts = 0  # windows started again after a time gap
        # Slots whose rows were replaced outside `ingest` (state import, renormalisation), for a
        # device-resident copy to re-send; only recorded once `track_rewrites` is set.
        self.track_rewrites = False
        self.rewritten: set[int] = set()
        self.rewritten_all = False
        self._grow(min(int(initial_capacity), self.max_entities))

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, entity: EntityKey) -> bool:
        return entity in self._index

    def slot_of(self, partition: int, key: str) -> int | None:
        return self._index.get((int(partition), key))

    def entities(self) -> list[EntityKey]:
        return list(self._index)

    def count_of(self, slot: int) -> int:
        return int(self._count[slot])

    @property
    def capacity(self) -> int:
        return self._capacity

    # ------------------------------------------------------------------ batch update
    def ingest(
        self,
        partitions: np.ndarray | Sequence[int],
        keys: Sequence[str],
        rows: np.ndarray,
        event_time_ms: np.ndarray | None = None,
        gather: bool = True,
    ) -> Ingested:
        """Append normalised rows [n, F] (in event order) to their entities' windows and gather the
        windows of the events due for scoring. A batch may hold several events of one entity.
        With `gather=False` the windows are left out (`windows` is empty): a device-resident copy
        of the rings gathers them itself from `slots`, `counts` and `due` (device_windows.py)."""
        n = len(keys)
        rows = np.asarray(rows, dtype=np.float32)
        if rows.shape != (n, self.n_features):
            raise ValueError(f"rows must have shape ({n}, {self.n_features}), got {rows.shape}.")
        parts = np.asarray(partitions, dtype=np.int64)
        times = (
            np.full(n, NO_TIME, dtype=np.int64) if event_time_ms is None else np.asarray(event_time_ms, dtype=np.int64)
        )
        self._seq += 1
        empty = np.zeros(0, dtype=np.int64)
        if n == 0:
            return Ingested(empty, empty, np.zeros((0, self.window, self.n_features), np.float32), empty, 0, empty)

        known_times = times[times != NO_TIME]
        if known_times.size:
            self._clock_ms = max(self._clock_ms, int(known_times.max()))

        slots, reset_slots, evicted = self._assign_slots(parts, keys)
        self._last_seq[slots] = self._seq

        times_buf = np.empty(n, dtype=np.int64)
        restarts = 0
        counts = np.empty(n, dtype=np.int64)
        no_windows = np.zeros((0, self.window, self.n_features), np.float32)
        due_parts: list[np.ndarray] = []
        win_parts: list[np.ndarray] = []
        for idx in self._rounds(slots):
            s = slots[idx]
            p = self._pos[s]
            self._buf[s, p] = rows[idx]
            self._pos[s] = (p + 1) % self.window
            self._count[s] += 1
            if self.gap_factor is not None:
                restarts += self._restart_after_gaps(s, times[idx])
            self._run[s] += 1
            np.maximum(self._last_time[s], times[idx], out=times_buf[: s.size])  # NO_TIME is int64 min: never wins
            self._last_time[s] = times_buf[: s.size]
            c = self._count[s]
            counts[idx] = c
            due_mask = self._run[s] >= self.window
            if self.hop > 1:
                due_mask &= c % self.hop == self._phase[s]
            if due_mask.any():
                ds = s[due_mask]
                due_parts.append(idx[due_mask])
                if gather:
                    win_parts.append(self._gather(ds))
        if not due_parts:
            return Ingested(slots, empty, no_windows, reset_slots, evicted, counts, restarts)
        due = np.concatenate(due_parts)
        windows = no_windows
        if gather:
            windows = np.concatenate(win_parts) if len(win_parts) > 1 else win_parts[0]
        if len(due_parts) > 1:
            order = np.argsort(due, kind="stable")
            due = due[order]
            if gather:
                windows = windows[order]
        return Ingested(slots, due, windows, reset_slots, evicted, counts, restarts)

    def _restart_after_gaps(self, s: np.ndarray, times: np.ndarray) -> int:
        """Slots `s` (distinct) get events at `times`: restart the window of those that come after a
        gap, and learn each one's typical step. Returns how many restarted."""
        assert self.gap_factor is not None
        last, typical = self._last_time[s], self._step[s]
        step = np.where((times != NO_TIME) & (last != NO_TIME), times - last, 0).astype(np.float64)
        gap = (typical > 0) & (step > self.gap_factor * typical)
        restarts = int(np.count_nonzero(gap))
        if restarts:
            self._run[s[gap]] = 0
            self.gap_restarts += restarts
        moved = step > 0  # a repeated or out-of-order time says nothing about the rate
        if moved.any():
            t, x = typical[moved], step[moved]
            known = t > 0
            x[known] = np.minimum(x[known], self.gap_factor * t[known])  # a gap counts as gap_factor steps
            # geometric mean of recent steps (16 events' memory): a rate change is learned in a few
            # restarts, one long gap lifts it by at most gap_factor ** (1/16)
            t[known] = np.exp(np.log(t[known]) + STEP_MEMORY * (np.log(x[known]) - np.log(t[known])))
            t[~known] = x[~known]
            self._step[s[moved]] = t
        return restarts

    def windows_of(self, slots: np.ndarray) -> np.ndarray:
        """The current windows of these slots, oldest row first: [len(slots), W, F] (a new array;
        rows an entity has not seen yet are whatever the slot held, callers look at `count_of`)."""
        return self._gather(np.asarray(slots, dtype=np.int64))

    def counts_of(self, slots: np.ndarray) -> np.ndarray:
        return self._count[np.asarray(slots, dtype=np.int64)].copy()

    def _gather(self, slots: np.ndarray) -> np.ndarray:
        """Windows of the given slots, oldest row first: [len(slots), W, F] (a new array)."""
        ring = (self._pos[slots][:, None] + np.arange(self.window)) % self.window
        return self._buf[slots[:, None], ring]

    @staticmethod
    def _rounds(slots: np.ndarray) -> Iterable[np.ndarray]:
        """Batch indices grouped by occurrence rank of their slot within the batch, each group ascending."""
        n = slots.size
        order = np.argsort(slots, kind="stable")
        s_sorted = slots[order]
        new_group = np.empty(n, dtype=bool)
        new_group[0] = True
        np.not_equal(s_sorted[1:], s_sorted[:-1], out=new_group[1:])
        if new_group.all():  # every entity once: a single round in batch order
            yield np.arange(n, dtype=np.int64)
            return
        positions = np.arange(n, dtype=np.int64)
        group_start = np.maximum.accumulate(np.where(new_group, positions, 0))
        rank = np.empty(n, dtype=np.int64)
        rank[order] = positions - group_start
        by_rank = np.argsort(rank, kind="stable")  # stable: ascending batch index inside each rank
        bounds = np.cumsum(np.bincount(rank))
        start = 0
        for stop in bounds:
            yield by_rank[start:stop]
            start = stop

    # ------------------------------------------------------------------ slots, eviction
    def _assign_slots(self, parts: np.ndarray, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray, int]:
        index = self._index
        entities = list(zip(parts.tolist(), keys))
        slots = np.fromiter((index.get(e, -1) for e in entities), dtype=np.int64, count=len(entities))
        missing = np.flatnonzero(slots < 0)
        evicted = 0
        if self.idle_timeout_ms is not None and self._clock_ms != NO_TIME:
            # entities of this batch are protected from eviction: mark them touched first
            self._last_seq[slots[slots >= 0]] = self._seq
            evicted += self._evict_idle()
        if missing.size == 0:
            return slots, np.zeros(0, dtype=np.int64), evicted
        new_entities: dict[EntityKey, int] = {}
        for i in missing.tolist():
            new_entities.setdefault(entities[i], -1)
        need = len(new_entities)
        if need > len(self._free):
            self._grow(min(self.max_entities, max(self._capacity * 2, len(self._index) + need)))
        if need > len(self._free):
            self._last_seq[slots[slots >= 0]] = self._seq
            evicted += self._evict_lru(need - len(self._free))
        reset = np.empty(need, dtype=np.int64)
        for j, e in enumerate(new_entities):
            s = self._free.pop()
            new_entities[e] = s
            self._occupy(s, e)
            reset[j] = s
        for i in missing.tolist():
            slots[i] = new_entities[entities[i]]
        return slots, reset, evicted

    def _occupy(self, slot: int, entity: EntityKey) -> None:
        self._index[entity] = slot
        self._keys[slot] = entity
        self._pos[slot] = 0
        self._count[slot] = 0
        self._phase[slot] = hop_phase(entity[1], self.hop)
        self._run[slot] = 0
        self._step[slot] = 0.0
        self._last_time[slot] = NO_TIME
        self._last_seq[slot] = self._seq

    def _release(self, slot: int) -> None:
        entity = self._keys[slot]
        if entity is not None:
            del self._index[entity]
            self._keys[slot] = None
            self._free.append(slot)

    def _occupied_mask(self) -> np.ndarray:
        return np.fromiter((k is not None for k in self._keys), dtype=bool, count=self._capacity)

    def _evict_idle(self) -> int:
        assert self.idle_timeout_ms is not None
        limit = self._clock_ms - self.idle_timeout_ms
        idle = (self._last_time != NO_TIME) & (self._last_time < limit) & (self._last_seq != self._seq)
        victims = np.flatnonzero(idle)
        if victims.size:
            for s in victims.tolist():
                self._release(s)
                self._last_time[s] = NO_TIME  # a free slot is never idle-evicted again
            self.evicted_idle += victims.size
            log.info(
                "evicted %d entities idle for more than %d ms (%d tracked)",
                victims.size,
                self.idle_timeout_ms,
                len(self),
            )
        return int(victims.size)

    def _evict_lru(self, k: int) -> int:
        candidates = np.flatnonzero(self._occupied_mask() & (self._last_seq != self._seq))
        if candidates.size < k:
            raise ValueError(
                f"one batch holds more distinct entities than max_entities={self.max_entities}; split the batch or "
                "raise the cap."
            )
        victims = (
            candidates[np.argpartition(self._last_seq[candidates], k - 1)[:k]] if k < candidates.size else candidates
        )
        for s in victims.tolist():
            self._release(s)
        self.evicted_lru += int(victims.size)
        log.warning(
            "entity cap max_entities=%d reached: evicted the %d least recently seen entities",
            self.max_entities,
            victims.size,
        )
        return int(victims.size)

    def _grow(self, new_capacity: int) -> None:
        old = self._capacity
        if new_capacity <= old:
            return
        extra = new_capacity - old

        def grow(a: np.ndarray, fill: int) -> np.ndarray:
            out = np.full((new_capacity,) + a.shape[1:], fill, dtype=a.dtype)
            out[:old] = a
            return out

        self._buf = grow(self._buf, 0)
        self._pos = grow(self._pos, 0)
        self._count = grow(self._count, 0)
        self._phase = grow(self._phase, 0)
        self._run = grow(self._run, 0)
        self._step = grow(self._step, 0)
        self._last_time = grow(self._last_time, NO_TIME)
        self._last_seq = grow(self._last_seq, 0)
        self._keys.extend([None] * extra)
        # pop() hands out the lowest free slot first
        self._free = list(range(new_capacity - 1, old - 1, -1)) + self._free
        self._capacity = new_capacity

    # ------------------------------------------------------------------ rebalance, changelog
    def drop_partitions(self, partitions: Iterable[int]) -> list[int]:
        """Forget every entity of these partitions (revoked or lost); returns the freed slots."""
        drop = {int(p) for p in partitions}
        freed = [s for e, s in self._index.items() if e[0] in drop]
        for s in freed:
            self._release(s)
        if freed:
            log.info("dropped window state of %d entities of partitions %s", len(freed), sorted(drop))
        return freed

    def renormalise(self, old: Normaliser, new: Normaliser) -> None:
        """Re-express every stored row under another normaliser (model hot reload): the buffers
        hold normalised rows, so a new bundle's centre/scale must be applied to them, in place."""
        buf = self._buf
        buf *= old.scale
        buf += old.center - new.center
        buf /= new.scale
        self.rewritten_all = self.track_rewrites

    def export_state(self, partition: int, key: str) -> dict[str, Any] | None:
        """The entity's window state (JSON-ready with orjson's numpy option), or None if untracked."""
        slot = self.slot_of(partition, key)
        if slot is None:
            return None
        count = int(self._count[slot])
        k = min(count, self.window)
        rows = self._gather(np.array([slot]))[0, self.window - k :]
        last = int(self._last_time[slot])
        return {
            "count": count,
            "last_time_ms": None if last == NO_TIME else last,
            "run": int(self._run[slot]),
            "step_ms": float(self._step[slot]),
            "rows": rows.copy(),
        }

    def import_state(self, partition: int, key: str, state: dict[str, Any]) -> int:
        """Install an entity's window state (replacing any it has); returns its slot."""
        rows = np.asarray(state["rows"], dtype=np.float32).reshape(-1, self.n_features)
        count = int(state["count"])
        if rows.shape[0] != min(count, self.window):
            raise ValueError(
                f"window state holds {rows.shape[0]} rows for a count of {count} with window {self.window}."
            )
        entity = (int(partition), key)
        slot = self._index.get(entity)
        if slot is None:
            self._seq += 1
            _, reset, _ = self._assign_slots(np.array([entity[0]]), [key])
            slot = int(reset[0])
        k = rows.shape[0]
        self._buf[slot] = 0
        self._buf[slot, :k] = rows
        self._pos[slot] = k % self.window
        self._count[slot] = count
        last = state.get("last_time_ms")
        self._last_time[slot] = NO_TIME if last is None else int(last)
        # states written before gaps were known: the window ran since the entity was first seen
        self._run[slot] = min(int(state.get("run", count)), count)
        self._step[slot] = float(state.get("step_ms", 0.0))
        if self.track_rewrites:
            self.rewritten.add(slot)
        return slot
