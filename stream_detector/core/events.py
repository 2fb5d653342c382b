"""`EventBatch`: a columnar batch of decoded observations, the unit every online stage works on.

Built once per consumed Kafka batch (or per chunk of a replayed file). Columns, not per-event
objects, so the window store, the normaliser and the scorer each handle a batch with a few numpy
calls. See docs/architecture.md for the field list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# event_time_ms value for an event whose time is unknown (e.g. a replayed file without a timestamp
# column); alerts then carry "event_time": null and idle eviction ignores it.
NO_TIME = np.iinfo(np.int64).min


@dataclass(frozen=True)
class EventBatch:
    keys: list[str]  # entity key per event
    rows: np.ndarray  # float32 [n, F], raw feature values in the bundle's feature order
    event_time_ms: np.ndarray  # int64 [n]; NO_TIME where unknown
    topic: list[str]  # source topic per event (replay: the input file name)
    partition: np.ndarray  # int32 [n]
    offset: np.ndarray  # int64 [n] (replay: the row number)

    def __post_init__(self) -> None:
        n = len(self.keys)
        if self.rows.ndim != 2 or self.rows.shape[0] != n:
            raise ValueError(f"EventBatch rows must be [n, F] with n = {n} keys, got shape {self.rows.shape}.")
        for name in ("event_time_ms", "partition", "offset"):
            arr = getattr(self, name)
            if arr.shape != (n,):
                raise ValueError(f"EventBatch {name} must have shape ({n},), got {arr.shape}.")
        if len(self.topic) != n:
            raise ValueError(f"EventBatch topic must have {n} entries, got {len(self.topic)}.")

    @property
    def n(self) -> int:
        return len(self.keys)

    @property
    def n_features(self) -> int:
        return int(self.rows.shape[1])

    @classmethod
    def build(
        cls,
        keys: Sequence[str],
        rows: np.ndarray,
        event_time_ms: np.ndarray | Sequence[int] | None = None,
        topic: str | Sequence[str] = "",
        partition: int | np.ndarray | Sequence[int] = 0,
        offset: np.ndarray | Sequence[int] | None = None,
    ) -> EventBatch:
        """Convenience constructor: scalars broadcast, missing times become NO_TIME, missing offsets
        become 0..n-1. Converts dtypes to the documented ones (copies only when needed)."""
        keys = list(keys)
        n = len(keys)
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if event_time_ms is None:
            times = np.full(n, NO_TIME, dtype=np.int64)
        else:
            times = np.asarray(event_time_ms, dtype=np.int64)
        topics = [topic] * n if isinstance(topic, str) else list(topic)
        if np.isscalar(partition):
            parts = np.full(n, int(partition), dtype=np.int32)  # type: ignore[arg-type]
        else:
            parts = np.asarray(partition, dtype=np.int32)
        offs = np.arange(n, dtype=np.int64) if offset is None else np.asarray(offset, dtype=np.int64)
        return cls(keys, rows, times, topics, parts, offs)

    def slice(self, start: int, stop: int) -> EventBatch:
        """Events [start, stop) as a batch of their own (views where numpy allows)."""
        return EventBatch(
            self.keys[start:stop],
            self.rows[start:stop],
            self.event_time_ms[start:stop],
            self.topic[start:stop],
            self.partition[start:stop],
            self.offset[start:stop],
        )

    def take(self, idx: np.ndarray) -> EventBatch:
        """The events at positions `idx` (int array), as a batch of the same kind: a subclass that
        carries more columns (logs.stage.LogEventBatch) keeps them."""
        return EventBatch(
            [self.keys[i] for i in idx.tolist()],
            self.rows[idx],
            self.event_time_ms[idx],
            [self.topic[i] for i in idx.tolist()],
            self.partition[idx],
            self.offset[idx],
        )
