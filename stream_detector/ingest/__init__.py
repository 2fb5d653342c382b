"""What the online service and the offline tools both read through: the message contract (decode.py,
decode_logs.py) and the Kafka client settings (kafka_config.py), plus reading a range of a topic without
a consumer group (topic_range.py: fit, baseline and replay from a topic). Below service and offline, so
training and replay decode a topic exactly as the running service does."""
