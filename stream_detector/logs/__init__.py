"""The log path: raw lines -> parsed lines -> templates -> per-entity sessions -> the rows the core
scores, the bundle's log spec, and the core adapter for log alerts. Builds on core; no Kafka."""
