"""The offline tools: data files, replay (backtest), evaluation (contract 4) and the simulator.
Builds on core, logs and ingest; never on the Kafka service."""
