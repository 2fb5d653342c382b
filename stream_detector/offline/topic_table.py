"""A range of a Kafka topic as a `DataTable`: what `fit --kafka-topic` trains on and
`replay --kafka-topic` replays (ingest/topic_range.py reads and decodes it as the service does).

Rows keep the read order (partition by partition, offset order); `row_index` numbers them in that
order, and the event times are the service's (the `[input] timestamp_field`, else the Kafka
timestamp), so per entity the rows are in the order the service would score them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from stream_detector.core.events import NO_TIME
from stream_detector.ingest.topic_range import TopicRange, read_topic_range
from stream_detector.offline.datafiles import CleaningReport, DataTable

if TYPE_CHECKING:
    from stream_detector.config import Settings


def read_topic_table(
    settings: Settings,
    topic: str,
    since: str | None = None,
    until: str | None = None,
    features: Sequence[str] | None = None,
) -> tuple[DataTable, TopicRange]:
    """The range's rows as a table, and the range itself (its summary counts the dead letters)."""
    r = read_topic_range(settings, topic, since, until, features)
    times = r.event_time_ms.astype(np.int64)
    return (
        DataTable(
            features=r.features,
            values=r.rows.astype(np.float64),
            keys=r.keys,
            timestamps_ms=None if np.any(times == NO_TIME) else times,
            source=f"kafka:{topic}",
            row_index=np.arange(len(r.keys), dtype=np.int64),
            cleaning=CleaningReport("service-decoder", 0, 0, 0),
        ),
        r,
    )
