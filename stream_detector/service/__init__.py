"""The Kafka service (`stream-detector run` and `check`): settings, decoding, Kafka clients, the
state changelog, the loop, health, systemd notify, hot reload and Prometheus metrics. Builds on
core and logs."""
