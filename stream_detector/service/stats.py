"""`RunStats`: what one `Detector.run` did, counted by the loop and the parts it owns."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class RunStats:
    consumed: int = 0  # messages taken from Kafka
    decoded: int = 0  # valid events handed to the core
    dead_letters: int = 0
    scored: int = 0  # windows scored
    alerts: Counter = field(default_factory=Counter)  # by state
    batches: int = 0
    commits: int = 0
    elapsed_s: float = 0.0
    first_message_s: float | None = None  # seconds from start to the first consumed message (group join)
    backpressure_s: float = 0.0  # time spent with partitions paused waiting for inference
    changelog_records: int = 0  # state records (tombstones included) written
    changelog_bytes: int = 0
    restored_entities: int = 0  # entities whose state was read back from the changelog
    aborted_transactions: int = 0
    rewinds: int = 0  # back to the committed state after an abort or lost partitions
