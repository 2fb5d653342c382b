"""`PartitionOwner`: the partitions one member holds, and their state, through rebalances
(STYLE.md "rebalance hygiene"; docs/reliability.md "Restore", "Rebalance").

- assigned: partitions new to this member are paused while their changelog partition is read
  back (`Restorer`, a bounded chunk per `restore_step`, between batches); once one is complete
  its entities are installed into the core, fenced (`StateTracker.restored`), and the partition
  resumes, first seeking back to any message fetched before the pause took hold.
- revoked: checkpoint (the caller's: finish, write state, commit), then drop, whatever happened.
- lost: finish without committing (the caller's), then drop.
- drop: the one place where a partition's state is forgotten: the core's entities (a partition
  number only once no input topic keeps it), the tracker's bookkeeping, the restore in progress,
  and every other holder of per-partition state registered with `on_drop` (the checkpointer's
  offsets and held records, health, metrics). A new piece of per-partition state registers
  itself there instead of being one more line to remember.
- rewind (exactly-once, after an aborted transaction or lost partitions): every assigned
  partition goes back to its committed offset and its state is restored from the changelog again.

The source is reached through `PartitionSource` (kafka_io.KafkaSource), the restorer through
`StateRestorer` (changelog.Restorer), so the owner is tested with in-memory fakes
(tests/test_partitions.py). Main thread only; the core must be idle in `restore_step`, `drop` and
`rewind` (the loop calls them between batches or from the rebalance callbacks, which run inside
its consume()).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from stream_detector.service.changelog import ChangelogError, StateAssembler, StateTracker
from stream_detector.service.stats import RunStats

log = logging.getLogger(__name__)

TP = tuple[str, int]  # (topic, partition)
DropHook = Callable[[set[TP], Sequence[int]], None]  # (partitions gone, partition numbers whose state was dropped)


class PartitionSource(Protocol):
    """What the owner needs of the consumer (kafka_io.KafkaSource)."""

    assignment: set[TP]

    def pause(self, tps: Iterable[TP]) -> None: ...

    def resume(self, tps: Iterable[TP]) -> None: ...

    def seek(self, tp: TP, offset: int) -> None: ...

    def rewind(self, tps: Iterable[TP]) -> dict[TP, int]: ...

    def committed_offsets(self, tps: Iterable[TP]) -> dict[TP, int]: ...


class StateRestorer(Protocol):
    """What the owner needs of the changelog reader (changelog.Restorer)."""

    topic: str

    @property
    def busy(self) -> bool: ...

    def restoring(self, partition: int) -> bool: ...

    def partitions(self) -> list[int]: ...

    def start(self, partitions: Iterable[int]) -> None: ...

    def cancel(self, partitions: Iterable[int]) -> None: ...

    def step(self, max_records: int, timeout: float = 0.0) -> dict[int, StateAssembler]: ...


class PartitionOwner:
    """`core`: the detection core (`drop_partitions`, `restore`); `tracker`/`restorer`: the
    changelog's bookkeeping and reader (None: no changelog, state starts cold on assignment);
    `fence_rows`: fence restored entities' events by offset (False for log models, whose stage
    skips lines itself)."""

    def __init__(
        self,
        source: PartitionSource,
        core: Any,
        *,
        tracker: StateTracker | None,
        restorer: StateRestorer | None,
        stats: RunStats,
        restore_chunk: int = 2000,
        fence_rows: bool = True,
    ) -> None:
        self.source, self.core = source, core
        self.tracker, self.restorer = tracker, restorer
        self.stats = stats
        self.restore_chunk = restore_chunk
        self.fence_rows = fence_rows
        self.restoring: set[TP] = set()  # paused until their partition's state is restored
        self._slipped: dict[TP, int] = {}  # first offset fetched (and dropped) while restoring
        self._on_drop: list[DropHook] = []

    def on_drop(self, hook: DropHook) -> None:
        """`hook(gone, numbers)` runs whenever partitions are dropped (revoked or lost)."""
        self._on_drop.append(hook)

    def active(self) -> set[TP]:
        """Assigned partitions that are not being restored: their state may be written and their
        offsets committed."""
        return self.source.assignment - self.restoring

    @property
    def busy(self) -> bool:
        """A changelog restore is in progress."""
        return self.restorer is not None and self.restorer.busy

    # ------------------------------------------------------------------ rebalance (inside consume)
    def assigned(self, new: set[TP]) -> None:
        """Partitions were added (cooperative, incremental; `source.assignment` includes them):
        pause those whose partition number is new to this member until its state is restored."""
        restorer, source = self.restorer, self.source
        if restorer is None:
            return
        owned_before = {p for (_, p) in source.assignment - new}
        fresh = {p for _, p in new} - owned_before
        restorer.start(fresh)
        hold = {tp for tp in new if restorer.restoring(tp[1])}
        if hold:
            source.pause(hold)
            self.restoring |= hold

    def revoked(self, gone: set[TP], checkpoint: Callable[[], None]) -> None:
        """Checkpoint (finish, write state, commit), then drop the partitions, whatever happened."""
        try:
            checkpoint()
        finally:
            self.drop(gone)

    def lost(self, gone: set[TP], finish: Callable[[], None]) -> None:
        """Finish without committing (`finish` must not commit), then drop the partitions."""
        try:
            finish()
        finally:
            self.drop(gone)

    def drop(self, gone: set[TP]) -> None:
        """Forget every piece of state of partitions `gone` (still in `source.assignment` while the
        rebalance callback runs)."""
        # The core keys state by partition number: drop a number only when no input topic keeps it.
        keep = {p for (t, p) in self.source.assignment if (t, p) not in gone}
        numbers = sorted({p for _, p in gone} - keep)
        dropped = self.core.drop_partitions(numbers)
        if self.tracker is not None:
            self.tracker.forget_partitions(numbers)
        if self.restorer is not None:
            self.restorer.cancel(numbers)
        self.restoring -= gone
        for tp in gone:
            self._slipped.pop(tp, None)
        for hook in self._on_drop:
            hook(gone, numbers)
        log.info("dropped state of %d entities on %d partition(s)", dropped, len(gone))

    # ------------------------------------------------------------------ consuming
    def admit(self, msgs: list[Any]) -> list[Any]:
        """The messages of partitions that are not being restored; for the others, remember the
        first offset fetched before the pause took hold, to read it again once restored."""
        if not self.restoring or not msgs:
            return msgs
        kept = []
        for m in msgs:
            tp = (m.topic(), m.partition())
            if tp in self.restoring:
                self._slipped.setdefault(tp, m.offset())
            else:
                kept.append(m)
        return kept

    # ------------------------------------------------------------------ state restore (between batches)
    def restore_step(self) -> None:
        restorer = self.restorer
        if restorer is None or not restorer.busy:
            return
        for partition, latest in restorer.step(self.restore_chunk, 0.05).items():
            self._install(partition, latest)

    def _install(self, partition: int, latest: StateAssembler) -> None:
        """Put a restored partition's entities into the core (idle), fence them, resume the partition."""
        source, tracker = self.source, self.tracker
        assert tracker is not None and self.restorer is not None
        t = time.monotonic()
        tps = {tp for tp in self.restoring if tp[1] == partition}
        committed = source.committed_offsets(tps)
        by_topic = {topic: off for (topic, _), off in committed.items() if off >= 0}
        restored = cold = 0
        for key, state, applied, why in latest.states():
            try:
                if state is None:
                    raise ChangelogError(why or "unusable record")
                self.core.restore(partition, key, state)
            except (ChangelogError, ValueError, KeyError) as e:
                cold += 1
                if cold == 1:
                    log.warning(
                        "changelog state of %s in partition %d is not usable (%s); such entities start cold",
                        key,
                        partition,
                        e,
                    )
                continue
            tracker.restored(partition, key, applied if self.fence_rows else {}, by_topic, state)
            restored += 1
        self.restoring -= tps
        for tp in tps:
            first = self._slipped.pop(tp, None)
            if first is not None:  # fetched before the pause took hold: read it again
                source.seek(tp, first)
        source.resume(tps)
        self.stats.restored_entities += restored
        log.info(
            "restored %d entities of partition %d from %s in %.2f s (%d cold)",
            restored,
            partition,
            self.restorer.topic,
            time.monotonic() - t,
            cold,
        )

    # ------------------------------------------------------------------ exactly-once rewind
    def rewind(self) -> None:
        """Every assigned partition back to its committed state (the open transaction was aborted):
        drop its entities, restore them from the changelog (paused until then), seek to the
        committed offsets."""
        source = self.source
        tps = set(source.assignment)
        numbers = {p for _, p in tps}
        self.core.drop_partitions(sorted(numbers))
        if self.tracker is not None:
            self.tracker.forget_partitions(numbers)
        if self.restorer is not None:
            self.restorer.cancel(numbers)
            source.pause(tps)
            self.restoring |= tps
            self.restorer.start(numbers)
        source.rewind(tps)
        self._slipped = {tp: o for tp, o in self._slipped.items() if tp not in tps}
        self.stats.rewinds += 1

    def describe(self) -> list[str]:
        """Parts of the loop's state line (`Detector.describe`)."""
        parts = []
        if self.restoring:
            parts.append(f"restoring (paused): {fmt_tps(self.restoring)}; slipped: {fmt_tps(self._slipped)}")
        if self.restorer is not None and self.restorer.busy:
            parts.append(f"changelog partitions still read: {self.restorer.partitions()}")
        return parts


def fmt_tps(tps: Any) -> str:
    """{(topic, partition): value} or a set of them, compactly: `topic[0]=12,topic[1]=7`."""
    if isinstance(tps, dict):
        return ",".join(f"{t}[{p}]={v}" for (t, p), v in sorted(tps.items())) or "-"
    return ",".join(f"{t}[{p}]" for t, p in sorted(tps)) or "-"
