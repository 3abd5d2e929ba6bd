"""Train, evaluate and export a VAE (PyTorch). Never imported by the service."""

# ONNX Runtime checks each export: the service package, imported first, turns its usage telemetry off before
# anything here loads it (service/__init__.py).
import service  # noqa: F401
