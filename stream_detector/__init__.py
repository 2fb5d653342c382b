"""stream-detector: real-time anomaly detection on Kafka with an ONNX Transformer autoencoder."""

__version__ = "0.1.0"
