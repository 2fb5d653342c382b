"""Where `fit` reads its normal data: a file (offline/datafiles.py) or a range of a Kafka topic read
through the service's own decoder (offline/topic_table.py), with the client and input settings of the
service (the run TOML's [kafka] and [input] tables and SD_* variables, config.load_settings)."""

from __future__ import annotations

import logging

from stream_detector.config import ConfigError, load_settings
from stream_detector.ingest.topic_range import TopicRangeError
from stream_detector.offline.datafiles import DataFileError, DataTable, read_table
from training.settings import FitSettings

log = logging.getLogger(__name__)


def read_training_table(s: FitSettings) -> DataTable:
    """The rows to train on; DataFileError with one sentence when they cannot be had."""
    if s.kafka_topic is None:
        assert s.data is not None  # FitSettings checks that one of the two is given
        return read_table(s.data, s.format, s.features, s.key_field, s.timestamp_field, s.nan_policy)
    from stream_detector.offline.topic_table import read_topic_table

    try:
        service = load_settings(None, {"kafka": dict(s.kafka or {}), "input": dict(s.input or {})})
        table, r = read_topic_table(service, s.kafka_topic, s.since, s.until, s.features)
    except (ConfigError, TopicRangeError) as e:
        raise DataFileError(str(e)) from None
    log.info("%s", r.summary())
    if table.n_rows == 0:
        raise DataFileError(f"{r.summary()}; nothing to train on.")
    return table
