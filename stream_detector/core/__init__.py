"""The scoring core: events, the model bundle, windows (host and device), the ONNX Runtime scorer,
thresholds, alerts and the pipeline that ties them. numpy and ONNX Runtime only; imports nothing
else of stream_detector."""
