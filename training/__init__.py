"""Offline training: Transformer autoencoder on normal data, calibration, ONNX export to a bundle."""
