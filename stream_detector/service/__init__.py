"""The Kafka service (`stream-detector run` and `check`): decoding, Kafka client settings and
clients, the state changelog, the loop with the parts it owns (checkpointer, partition owner,
operations hooks), health, systemd notify, hot reload and Prometheus metrics. Builds on config
(the settings), logs and core."""
