"""Training windows: per entity, never across an entity boundary or a time gap, split by time.

Every entity's rows (time order) are cut into *segments* at time gaps: a step longer than
`gap_factor` x the entity's median step (no timestamps: no gaps). The last `val_fraction` of each
entity's rows (by time) is validation; the rest is training. A training window lies entirely in
training rows; a validation window *ends* in a validation row (its scored newest step is held out)
and may start in the training rows just before, as the service would see it. Segments of one
entity are separate: no window spans a gap.

All windows are views into one contiguous float32 array: a window is its start row, and a batch
is gathered as `data[starts[:, None] + arange(W)]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stream_detector.offline.datafiles import DataTable


class WindowingError(Exception):
    """The data cannot give the windows asked for; one sentence."""


@dataclass(frozen=True)
class WindowPlan:
    data: np.ndarray  # float64 [N, F]: all rows of all entities, segment after segment (raw, not normalised)
    train_rows: np.ndarray  # bool [N]: the row is in the training part (normaliser fits on these)
    train_starts: np.ndarray  # int64 start rows of training windows
    val_starts: np.ndarray  # int64 start rows of validation windows
    window: int
    n_segments: int
    n_gaps: int
    entity_keys: tuple[str, ...] = ()  # the entities, in the order of their rows in `data`
    row_entity: np.ndarray | None = None  # int32 [N]: each row's index into entity_keys

    def entities_of(self, starts: np.ndarray) -> list[str]:
        """The entity of each window starting at `starts` (rows of `data`)."""
        assert self.row_entity is not None
        return [self.entity_keys[i] for i in self.row_entity[starts].tolist()]


def plan_windows(table: DataTable, window: int, val_fraction: float, gap_factor: float, stride: int = 1) -> WindowPlan:
    if window < 2:
        raise WindowingError(f"the window must be at least 2 rows, got {window}.")
    if not (0.0 < val_fraction < 1.0):
        raise WindowingError(f"the validation fraction must be between 0 and 1, got {val_fraction}.")
    if table.n_rows < window:
        raise WindowingError(f"{table.source} has {table.n_rows} usable rows, fewer than one window of {window}.")
    blocks: list[np.ndarray] = []
    train_flags: list[np.ndarray] = []
    train_starts: list[np.ndarray] = []
    val_starts: list[np.ndarray] = []
    row_entity: list[np.ndarray] = []
    keys: list[str] = []
    offset = n_segments = n_gaps = 0
    for ent in table.by_entity():
        n = ent.values.shape[0]
        row_entity.append(np.full(n, len(keys), dtype=np.int32))
        keys.append(ent.key)
        split = int(np.floor(n * (1.0 - val_fraction)))
        segments = _segments(n, ent.timestamps_ms, gap_factor)
        n_gaps += len(segments) - 1
        for lo, hi in segments:
            n_segments += 1
            seg_len = hi - lo
            blocks.append(ent.values[lo:hi])
            is_train = np.arange(lo, hi) < split
            train_flags.append(is_train)
            # Window with start s covers rows s..s+W-1 of the segment (local indices).
            starts = np.arange(0, max(seg_len - window + 1, 0), dtype=np.int64)
            ends = starts + window - 1  # local
            train_starts.append(offset + starts[(lo + ends) < split][::stride])
            val_starts.append(offset + starts[(lo + ends) >= split])
            offset += seg_len
    plan = WindowPlan(
        data=np.concatenate(blocks, axis=0),
        train_rows=np.concatenate(train_flags),
        train_starts=np.concatenate(train_starts),
        val_starts=np.concatenate(val_starts),
        window=window,
        n_segments=n_segments,
        n_gaps=n_gaps,
        entity_keys=tuple(keys),
        row_entity=np.concatenate(row_entity),
    )
    if plan.train_starts.size == 0:
        raise WindowingError(
            f"{table.source} gives no training window of {window} rows (after splitting at gaps and holding out "
            f"{val_fraction:.0%} for validation); use more rows or a smaller window."
        )
    if plan.val_starts.size == 0:
        raise WindowingError(
            f"{table.source} gives no validation window of {window} rows; use more rows, a smaller window or a larger "
            "validation fraction."
        )
    return plan


def _segments(n: int, timestamps_ms: np.ndarray | None, gap_factor: float) -> list[tuple[int, int]]:
    """[lo, hi) row ranges of one entity's n rows between time gaps."""
    if timestamps_ms is None or n < 3:
        return [(0, n)]
    steps = np.diff(timestamps_ms)
    positive = steps[steps > 0]
    if positive.size == 0:
        return [(0, n)]
    limit = gap_factor * float(np.median(positive))
    cuts = np.nonzero(steps > limit)[0] + 1
    bounds = [0, *cuts.tolist(), n]
    return list(zip(bounds[:-1], bounds[1:]))
