"""Train, evaluate and export a VAE (PyTorch). Never imported by the service."""

import os

# ONNX Runtime checks each export; as in the service (service/__init__.py), without its usage telemetry.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
