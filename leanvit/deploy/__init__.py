"""Deployment: export (ONNX, TorchScript) with verification, INT8 quantization, ``leanvit bench`` and prediction."""
